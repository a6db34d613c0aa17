"""Training throughput of the compiled pre-training step (images/s), without data loading.

    python benchmarks/pretrain_bench.py --preset aim-tiny --batch-size 64 --steps 6 --dtype float32 [--json]

Random normalised images stand in for data, so this measures the model and optimizer step alone (the
loader's own speed shows in scripts/pretrain.py's images/s). The first step compiles and is not timed.
`import mlx_aim` comes first, so that on Linux MLX uses an optimized BLAS where one is installed
(MLX_AIM_BLAS=off measures MLX's bundled reference BLAS).
"""

import argparse
import json
import os
import sys
import time

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="aim-tiny")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one compiling step)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mlx_aim import blas_info
    from mlx_aim.models.config import get_config
    from mlx_aim.models.model import build_model
    from mlx_aim.training.pretrain import TrainConfig, TrainStep, make_optimizer, step_prefix_len

    overrides = {"image_size": args.image_size} if args.image_size else {}
    mc = get_config(args.preset, **overrides)
    tc = TrainConfig(steps=1000, batch_size=args.batch_size, grad_accum=args.grad_accum, dtype=args.dtype)
    model = build_model(mc, seed=0, pretraining=True)
    mx.eval(model.parameters())
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, tc)
    blas = blas_info()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, mc.image_size, mc.image_size, 3)).astype(np.float32)
    times, losses = [], []
    for s in range(1, args.steps + 2):
        prefix = step_prefix_len(0, s, args.batch_size, mc.num_patches, "prefix")
        start = time.perf_counter()
        loss, _ = step(images, prefix, int((mc.num_patches - prefix).sum()))
        losses.append(float(loss))
        times.append(time.perf_counter() - start)
    timed = times[1:]
    result = {
        "preset": args.preset, "image_size": mc.image_size, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "dtype": args.dtype, "timed_steps": len(timed),
        "compile_step_s": times[0], "step_s": float(np.median(timed)),
        "images_per_s": args.batch_size / float(np.median(timed)),
        "blas": blas.get("name") if blas.get("loaded") else f"reference ({blas.get('reason')})",
        "device": str(mx.default_device()), "cpu_count": os.cpu_count(), "losses": losses,
    }
    print(f"{args.preset} {mc.image_size}px {args.dtype} batch {args.batch_size}: {result['images_per_s']:.2f} "
          f"images/s ({result['step_s']:.3f} s/step, median of {len(timed)}; compile step "
          f"{times[0]:.1f} s; BLAS {result['blas']})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
