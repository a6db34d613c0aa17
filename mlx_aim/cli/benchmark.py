"""Speed and memory of mlx-aim on this machine, and PyTorch on the same model and weights in the same run.

    mlx-aim benchmark --preset aim-600M --quantize 4 --json
    python scripts/benchmark.py --preset aim-600M --batch-size 2 --compare-torch
    python scripts/benchmark.py --preset aim-small --train-only --batch-size 4 --compare-torch
    python scripts/benchmark.py --preset aimv2-large-patch14-224 --batch-size 1 --compare-torch
    mlx-aim benchmark --preset aimv2-large-patch14-native --image-size 448   # 1024 patches
    mlx-aim benchmark --memory-suite          # aim-1B float32 / bfloat16 / 4-bit, aim-7B 4-bit
    mlx-aim benchmark --memory-suite aimv2    # aimv2-3B bfloat16 / 4-bit
    python scripts/benchmark.py --preset aim-600M --finetune lora --batch-size 8 --compare-torch
    mlx-aim benchmark --memory-suite finetune # fine-tuning: aim-600M LoRA and full, aim-7B QLoRA

An AIMv2 preset times its encoder (every block and the final norm; Apple released no heads) against
transformers' Aimv2VisionModel. --compare-torch runs from a clone of the repository (the PyTorch references are
not installed with the package); run it as `python scripts/benchmark.py`, which imports PyTorch before MLX binds
its BLAS, so that PyTorch runs with its own kernels. See mlx_aim/apps/benchmark.py for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..apps import benchmark
from .. import blas_info
from ..models.config import PRESET_NAMES
from .options import (
    add_max_patches_option, add_model_options, add_output_options, non_negative_int, positive_int, quantization,
)
from .output import EXIT_OK, CommandError, format_bytes, print_json, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="aim-600M", choices=PRESET_NAMES)
    p.add_argument("--weights", help="an MLX model folder to load instead of random weights (times the load too)")
    p.add_argument("--image-size", type=positive_int,
                   help="override the preset's image size; for a native-resolution model, the side of its square "
                        f"inputs (default {benchmark.NATIVE_IMAGE_SIZE})")
    add_model_options(p, dtype_help="default: float32")
    add_max_patches_option(p)
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--text-batch-size", type=positive_int, default=16,
                   help="AIMv2-LiT: texts per call of its text tower (its image tower takes --batch-size)")
    p.add_argument("--train", action="store_true", help="also time one pre-training step")
    p.add_argument("--train-only", action="store_true", help="time only the pre-training step")
    p.add_argument("--train-batch-size", type=positive_int,
                   help="batch of the pre-training step (default: --batch-size)")
    p.add_argument("--finetune", choices=["lora", "full"],
                   help="time one fine-tuning step of an AIM trunk instead: LoRA (rank 8 on qkv and proj, with the "
                        "probe; with --quantize, QLoRA) or full")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="--finetune: recompute each block's activations in the backward pass")
    p.add_argument("--compare-torch", action="store_true",
                   help="time PyTorch on the same model and weights in the same run, alternating")
    p.add_argument("--torch-device", default="cpu",
                   help="where PyTorch runs with --compare-torch: cpu (default), mps (a Mac's GPU, against MLX on Metal) "
                        "or cuda (against MLX's CUDA backend)")
    p.add_argument("--threads", type=positive_int,
                   help="BLAS threads for MLX's matmuls and torch's thread count (default: the libraries' own, "
                        "all cores); on a machine busy with other work, 1 can be fastest")
    p.add_argument("--compile", action="store_true", help="time the inference forward under mx.compile")
    p.add_argument("--warmup", type=non_negative_int, default=2,
                   help="untimed calls, the first (compiling) one included")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls; the median is reported")
    p.add_argument("--memory-suite", nargs="?", const="aim", choices=[*benchmark.MEMORY_SUITES, "finetune"],
                   help="peak memory of load + forward: aim (the default) aim-1B float32/bfloat16/4-bit and aim-7B "
                        "4-bit; aimv2: aimv2-3B bfloat16 and 4-bit; lit: aimv2-large-patch14-224-lit float32 and "
                        "4-bit; finetune: fine-tuning steps of aim-600M (LoRA and full, batch 8) and aim-7B (QLoRA "
                        "4-bit, batch 1, --grad-checkpoint)")
    p.add_argument("--work-dir", help="where --memory-suite writes its random-weight folders (default: temp)")
    add_output_options(p, json_help="print one JSON object (last line) instead of the table")
    return p


def format_table(result: dict) -> str:
    """`benchmark.measure`'s result as a table: one row per framework and measurement, then notes."""
    m = result["machine"]
    blas = m["blas"]
    blas_text = "MLX's own"
    if blas.get("loaded"):
        blas_text = (f"{blas.get('name')}" + (f" ({blas['core']})" if blas.get("core") else "")
                     + (f", {blas['threads']} threads" if blas.get("threads") else ""))
    cores = (f"{m['performance_cores']}+{m.get('efficiency_cores', 0)} performance+efficiency cores"
             if "performance_cores" in m else f"{m['cpu_count']} CPUs")
    lines = [f"mlx-aim {m['mlx_aim']} benchmark | mlx {m['mlx']} on {m['device']} ({m['backend_path']} path), "
             + (f"{m['cpu_model']}, " if m.get("cpu_model") else "") + f"{cores}, "
             f"BLAS {blas_text}" + (f", load average {m['load_average_1min']:.1f}" if "load_average_1min" in m else "")]
    if "torch" in m:
        lines.append(f"torch {m['torch']['version']} ({m['torch']['threads']} threads, BLAS {m['torch']['blas']})")
    peak = result["matmul_peak_gflops"]
    lines.append("float32 matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    header = ("task", "model", "framework", "dtype", "batch", "images/s", "latency ms", "min ms", "GFLOP/s",
              "% peak", "first s")
    table = [header]
    for r in result["runs"]:
        for name, t in r["timings"].items():
            dtype = r["dtype"] if name == "mlx" else r.get("torch_dtype", r["dtype"])
            if name == "mlx" and r.get("quantization"):
                dtype = f"{dtype} q{r['quantization']['bits']}"
            size = f"{r['image_size']}px" if r.get("image_size") else f"{r.get('context_length')} tokens"
            table.append((r["task"], f"{r['config']} {size}", name, dtype, str(r["batch_size"]),
                          f"{t['images_per_s']:.3g}", f"{t['median_s'] * 1e3:.0f}", f"{t['min_s'] * 1e3:.0f}",
                          f"{t['gflops']:.1f}", f"{t['percent_of_peak']:.0f}", f"{t['first_s']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in result["runs"]:
        notes = []
        if "ratio_mlx_over_torch" in r:
            unit = "texts/s" if r.get("context_length") else "images/s"
            notes.append(f"MLX / torch {unit} = {r['ratio_mlx_over_torch']:.2f}x")
        if "max_rel_diff" in r:
            notes.append(f"outputs differ by {r['max_rel_diff']:.1e} (relative)")
        if "num_patches" in r:
            notes.append(f"{r['num_patches']} patches per image" + (" (native resolution)" if r["native"] else ""))
        if "ratio_mlx_over_torch_counted_rows" in r:
            notes.append(f"MLX / torch with its head on the counted rows too = "
                         f"{r['ratio_mlx_over_torch_counted_rows']:.2f}x")
        if "first_losses" in r:
            notes.append("first losses " + " ".join(f"{k} {v:.5f}" for k, v in r["first_losses"].items()))
        if "head_rows" in r:
            rows = r["head_rows"]
            notes.append(f"pixel head on {rows['mlx']} rows of {rows['all']} ({rows['counted']} counted, the rest "
                         "padding to a bucketed length)")
        if "load_s" in r:
            notes.append(f"load {r['load_s']:.1f} s ({r['weights']})")
        notes.append(f"weights {format_bytes(r['weight_bytes'])}")
        lines.append(f"{r['task']}: " + "; ".join(notes))
    mem = result["memory"]
    lines.append(f"peak memory: {format_bytes(mem['peak_rss_bytes'])} resident (whole process"
                 + (", torch included" if "torch" in m else "") + f"), {format_bytes(mem['peak_mlx_bytes'])} MLX")
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    """`benchmark.memory_suite`'s rows as a table."""
    header = ("model", "weights", "on disk", "load s", "forward s", "peak resident", "peak / weights")
    table = [header]
    for r in rows:
        what = f"{r['bits']}-bit" if r["bits"] else r["dtype"]
        table.append((r["preset"], what, format_bytes(r["weight_bytes_on_disk"]), f"{r['load_s']:.1f}",
                      f"{r['forward_s']:.1f}", format_bytes(r["peak_rss_bytes"]),
                      f"{r['peak_rss_bytes'] / r['weight_bytes_on_disk']:.2f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"load + one forward (batch {rows[0]['batch_size'] if rows else 1}), each in a fresh process"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def format_finetune_memory(rows: list[dict]) -> str:
    """`benchmark.finetune_memory_suite`'s rows as a table."""
    header = ("model", "mode", "batch", "grad checkpoint", "weights on disk", "trainable", "step s", "peak resident")
    table = [header]
    for r in rows:
        table.append((f"{r['preset']} {r['image_size']}px", r["mode"] + (f" {r['bits']}-bit" if r["bits"] else ""),
                      str(r["batch_size"]), "yes" if r["grad_checkpoint"] else "no",
                      format_bytes(r["weight_bytes_on_disk"]), f"{r['trainable_parameters']:,}",
                      f"{r['step_s']:.1f}", format_bytes(r["peak_rss_bytes"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["load + compiled fine-tuning steps, each model in a fresh process"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.compare_torch:
        try:
            benchmark.torch_reference()  # a missing reference is one line on stderr, before any work
        except benchmark.TorchReferenceUnavailable as error:
            raise CommandError(str(error)) from None
        if "torch" not in sys.modules and blas_info().get("loaded"):
            print("note: PyTorch is imported after mlx_aim bound MLX's BLAS, and calls that BLAS too; for PyTorch "
                  "as its users have it, run python scripts/benchmark.py", file=sys.stderr)
    if args.memory_suite:
        if args.memory_suite == "finetune":
            rows = benchmark.finetune_memory_suite(work_dir=args.work_dir)
        else:
            rows = benchmark.memory_suite(benchmark.MEMORY_SUITES[args.memory_suite], work_dir=args.work_dir)
        if args.json:
            print_json({"machine": benchmark.machine_info(), "memory_suite": rows})
        else:
            print(format_finetune_memory(rows) if args.memory_suite == "finetune" else format_memory(rows))
        return EXIT_OK
    try:
        result = benchmark.measure(
            preset=args.preset, weights=args.weights, image_size=args.image_size, max_patches=args.max_patches,
            dtype=args.dtype, quantize=quantization(args), batch_size=args.batch_size,
            text_batch_size=args.text_batch_size, train=args.train,
            train_only=args.train_only, train_batch_size=args.train_batch_size, finetune=args.finetune,
            grad_checkpoint=args.grad_checkpoint,
            compare_torch=args.compare_torch,
            threads=args.threads, compile=args.compile, warmup=args.warmup, repeats=args.repeats,
            torch_device=args.torch_device,
        )
    except benchmark.TorchReferenceUnavailable as error:  # e.g. transformers missing, for an AIMv2 model
        raise CommandError(str(error)) from None
    if args.json:
        print_json(result)
    else:
        print(format_table(result))
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.grad_checkpoint and not args.finetune:
        parser.error("--grad-checkpoint applies to --finetune")
    if args.finetune and (args.train or args.train_only):
        parser.error("--finetune times a fine-tuning step alone: drop --train and --train-only")
    if (args.train or args.train_only) and (args.quantize or args.weights):
        parser.error("--train times pre-training a fresh float model: drop --quantize and --weights")
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
