"""Pre-train AIM on a folder of images (AIM section 3: next-patch prediction with prefix attention).

    python scripts/pretrain.py --preset aim-tiny --data DIR --out OUT [--steps N] [--batch-size B] [--resume]
    mlx.launch -n 2 python scripts/pretrain.py ...          # data-parallel over 2 processes

DIR holds images in any sub-folders (class folders, or train/ and val/ of them; otherwise --val-ratio of it
is held out for the validation loss). OUT receives checkpoints/ (with the pixel head, for --resume and
scripts/visualize.py), model/ (the trunk alone, which mlx_aim.load and the scripts' --model read when given
OUT or OUT/model), log.jsonl and summary.json. --batch-size is the global batch of one optimizer step.
Several Macs: see the docstring of mlx_aim/train.py (hostfile and mlx.launch command).
"""

import argparse
import sys

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)
from mlx_aim.cli import add_config_options, pair
from mlx_aim.config import PRESET_NAMES, AIMConfig, get_config
from mlx_aim.train import TrainConfig, run_pretrain


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
    ("--num-workers", int, "image decoding threads per process"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--preset", choices=PRESET_NAMES, help="architecture preset (aim-tiny, aim-small, ...)")
    arch.add_argument("--config", help="architecture from a config.json (AIMConfig fields)")
    p.add_argument("--data", required=True, help="folder of training images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--patch-size", type=int, help="override the preset's patch size")
    recipe = add_config_options(p, RECIPE_OPTIONS, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint); --resume continues")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")
    args = vars(p.parse_args(argv))

    overrides = {k: args[k] for k in ("image_size", "patch_size") if args[k] is not None}
    try:
        if args["preset"]:
            model_config = get_config(args["preset"], **overrides)
        else:
            model_config = AIMConfig.from_file(args["config"])
            model_config = model_config.replace(**overrides) if overrides else model_config
            model_config.validate()
        train_config = TrainConfig(**{k: v for k, v in args.items() if k in recipe})
    except (ValueError, OSError) as error:
        p.error(str(error))
    return run_pretrain(model_config, train_config, args["data"], args["out"], resume=args["resume"],
                        stop_at=args["stop_at"], progress=not args["no_progress"], as_json=args["json"])


if __name__ == "__main__":
    sys.exit(main())
