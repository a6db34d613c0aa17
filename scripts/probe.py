"""Attentive probing of a frozen AIM trunk (AIM section 4).

    python scripts/probe.py train --model M --data DIR --out OUT [--random-init] [--augment] [--resume]
    python scripts/probe.py eval --head OUT --data DIR [--model M] [--split val]

DIR holds one sub-folder per class, or train/ and val/ folders of them (otherwise --val-ratio of it is
held out). OUT receives head.safetensors (Apple's head keys), probe.json, model/ (trunk + head, which
classify.py and extract_features.py read), the latest checkpoint and the cached trunk features.
--random-init keeps the model's architecture with fresh seeded weights: the baseline.
"""

import argparse
import sys

from mlx_aim.cli import add_config_options, pair, probe_layers
from mlx_aim.data import NUM_WORKERS
from mlx_aim.inference import BATCH_SIZE
from mlx_aim.probe import ProbeConfig, run_probe_eval, run_probe_train


# ProbeConfig fields exposed as options; unset options keep ProbeConfig's defaults (the one place they live).
RECIPE_OPTIONS = [
    ("--epochs", int, "epochs"),
    ("--steps", int, "optimizer steps (0: epochs x batches per epoch)"),
    ("--batch-size", int, "training batch"),
    ("--lr", float, "peak learning rate"),
    ("--warmup-frac", float, "fraction of steps of linear warm-up"),
    ("--weight-decay", float, "AdamW weight decay (matrices only)"),
    ("--betas", pair(float), "AdamW betas, e.g. 0.9,0.999"),
    ("--label-smoothing", float, "cross-entropy label smoothing"),
    ("--crop-scale", pair(float), "random resized crop scale range with --augment"),
    ("--seed", int, "seed of the probe's initialisation, data order and split (and of --random-init)"),
    ("--val-ratio", float, "fraction held out when DIR has no val/ folder"),
    ("--cache-dtype", str, "dtype of cached trunk features: float16 or float32"),
    ("--eval-batch-size", int, "batch for feature extraction and evaluation"),
    ("--ckpt-interval", int, "steps between checkpoints (0: at the end)"),
    ("--log-interval", int, "steps between progress-bar loss updates"),
    ("--num-workers", int, "image decoding threads"),
    ("--cache", str, "where cached features live: disk (OUT/cache, reused on resume) or memory"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a probe on a frozen trunk")
    t.add_argument("--model", required=True,
                   help="preset name, hub repo id, MLX model folder, pre-training run folder (its model/) or "
                        "checkpoint file")
    t.add_argument("--data", required=True, help="image folder: class sub-folders, or train/ and val/ of them")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--random-init", action="store_true", help="the model's architecture with random weights")
    t.add_argument("--augment", action="store_true", default=argparse.SUPPRESS,
                   help="random resized crop + flip (the trunk then runs on every batch; no feature cache)")
    recipe = add_config_options(t, RECIPE_OPTIONS, ProbeConfig) | {"augment"}
    t.add_argument("--probe-layers", type=probe_layers, help="'best', 'last' or comma-separated indices")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="trunk dtype (the probe is float32)")
    t.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the trunk's linear layers")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--force", action="store_true", help="discard a checkpoint in OUT and start again")
    t.add_argument("--no-model-folder", action="store_true",
                   help="do not write OUT/model (a copy of the trunk with the head)")
    t.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")

    e = sub.add_parser("eval", help="evaluate a trained probe")
    e.add_argument("--head", required=True, help="a probe output folder (with head.safetensors and probe.json)")
    e.add_argument("--data", required=True, help="image folder: class sub-folders, or train/ and val/ of them")
    e.add_argument("--model", help="the trunk (default: HEAD/model, else the trunk named in probe.json)")
    e.add_argument("--split", choices=["val", "train"], default="val")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--quantize", type=int, choices=[4, 8])
    e.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    e.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    e.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")

    args = vars(p.parse_args(argv))
    if args["command"] == "eval":
        return run_probe_eval(args["head"], args["data"], model=args["model"], split=args["split"],
                              dtype=args["dtype"], quantize=args["quantize"], batch_size=args["batch_size"],
                              num_workers=args["num_workers"], as_json=args["json"])
    try:
        config = ProbeConfig(**{k: v for k, v in args.items() if k in recipe})
    except ValueError as error:
        p.error(str(error))
    return run_probe_train(args["model"], args["data"], args["out"], config, random_init=args["random_init"],
                           init_seed=config.seed, probe_layers=args["probe_layers"], dtype=args["dtype"],
                           quantize=args["quantize"], resume=args["resume"], force=args["force"],
                           save_model_folder=not args["no_model_folder"], as_json=args["json"])


if __name__ == "__main__":
    sys.exit(main())
