"""The optimizer's share of a pre-training step: `TrainStep.gradients` (forward and backward) against `TrainStep.apply`
(global-norm clipping and AdamW), the latter on the portable path (MLX's ops: `optim.clip_grad_norm` and
`mlx.optimizers.AdamW`) and on the native one (`mlx_aim.backend.native.adamw_update`, one multithreaded kernel over the
whole parameter tree), alternating in one process on the same model and gradients.

    python benchmarks/bench_optimizer.py --preset aim-small --batch-size 4
    python benchmarks/bench_optimizer.py --preset aim-small --batch-size 4 --repeats 2 --block 3 --with-gradients

Each path's update is traced once with its setting (`backend.native_kernels`) and keeps it: a compiled function keeps
the path it was traced with. Each round runs a block of consecutive updates of each path, the paths' order reversed
every round, and times all but the first update of a block: training runs one path, and an update right after the
other path's measured up to 2x off here (the buffers it reuses and the caches it finds are the other path's). Medians
and minima are printed, with the CPU model and the load average (the machine may be shared: compare the paths within
one run).
"""

import argparse
import json
import os
import time

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)


def measure(steps: dict, first, images, prefix, count: int, args) -> dict[str, list[float]]:
    """Seconds of each `TrainStep.gradients` call and of each path's `TrainStep.apply`, the paths alternating."""
    import mlx.core as mx

    from mlx_aim import backend

    def gradients():
        loss, grads = first.gradients(images, prefix, count)
        mx.eval(loss, grads)
        return loss, grads

    loss, grads = gradients()
    for path, step in steps.items():  # the trace (and first call) of each path's update, with its setting
        with backend.native_kernels(path == "native"):
            step.apply(loss, grads)
    times = {"gradients": [], **{f"apply {path}": [] for path in args.paths}}
    for r in range(args.repeats):
        for path in args.paths if r % 2 == 0 else args.paths[::-1]:
            for call in range(args.block):
                if args.with_gradients:  # as in training: each update follows a forward and backward
                    start = time.perf_counter()
                    loss, grads = gradients()
                    times["gradients"].append(time.perf_counter() - start)
                start = time.perf_counter()
                steps[path].apply(loss, grads)
                if call > 0:  # the first update of a block follows the other path's, whose buffers it inherits
                    times[f"apply {path}"].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="aim-small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="rounds: a block of updates of each path per round")
    p.add_argument("--block", type=int, default=3, help="consecutive updates of one path, all but the first timed")
    p.add_argument("--with-gradients", action="store_true",
                   help="a forward and backward (TrainStep.gradients, timed too) before every update, as in training")
    p.add_argument("--threads", type=int, default=0, help="native kernels' and BLAS threads (0: leave them)")
    p.add_argument("--paths", nargs="+", default=["portable", "native"], choices=["portable", "native"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_aim import backend, platforms
    from mlx_aim.models.config import get_config
    from mlx_aim.models.model import build_model
    from mlx_aim.training.pretrain import TrainConfig, TrainStep, make_optimizer, step_prefix_len

    mc = get_config(args.preset)
    tc = TrainConfig(steps=1000, batch_size=args.batch_size)
    model = build_model(mc, seed=0, pretraining=True)
    mx.eval(model.parameters())
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    steps = {path: TrainStep(model, optimizer, tc) for path in args.paths}
    images = np.random.default_rng(0).standard_normal((args.batch_size, mc.image_size, mc.image_size, 3),
                                                      dtype=np.float32)
    prefix = step_prefix_len(0, 1, args.batch_size, mc.num_patches, "prefix")
    count = int((mc.num_patches - prefix).sum())
    first = steps[args.paths[0]]

    with backend.compute_threads(args.threads):
        times = measure(steps, first, images, prefix, count, args)
    cpu = platforms.probe_cpu_record()
    load = [f"{x:.2f}" for x in os.getloadavg()]  # 1, 5 and 15 minutes (Linux and macOS)
    result = {
        "preset": args.preset, "batch_size": args.batch_size, "repeats": args.repeats,
        "parameters": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
        "cpu": cpu, "loadavg": load, "threads": args.threads or None,
        "median_s": {k: float(np.median(v)) for k, v in times.items() if v},
        "min_s": {k: float(np.min(v)) for k, v in times.items() if v},
    }
    if "apply portable" in times and "apply native" in times:
        result["portable / native (median)"] = result["median_s"]["apply portable"] / result["median_s"]["apply native"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.preset}, batch {args.batch_size}, {result['parameters'] / 1e6:.1f}M parameters; CPU {cpu}; "
              f"load {' '.join(load)}")
        for k in result["median_s"]:
            print(f"  {k:16s} median {result['median_s'][k]:.3f} s  min {result['min_s'][k]:.3f} s")
        if "portable / native (median)" in result:
            print(f"  apply: portable / native = {result['portable / native (median)']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
