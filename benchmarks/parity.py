"""Print the MLX model's error against the PyTorch reference of AIM, stage by stage (needs PyTorch).

    python benchmarks/parity.py --preset aim-600M --batch-size 2

Random weights at the preset's full architecture (non-trivial norms and BatchNorm statistics), copied into
the MLX model through the same `load_state_dict` a checkpoint goes through. Each figure is
max |mlx - torch| / max |torch| over the stage's output. Also times one MLX forward pass.
"""

import argparse
import json
import time

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)
import mlx.core as mx
import numpy as np
import torch

from mlx_aim.models.config import PRESET_NAMES, get_config
from mlx_aim.models.model import build_model, build_probe, with_probe
from mlx_aim.checkpoints.weights import load_state_dict
from torch_reference import AIMReference, state_dict_numpy  # benchmarks/, this script's folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESET_NAMES, default="aim-600M")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--attention", choices=["bidirectional", "causal", "prefix"], default="bidirectional")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    config = get_config(args.preset)
    torch.manual_seed(0)
    ref = AIMReference.from_config(config).randomize_norms(0).eval()
    model = with_probe(build_model(config), build_probe(config))  # the trunk and its head, both the reference's
    load_state_dict(model, {k: mx.array(v) for k, v in state_dict_numpy(ref).items()}, "reference")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, config.image_size, config.image_size, 3), dtype=np.float32)
    prefix = rng.integers(1, config.num_patches, args.batch_size) if args.attention == "prefix" else None
    ref_out = ref.stages(torch.from_numpy(images.transpose(0, 3, 1, 2)), args.attention, prefix)

    x = mx.array(images)
    start = time.perf_counter()
    prefix_len = None if prefix is None else mx.array(prefix)
    normed, feats = model.extract_features(x, config.max_block_id, args.attention, prefix_len)
    probe_in = mx.stack([feats[i] for i in config.probe_layers]).mean(axis=0)
    logits, pooled = model.head(probe_in)
    mx.eval(normed, logits, pooled)
    seconds = time.perf_counter() - start
    ours = {"preprocessor": model.preprocessor(x), "trunk": normed, "probe_input": probe_in, "logits": logits,
            "pooled": pooled}
    ours.update({f"block_{i}": f for i, f in enumerate(feats)})

    def err(k):
        a, b = np.asarray(ours[k], np.float64), ref_out[k].numpy().astype(np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    errors = {k: err(k) for k in ref_out}
    blocks = [v for k, v in errors.items() if k.startswith("block_")]
    for k in ("preprocessor", "trunk", "probe_input", "pooled", "logits"):
        print(f"{k:>14}: {errors[k]:.2e}")
    print(f"{'blocks':>14}: max {max(blocks):.2e} over {len(blocks)} blocks")
    print(f"MLX forward (first call, batch {args.batch_size}, float32): {seconds:.2f} s")
    if args.json:
        print(json.dumps({"errors": errors, "forward_s": seconds}))


if __name__ == "__main__":
    main()
