"""Weights in and out, one question per module: which kind of source a name is and where its weights are
(`sources`, one resolver per kind, tried in one order by `locate`), what the hub holds and what is downloaded of it
(`hub`), what architecture a checkpoint's tensor shapes mean (`infer`), how checkpoint keys and layouts become ours
and how model folders are written (`weights`), the allow-listing reader of PyTorch's `torch.save` files
(`torch_checkpoint`), the layout of a training run's folder (`run_folders`), and `load` / `convert` (`loading`),
which open a located source and stream its tensors, one at a time, into a model or a folder."""
