"""Where blocked attention (`mlx_aim.backend.native.flash_attention`) pays against the native attention that
materialises the (N, N) weights (`native.attention`): softmax(scale q k^T) v at AIMv2-large's shape (16 heads x 64
dims, batch 1) over a range of token counts, forward and forward+backward, time and MLX's peak memory for each.

The two kernels alternate within each round (the order reversed every round) and the best time of the rounds is
reported, so load from other processes falls on both. The crossover this prints is what
`mlx_aim.backend.FLASH_ATTENTION_MIN_TOKENS` records.

    python benchmarks/bench_long_attention.py --threads 1
    python benchmarks/bench_long_attention.py --tokens 256 1024 4096 --rounds 5 --json
"""

import argparse
import json
import os
import time

from mlx_aim import backend, platforms  # first: mlx_aim binds MLX to the optimized BLAS before mlx.core loads
from mlx_aim.backend import native

import mlx.core as mx  # noqa: E402


def kernels(scale: float) -> dict:
    return {"dense": lambda q, k, v: native.attention(q, k, v, scale),
            "blocked": lambda q, k, v: native.flash_attention(q, k, v, scale)}


def forward_and_backward(fn):
    def loss(q, k, v):
        return (fn(q, k, v) * mx.cos(mx.arange(q.shape[-1], dtype=mx.float32))).sum()
    return mx.grad(loss, argnums=(0, 1, 2))


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    mx.eval(fn(*args))
    return time.perf_counter() - start


def peak_bytes(fn, *args) -> int:
    """MLX's peak allocation during one call, above what the inputs already hold."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn(*args))
    return mx.get_peak_memory() - before


def measure(tokens: int, heads: int, dim: int, rounds: int) -> dict:
    q, k, v = (mx.random.normal((1, heads, tokens, dim)) for _ in range(3))
    mx.eval(q, k, v)
    result = {"tokens": tokens}
    for mode in ("forward", "backward"):
        fns = kernels(dim ** -0.5)
        if mode == "backward":
            fns = {name: forward_and_backward(fn) for name, fn in fns.items()}
        for fn in fns.values():
            seconds(fn, q, k, v)  # warm-up
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(seconds(fns[name], q, k, v))
        for name in fns:
            result[f"{mode}_{name}_ms"] = 1e3 * min(times[name])
            result[f"{mode}_{name}_peak_mib"] = peak_bytes(fns[name], q, k, v) / 2 ** 20
        result[f"{mode}_blocked_over_dense"] = result[f"{mode}_blocked_ms"] / result[f"{mode}_dense_ms"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 576, 1024, 2304, 4096])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="BLAS and native threads (0: the libraries' own)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    cpu = platforms.probe_cpu_record()
    rows = []
    with mx.stream(mx.cpu), backend.compute_threads(args.threads):
        for tokens in args.tokens:
            rows.append(measure(tokens, args.heads, args.dim, args.rounds))
            if not args.json:
                r = rows[-1]
                print(f"N={tokens:5d}  forward dense {r['forward_dense_ms']:8.1f} ms blocked {r['forward_blocked_ms']:8.1f}"
                      f" ms ({r['forward_blocked_over_dense']:.2f}x)  fwd+bwd dense {r['backward_dense_ms']:8.1f} ms"
                      f" blocked {r['backward_blocked_ms']:8.1f} ms ({r['backward_blocked_over_dense']:.2f}x)  peak MiB"
                      f" fwd {r['forward_dense_peak_mib']:.0f}/{r['forward_blocked_peak_mib']:.0f}"
                      f" bwd {r['backward_dense_peak_mib']:.0f}/{r['backward_blocked_peak_mib']:.0f}", flush=True)
    load = os.getloadavg()[0]
    summary = {"cpu": cpu, "load_average_1min": load, "threads": args.threads, "rows": rows}
    print(json.dumps(summary) if args.json else f"cpu {cpu}, load average {load}, threads {args.threads}")


if __name__ == "__main__":
    main()
