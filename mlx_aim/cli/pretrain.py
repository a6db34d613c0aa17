"""Pre-train AIM on a folder of images (AIM section 3: next-patch prediction with prefix attention).

    mlx-aim pretrain --preset aim-tiny --data DIR --out OUT [--steps N] [--batch-size B] [--resume]
    mlx.launch -n 2 python scripts/pretrain.py ...          # data-parallel over 2 processes

DIR holds images in any sub-folders (class folders, or train/ and val/ of them; otherwise --val-ratio of it
is held out for the validation loss). OUT receives checkpoints/ (with the pixel head, for --resume and
visualize), model/ (the trunk alone, which mlx_aim.load and the other commands' --model read when given
OUT or OUT/model), log.jsonl and summary.json. --batch-size is the global batch of one optimizer step.
Several Macs: see the docstring of mlx_aim/training/pretrain.py (hostfile and mlx.launch command).
Exit status 1: the loss diverged (the last good checkpoint is kept and named).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import mlx.core as mx

from ..models.config import PRESET_NAMES, AIMConfig, get_config
from ..training.runs import TrainingDiverged
from ..training.pretrain import TrainConfig, pretrain
from .options import add_config_options, add_output_options, non_negative_int, pair
from .output import EXIT_EMPTY, EXIT_OK, print_error, print_json, run_command

# TrainConfig fields exposed as options; unset options keep TrainConfig's defaults (the one place they live).
RECIPE_OPTIONS = [
    ("--steps", int, "optimizer steps of the whole run (the schedule's length)"),
    ("--batch-size", int, "global batch per optimizer step (all processes and micro-batches)"),
    ("--grad-accum", int, "micro-batches per step on each process"),
    ("--lr", float, "peak learning rate"),
    ("--warmup-frac", float, "fraction of steps of linear warm-up"),
    ("--weight-decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", float, "max gradient norm (0: off)"),
    ("--dtype", str, "compute dtype: float32 or bfloat16 (weights and optimizer stay float32)"),
    ("--seed", int, "seed of the initialisation, data order, augmentation and prefix draws"),
    ("--crop-scale", pair(float), "random resized crop scale range, e.g. 0.4,1.0"),
    ("--val-ratio", float, "fraction held out when DIR has no val/ folder"),
    ("--val-images", int, "validation images used (a fixed seeded subset)"),
    ("--log-interval", int, "steps between log records"),
    ("--val-interval", int, "steps between validations (0: at the end)"),
    ("--ckpt-interval", int, "steps between checkpoints (0: at the end)"),
    ("--keep-last", int, "checkpoints kept"),
    ("--num-workers", non_negative_int, "image decoding threads per process"),
]


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--preset", choices=PRESET_NAMES, help="architecture preset (aim-tiny, aim-small, ...)")
    arch.add_argument("--config", help="architecture from a config.json (AIMConfig fields)")
    p.add_argument("--data", required=True, help="folder of training images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--patch-size", type=int, help="override the preset's patch size")
    p.set_defaults(recipe=add_config_options(p, RECIPE_OPTIONS, TrainConfig))  # TrainConfig's fields
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint); --resume continues")
    add_output_options(p)
    return p


def format_summary(summary: dict) -> str:
    """`pretrain`'s summary as a few readable lines."""
    s = summary
    lines = [
        f"pre-trained {s['preset'] or 'AIM'}: steps {s['start_step'] + 1}-{s['steps']} of {s['total_steps']}, "
        f"global batch {s['global_batch']}, {s['processes']} process(es), {s['dtype']}",
    ]
    if s["first_loss"] is not None:
        val = f"; validation loss {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
        lines.append(f"loss {s['first_loss']:.4f} (step {s['start_step'] + 1}) -> {s['end_loss']:.4f} "
                     f"(mean of the last {min(10, s['steps'] - s['start_step'])} steps){val}")
    if s["images_per_s"] is not None:
        lines.append(f"throughput {s['images_per_s']:.1f} images/s; wall time {s['wall_s']:.1f} s")
    lines.append(f"checkpoint: {s['checkpoint']}")
    lines.append(f"pre-trained trunk: {s['model_dir']} (mlx_aim.load, mlx-aim probe --model)")
    return "\n".join(lines)


def configs(args: argparse.Namespace) -> tuple[AIMConfig, TrainConfig]:
    """The architecture (a preset or a config.json, with the size overrides) and the recipe the options name."""
    overrides = {k: getattr(args, k) for k in ("image_size", "patch_size") if getattr(args, k) is not None}
    if args.preset:
        model_config = get_config(args.preset, **overrides)
    else:
        model_config = AIMConfig.from_file(args.config)
        model_config = model_config.replace(**overrides) if overrides else model_config
        model_config.validate()
    return model_config, TrainConfig(**{k: v for k, v in vars(args).items() if k in args.recipe})


def run(args: argparse.Namespace) -> int:
    """Runs `pretrain` and prints its summary (rank 0 only); returns the exit status."""
    group = mx.distributed.init()
    is_main = group.rank() == 0
    try:
        summary = pretrain(args.model_config, args.train_config, args.data, args.out, args.resume,
                           stop_at=args.stop_at, progress=not args.no_progress, group=group, echo=print)
    except TrainingDiverged as error:
        if is_main:  # every process sees the same (averaged) loss, so one report is enough
            print_error(error)
            if args.json:
                print_json({"error": "diverged", "step": error.step,
                            "checkpoint": str(error.checkpoint) if error.checkpoint else None})
        return EXIT_EMPTY
    if is_main:
        print(format_summary(summary))
        if args.json:
            print_json(summary)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        args.model_config, args.train_config = configs(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
