"""Fine-tuning with an attentive probe (AIM section 5.5): LoRA adapters and the head trained jointly, or every weight.

    mlx-aim finetune --model BASE --data DIR --out OUT [--rank 8 --alpha 1 --lora-keys qkv,proj] [--quantize 4]
    mlx-aim finetune --model BASE --data DIR --out OUT --fine-tune-type full [--layer-decay 0.75 --drop-path 0.1]

DIR holds one sub-folder per class, or train/ and val/ folders of them (otherwise --val-ratio of it is held out);
every class needs validation images. OUT receives adapters.safetensors and adapter_config.json (mlx-lm's
convention: `mlx_aim.load(BASE, adapters=OUT)` reads them, `mlx-aim fuse` folds them into a model folder), the
latest checkpoint and log.jsonl. --quantize 4|8 loads the base quantized (QLoRA: the base stays quantized and
frozen, the adapters float). --fine-tune-type full trains every weight of a float base (layer-wise lr decay, drop
path) and writes OUT/model, an ordinary model folder. --grad-checkpoint and --dtype bfloat16 save memory (mlx_aim/
training/finetune.py's docstring). `mlx.launch -n 2 python scripts/finetune.py ...` trains data-parallel (--batch-size
is the global batch). Exit status 1: training diverged.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import mlx.core as mx

from ..tasks.encode import peak_memory
from ..training.finetune import FinetuneConfig, finetune
from ..training.runs import TrainingDiverged
from .options import (
    LABELLED_TRAINING_OPTIONS, MODEL_HELP, add_config_options, add_output_options, add_quantize_options, pair,
    quantization,
)
from .output import EXIT_EMPTY, EXIT_OK, CommandError, memory_line, print_json, run_command
from .probe import format_metrics

# FinetuneConfig fields exposed as options; unset options keep FinetuneConfig's defaults (the one place they live).
RECIPE_OPTIONS = [
    ("--fine-tune-type", str, "lora (adapters + head) or full (every weight)"),
    ("--rank", int, "LoRA rank"),
    ("--alpha", float, "LoRA alpha (the scale is alpha / rank)"),
    ("--dropout", float, "LoRA dropout"),
    ("--lora-keys", str, "comma-separated layers of each block to adapt: qkv, proj, fc1, fc2 (fc3 for AIMv2)"),
    ("--num-layers", int, "adapt the last N blocks"),
    ("--layer-decay", float, "full: layer-wise learning-rate decay"),
    ("--drop-path", float, "full: drop-path rate of the last block (rising linearly from 0)"),
    ("--dtype", str, "compute dtype of the trunk: float32 or bfloat16 (adapters, head and optimizer stay float32)"),
    ("--image-size", int, "native-resolution trunks: the side of the square training and validation images "
                          "(None: 224)"),
    ("--crop-scale", pair(float), "random resized crop scale range"),
    ("--seed", int, "seed of the head's and adapters' initialisation, data order and split"),
    ("--eval-interval", int, "steps between evaluations (0: at the end)"),
    ("--eval-batch-size", int, "evaluation batch"),
    ("--log-interval", int, "steps between logged losses"),
] + LABELLED_TRAINING_OPTIONS


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="image folder: class sub-folders, or train/ and val/ of them")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(recipe=add_config_options(p, RECIPE_OPTIONS, FinetuneConfig))
    p.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="train on preprocessed images without random crops and flips")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=argparse.SUPPRESS,
                   help="run the training step uncompiled (compiling costs seconds up front on the CPU backend)")
    p.add_argument("--grad-checkpoint", action="store_true", default=argparse.SUPPRESS,
                   help="recompute each block's activations in the backward pass: less memory, ~1 more forward pass")
    add_quantize_options(p)  # --quantize 4|8: QLoRA, the base quantized and frozen, the adapters float
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--force", action="store_true", help="discard a checkpoint in OUT and start again")
    add_output_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs `finetune` (on every process `mlx.launch` started) and prints its summary (rank 0 only)."""
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print  # stdout ends with the JSON
    group = mx.distributed.init()
    try:
        result = finetune(args.model, args.data, args.out, args.finetune_config, quantize=quantization(args),
                          resume=args.resume, force=args.force, progress=not args.no_progress, echo=say, group=group)
    except TrainingDiverged as error:  # the run produced no adapters; every process saw the same averaged loss
        if group.rank() != 0:
            return EXIT_EMPTY
        raise CommandError(str(error), EXIT_EMPTY) from None
    if group.rank() != 0:
        return EXIT_OK
    summary = result.summary()
    summary.update(peak_memory(), model=args.model, quantize=args.quantize)
    c = args.finetune_config
    mode = ("full fine-tuning" if c.fine_tune_type == "full"
            else f"LoRA (rank {c.rank}, alpha {c.alpha}, {','.join(c.lora_keys)})")
    print(f"{mode} + probe on {args.model}"
          f"{f' ({args.quantize}-bit, QLoRA)' if args.quantize else ''}: trainable {result.trainable:,} of "
          f"{result.total:,} parameters ({100 * summary['trainable_fraction']:.3f}%)")
    how = [c.dtype] + ["grad checkpointing"] * c.grad_checkpoint + [f"{result.processes} processes"] * (
        result.processes > 1)
    print(f"{result.steps} steps ({', '.join(how)}), loss {summary['first_loss']} -> {summary['last_loss']}, "
          f"{result.seconds:.1f} s")
    print(format_metrics("val", result.metrics.get("val")))
    if summary["num_skipped"]:
        listed = ", ".join(item["path"] for item in summary["skipped"])
        more = f" and {summary['num_skipped'] - len(summary['skipped'])} more" if summary["num_skipped"] > len(
            summary["skipped"]) else ""
        print(f"skipped {summary['num_skipped']} unreadable image(s): {listed}{more}")
    written = "model/, finetune.json" if c.fine_tune_type == "full" else "adapters.safetensors, adapter_config.json"
    print(f"saved to {args.out}: {written}")
    print(memory_line(summary))
    if args.json:
        print_json(summary)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        args.finetune_config = FinetuneConfig(**{k: v for k, v in vars(args).items()
                                                 if k in args.recipe | {"augment", "compile", "grad_checkpoint"}})
    except ValueError as error:
        parser.error(str(error))
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
