"""Weights in and out: the allow-listing reader of PyTorch's `torch.save` files (`torch_checkpoint`), key plans and
the MLX folder format (`weights`), the layout of a training run's folder (`run_folders`), and `load` / `convert`
(`loading`), which find a source (a preset, a hub id, a folder, Apple's files), plan its keys and stream its tensors."""
