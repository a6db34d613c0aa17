"""Measure the CPU-side kernels AIM leans on, with and without the optimized-BLAS preload, in one run.

Each BLAS setting runs in a fresh process (MLX binds its CBLAS once, when mlx.core loads), set through
MLX_AIM_BLAS: `0` keeps MLX's bundled reference BLAS, `auto` lets mlx_aim pick, a path names a library.
Reports float32 matmul GFLOP/s (square sizes and AIM-600M's MLP shape), GELU (nn.gelu, mlx_aim.backend.ops.gelu and, where
built, mlx_aim.backend.native.gelu: forward and compiled forward+backward), layer norm (mx.fast, native), and attention
(mx.fast.scaled_dot_product_attention, ops.attention, native.attention: forward and compiled forward+backward).
With --torch, PyTorch's CPU kernels are timed in the same processes for reference (reference tool only).
With --block, one pre-norm block's forward+backward (compiled, prefix mask) at aim-small's pre-training
shapes (batch 4 x 256 tokens; the trunk's width 384 and the pixel head's 512), whole and with its GELU or
its attention core (softmax(q k^T) v) replaced by the identity, next to the same linears' matmuls alone:
where a training step's time goes.

    python benchmarks/bench_kernels.py --torch
    python benchmarks/bench_kernels.py --blas auto --block --torch
    python benchmarks/bench_kernels.py --blas 0 auto /usr/lib/x86_64-linux-gnu/libopenblas.so.0 --reps 20

Times are the best of wall-clock repeats. On a busy machine threaded kernels wait for descheduled
threads at every barrier; `--threads 1` gives steadier numbers there (it sets OMP_NUM_THREADS,
MKL_NUM_THREADS, OPENBLAS_NUM_THREADS and MLX_AIM_NATIVE_THREADS for every process, and torch's thread count).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best_seconds(fn, reps: int, budget_s: float = 4.0) -> float:
    """Shortest wall time of fn() over repeats after one warm-up call (the least disturbed by other load,
    as timeit advises); fewer repeats when one call is slow."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = max(1, min(reps, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def child(reps: int, sizes: list[int], with_torch: bool, with_block: bool = False) -> dict:
    if with_torch:
        # Before mlx_aim: torch then keeps its own BLAS instead of calling the library preloaded for MLX.
        import torch  # noqa: F401

    from mlx_aim import blas_info  # before mlx.core: importing mlx_aim loads the optimized BLAS MLX binds to

    import mlx.core as mx
    import mlx.nn as nn

    from mlx_aim.backend import native, ops

    results = {"blas": blas_info(), "rows": [], "native": native.available() or native.unavailable_reason()}

    def record(kind, what, seconds, flops=None):
        row = {"kind": kind, "what": what, "ms": seconds * 1e3}
        if flops:
            row["gflops"] = flops / seconds / 1e9
        results["rows"].append(row)

    mx.random.seed(0)
    shapes = [(n, n, n) for n in sizes] + [(512, 1536, 6144)]  # AIM-600M fc1 at batch 2 (2 x 256 tokens)
    for m, k, n in shapes:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        record("matmul fp32", f"{m}x{k} @ {k}x{n}", best_seconds(lambda: mx.eval(a @ b), reps), 2 * m * k * n)

    gelus = [("nn.gelu", nn.gelu), ("ops.gelu", ops.gelu)] + ([("native.gelu", native.gelu)] if native.available()
                                                               else [])
    gelu_grad = {}
    for name, fn in gelus:
        gelu_grad[name] = mx.compile(mx.grad(lambda v, fn=fn: fn(v).sum()))
    for shape in [(512, 6144), (2, 256, 6144)]:
        x = mx.random.normal(shape)
        mx.eval(x)
        label = "x".join(map(str, shape))
        for name, fn in gelus:
            record(f"gelu {name}", label, best_seconds(lambda: mx.eval(fn(x)), reps))
            record(f"gelu {name} fwd+bwd (compiled)", label, best_seconds(lambda: mx.eval(gelu_grad[name](x)), reps))

    x = mx.random.normal((2, 256, 1536))
    w, b = mx.random.normal((1536,)), mx.random.normal((1536,))
    mx.eval(x, w, b)
    norms = [("layer_norm mx.fast", mx.fast.layer_norm)] + ([("layer_norm native", native.layer_norm)]
                                                            if native.available() else [])
    c = mx.random.normal(x.shape)
    for name, fn in norms:
        record(name, "2x256x1536", best_seconds(lambda: mx.eval(fn(x, w, b, 1e-6)), reps))
        grad = mx.compile(mx.grad(lambda a, g, h, fn=fn: (fn(a, g, h, 1e-6) * c).sum(), argnums=(0, 1, 2)))
        record(f"{name} fwd+bwd (compiled)", "2x256x1536", best_seconds(lambda: mx.eval(grad(x, w, b)), reps))

    q, k, v = (mx.random.normal((2, 12, 256, 128)) for _ in range(3))
    mx.eval(q, k, v)
    scale = 128 ** -0.5
    attentions = [("sdpa mx.fast", lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=scale)),
                  ("attention ops.attention", lambda a, b, c: ops.attention(a, b, c, scale))]
    if native.available():
        attentions.append(("attention native.attention", lambda a, b, c: native.attention(a, b, c, scale)))
    w = mx.random.normal(q.shape)
    mx.eval(w)
    for name, fn in attentions:
        record(name, "2x12x256x128", best_seconds(lambda: mx.eval(fn(q, k, v)), reps))
        grad = mx.compile(mx.grad(lambda a, b, c, fn=fn: (fn(a, b, c) * w).sum(), argnums=(0, 1, 2)))
        record(f"{name} fwd+bwd (compiled)", "2x12x256x128", best_seconds(lambda: mx.eval(grad(q, k, v)), reps))

    if with_torch:
        import torch
        import torch.nn.functional as F

        results["torch_threads"] = torch.get_num_threads()
        with torch.no_grad():
            for m, k, n in shapes:
                ta, tb = torch.randn(m, k), torch.randn(k, n)
                record("matmul fp32 torch", f"{m}x{k} @ {k}x{n}", best_seconds(lambda: ta @ tb, reps), 2 * m * k * n)
            for shape in [(512, 6144), (2, 256, 6144)]:
                tx = torch.randn(*shape)
                record("gelu torch F.gelu", "x".join(map(str, shape)), best_seconds(lambda: F.gelu(tx), reps))
            tx, tw, tb = torch.randn(2, 256, 1536), torch.randn(1536), torch.randn(1536)
            ln = lambda: F.layer_norm(tx, (1536,), tw, tb, 1e-6)  # noqa: E731
            record("layer_norm torch", "2x256x1536", best_seconds(ln, reps))
            tq, tk, tv = (torch.randn(2, 12, 256, 128) for _ in range(3))
            record("sdpa torch", "2x12x256x128", best_seconds(lambda: F.scaled_dot_product_attention(tq, tk, tv), reps))
        tq, tk, tv = (torch.randn(2, 12, 256, 128, requires_grad=True) for _ in range(3))
        tw = torch.randn(2, 12, 256, 128)

        def torch_sdpa_fwd_bwd():
            for t in (tq, tk, tv):
                t.grad = None
            (F.scaled_dot_product_attention(tq, tk, tv) * tw).sum().backward()

        record("sdpa torch fwd+bwd", "2x12x256x128", best_seconds(torch_sdpa_fwd_bwd, reps))
        tx = torch.randn(512, 6144, requires_grad=True)

        def torch_gelu_fwd_bwd():
            tx.grad = None
            F.gelu(tx).sum().backward()

        record("gelu torch F.gelu fwd+bwd", "512x6144", best_seconds(torch_gelu_fwd_bwd, reps))
        lx, lw, lb = (torch.randn(*shape, requires_grad=True) for shape in [(2, 256, 1536), (1536,), (1536,)])
        lc = torch.randn(2, 256, 1536)

        def torch_layer_norm_fwd_bwd():
            for t in (lx, lw, lb):
                t.grad = None
            (F.layer_norm(lx, (1536,), lw, lb, 1e-6) * lc).sum().backward()

        record("layer_norm torch fwd+bwd", "2x256x1536", best_seconds(torch_layer_norm_fwd_bwd, reps))
    if with_block:
        block_profile(record, reps, with_torch)
    return results


BLOCK_SHAPES = [(384, 6), (512, 8)]  # (width, heads): aim-small's trunk and its pixel head
BLOCK_BATCH, BLOCK_TOKENS = 4, 256


def block_profile(record, reps: int, with_torch: bool) -> None:
    """One block's compiled forward+backward, whole and without each of its element-wise-heavy parts."""
    import numpy as np

    import mlx.core as mx

    from mlx_aim.models import layers

    B, N = BLOCK_BATCH, BLOCK_TOKENS
    prefix = np.random.default_rng(0).integers(1, N, B)
    for dim, heads in BLOCK_SHAPES:
        label = f"{B}x{N}x{dim}"
        block = layers.aim_block(dim, heads, 4.0, 1e-6)
        x, r = mx.random.normal((B, N, dim)), mx.random.normal((B, N, dim))
        mask = layers.prefix_causal_mask(mx.array(prefix.astype(np.int32)), N)
        mx.eval(block.parameters(), x, r, mask)

        def loss(params, x):
            block.update(params)
            return (block(x, mask) * r).sum()

        def timed(what):
            grad = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)), inputs=[block.state])

            def step():
                params = block.trainable_parameters()
                value, grads = grad(params, x)
                block.update(params)  # the arrays themselves back in place of the traced ones
                mx.eval(value, grads)

            record("block fwd+bwd", f"{label} {what}", best_seconds(step, reps))

        timed("whole")
        gelu, attention = layers.gelu, layers.qkv_attention
        try:
            layers.gelu = lambda z: z
            timed("without GELU")
            layers.gelu = gelu
            layers.qkv_attention = lambda qkv, heads, scale, mask=None: qkv[..., 2 * dim:]  # v, as it is
            timed("without attention core")
        finally:
            layers.gelu, layers.qkv_attention = gelu, attention
        # The block's four linears: forward, input gradient and weight gradient.
        mats = [(mx.random.normal((B * N, i)), mx.random.normal((o, i))) for o, i in
                [(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)]]
        mx.eval(mats)

        def matmuls():
            out = []
            for a, w in mats:
                y = a @ w.T
                out += [y, y @ w, y.T @ a]
            mx.eval(out)

        record("block fwd+bwd", f"{label} linears' matmuls only", best_seconds(matmuls, reps))
        if with_torch:
            import torch

            from torch_reference import Block, torch_mask

            tblock = Block(dim, heads)
            tx = torch.randn(B, N, dim, requires_grad=True)
            tr = torch.randn(B, N, dim)
            tmask = torch_mask("prefix", N, prefix)

            def torch_step():
                tblock.zero_grad(set_to_none=True)
                tx.grad = None
                (tblock(tx, tmask) * tr).sum().backward()

            record("block fwd+bwd torch", f"{label} whole", best_seconds(torch_step, reps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blas", nargs="+", default=["0", "auto"],
                        help="MLX_AIM_BLAS settings to compare, each in its own process (default: 0 auto)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024, 2048],
                        help="square float32 matmul sizes")
    parser.add_argument("--reps", type=int, default=10, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's CPU kernels for reference")
    parser.add_argument("--threads", type=int, help="BLAS / OpenMP / torch threads (default: theirs, all cores)")
    parser.add_argument("--block", action="store_true",
                        help="also profile one block's forward+backward at aim-small's pre-training shapes")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.reps, args.sizes, args.torch, args.block)))
        return

    runs = {}
    for setting in args.blas:
        env = dict(os.environ, MLX_AIM_BLAS=setting)
        if args.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MLX_AIM_NATIVE_THREADS"):
                env[var] = str(args.threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--reps", str(args.reps),
               "--sizes", *map(str, args.sizes)] + (["--torch"] if args.torch else []) \
            + (["--block"] if args.block else [])
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"MLX_AIM_BLAS={setting}: benchmark process failed:\n{proc.stderr[-3000:]}")
        runs[setting] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    native_status = next(iter(runs.values()))["native"]
    print("native kernels: " + ("built" if native_status is True else f"not used ({native_status})"))
    for setting, result in runs.items():
        info = result["blas"]
        extra = f", torch threads {result['torch_threads']}" if "torch_threads" in result else ""
        print(f"MLX_AIM_BLAS={setting}: {info['name'] or 'reference BLAS'} ({info['reason']}){extra}")
    settings = list(runs)
    keys = [(r["kind"], r["what"]) for r in runs[settings[0]]["rows"]]
    width = max(len(f"{kind} {what}") for kind, what in keys)
    print(f"{'':{width}}  " + "  ".join(f"{'BLAS=' + os.path.basename(s):>18}" for s in settings))
    for kind, what in keys:
        cells = []
        for setting in settings:
            row = next(r for r in runs[setting]["rows"] if (r["kind"], r["what"]) == (kind, what))
            cells.append(f"{row['gflops']:9.1f} GFLOP/s" if "gflops" in row else f"{row['ms']:15.2f} ms")
        print(f"{kind + ' ' + what:{width}}  " + "  ".join(f"{c:>18}" for c in cells))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
