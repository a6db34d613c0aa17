"""Measure conversion and loading of full-size checkpoints: time and peak resident memory.

Writes a random-weight checkpoint of a released architecture with real `torch.save` (Apple's split
backbone/head files; needs PyTorch, as a reference tool only), converts it with `convert/convert.py`, then
loads the result in float32, bfloat16 and 4-bit, each in a fresh process so that `ru_maxrss` (which also
counts touched pages of memory-mapped files) is the peak of that step alone.

    python benchmarks/bench_checkpoints.py --preset aim-600M aim-1B --workdir /tmp/aimbench
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, sys, time
import mlx.core as mx, mlx_aim
from mlx_aim import platforms
start = time.perf_counter()
model = mlx_aim.load(sys.argv[1], dtype=sys.argv[2] or None, quantize=int(sys.argv[3]) or None)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": platforms.peak_rss_bytes() / 2**20}))
"""


def write_random_checkpoint(preset: str, folder: Path) -> list[Path]:
    import torch

    from mlx_aim.models.config import get_config
    from mlx_aim.checkpoints.hub import APPLE_FILE_STEMS

    c = get_config(preset)
    d, hidden, p = c.width, int(c.width * c.mlp_ratio), c.patch_size
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    backbone = {
        "preprocessor.patchifier.proj.weight": rand(d, 3, p, p),
        "preprocessor.patchifier.proj.bias": rand(d),
        "preprocessor.patchifier.norm.weight": torch.ones(d),
        "preprocessor.patchifier.norm.bias": torch.zeros(d),
    }
    for i in range(c.depth):
        b = f"trunk.blocks.{i}."
        backbone.update({
            b + "norm_1.weight": torch.ones(d), b + "norm_1.bias": torch.zeros(d),
            b + "attn.qkv.weight": rand(3 * d, d), b + "attn.proj.weight": rand(d, d),
            b + "norm_2.weight": torch.ones(d), b + "norm_2.bias": torch.zeros(d),
            b + "mlp.fc1.weight": rand(hidden, d), b + "mlp.fc2.weight": rand(d, hidden),
        })
    backbone.update({"trunk.post_trunk_norm.weight": torch.ones(d), "trunk.post_trunk_norm.bias": torch.zeros(d)})
    head = {
        "head.k.weight": rand(d, d), "head.v.weight": rand(d, d), "head.cls_token": rand(1, 1, d),
        "head.linear.weight": rand(1000, d), "head.bn.running_mean": rand(d), "head.bn.running_var": torch.ones(d),
        "head.bn.num_batches_tracked": torch.tensor(0),
    }
    stem = APPLE_FILE_STEMS[preset]
    files = [folder / f"{stem}_backbone.pth", folder / f"{stem}_head_best_layers.pth"]
    torch.save(backbone, files[0])
    torch.save(head, files[1])
    return files


def run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["aim-600M", "aim-1B"])
    p.add_argument("--workdir", default="/tmp/mlx_aim_bench")
    p.add_argument("--keep", action="store_true", help="keep the files written")
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-checkpoint", nargs=2, metavar=("PRESET", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_checkpoint:
        preset, folder = args.write_checkpoint
        print(json.dumps([str(f) for f in write_random_checkpoint(preset, Path(folder))]))
        return

    rows = []
    for preset in args.preset:
        work = Path(args.workdir) / preset
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # In a child process: ru_maxrss of later children would otherwise start from this process's
        # peak (Linux carries the parent's high-water mark across fork and exec).
        files = run_json([sys.executable, __file__, "--write-checkpoint", preset, str(work)])
        files = [Path(f) for f in files]
        size_gb = sum(f.stat().st_size for f in files) / 1e9
        converted = run_json([sys.executable, str(ROOT / "convert" / "convert.py"), *map(str, files),
                              "--out", str(work / "mlx"), "--json"])
        row = {"preset": preset, "checkpoint_gb": round(size_gb, 2),
               "convert_s": round(converted["seconds"], 1), "convert_peak_rss_mb": round(converted["peak_rss_mb"])}
        q4 = run_json([sys.executable, str(ROOT / "convert" / "convert.py"), *map(str, files),
                       "--out", str(work / "mlx-q4"), "--quantize", "--q-bits", "4", "--json"])
        row.update({"convert_q4_s": round(q4["seconds"], 1), "convert_q4_peak_rss_mb": round(q4["peak_rss_mb"])})
        for label, folder, dtype, bits in [("float32", "mlx", "", 0), ("bfloat16", "mlx", "bfloat16", 0),
                                           ("4-bit", "mlx-q4", "", 0)]:
            loaded = run_json([sys.executable, "-c", LOAD, str(work / folder), dtype, str(bits)])
            row[f"load_{label}_s"] = round(loaded["seconds"], 1)
            row[f"load_{label}_peak_rss_mb"] = round(loaded["peak_rss_mb"])
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
