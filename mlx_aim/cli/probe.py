"""Attentive probing of a frozen AIM trunk (AIM section 4).

    mlx-aim probe train --model M --data DIR --out OUT [--random-init] [--augment] [--resume]
    mlx-aim probe eval --head OUT --data DIR [--model M] [--split val]

DIR holds one sub-folder per class, or train/ and val/ folders of them (otherwise --val-ratio of it is
held out). OUT receives head.safetensors (Apple's head keys), probe.json, model/ (trunk + head, which
classify and extract-features read), the latest checkpoint and the cached trunk features.
--random-init keeps the model's architecture with fresh seeded weights: the baseline.
Exit status 1: too few usable training images (train), no usable image (eval), or training diverged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..data import NUM_WORKERS, preprocessing_for
from ..tasks.encode import BATCH_SIZE, peak_memory
from ..tasks.inference import open_model
from ..checkpoints.run_folders import MODEL_DIR, PROBE_INFO
from ..training.probe import (
    HEAD_FILE, ProbeConfig, evaluate_probe, load_probe_info, train_probe, trunk_description, with_trained_head,
)
from ..training.runs import TrainingDiverged
from .options import (
    LABELLED_TRAINING_OPTIONS, MODEL_HELP, add_config_options, add_max_patches_option, add_model_options,
    add_output_options, non_negative_int, pair, positive_int, precision, probe_layers,
)
from .output import EXIT_EMPTY, EXIT_OK, CommandError, memory_line, print_json, reported_as, run_command

# ProbeConfig fields exposed as options; unset options keep ProbeConfig's defaults (the one place they live).
RECIPE_OPTIONS = [
    ("--crop-scale", pair(float), "random resized crop scale range with --augment"),
    ("--seed", int, "seed of the probe's initialisation, data order and split (and of --random-init)"),
    ("--cache-dtype", str, "dtype of cached trunk features: float16 or float32"),
    ("--eval-batch-size", int, "batch for feature extraction and evaluation"),
    ("--log-interval", int, "steps between progress-bar loss updates"),
    ("--cache", str, "where cached features live: disk (OUT/cache, reused on resume) or memory"),
] + LABELLED_TRAINING_OPTIONS


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a probe on a frozen trunk")
    t.add_argument("--model", required=True, help=MODEL_HELP)
    t.add_argument("--data", required=True, help="image folder: class sub-folders, or train/ and val/ of them")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--random-init", action="store_true", help="the model's architecture with random weights")
    t.add_argument("--augment", action="store_true", default=argparse.SUPPRESS,
                   help="random resized crop + flip (the trunk then runs on every batch; no feature cache)")
    t.set_defaults(recipe=add_config_options(t, RECIPE_OPTIONS, ProbeConfig) | {"augment"})  # ProbeConfig's fields
    t.add_argument("--probe-layers", type=probe_layers, help="'best', 'last' or comma-separated indices")
    add_model_options(t, dtype_help="trunk dtype (the probe is float32)")
    add_max_patches_option(t)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--force", action="store_true", help="discard a checkpoint in OUT and start again")
    t.add_argument("--no-model-folder", action="store_true",
                   help="do not write OUT/model (a copy of the trunk with the head)")
    add_output_options(t)

    e = sub.add_parser("eval", help="evaluate a trained probe")
    e.add_argument("--head", required=True, help="a probe output folder (with head.safetensors and probe.json)")
    e.add_argument("--data", required=True, help="image folder: class sub-folders, or train/ and val/ of them")
    e.add_argument("--model", help="the trunk (default: HEAD/model, else the trunk named in probe.json)")
    e.add_argument("--split", choices=["val", "train"], default="val")
    add_model_options(e, dtype_help="trunk dtype (default: as stored)")
    add_max_patches_option(e)
    e.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    e.add_argument("--num-workers", type=non_negative_int, default=NUM_WORKERS, help="image decoding threads")
    add_output_options(e)
    return p


def format_metrics(name: str, metrics: Optional[dict]) -> str:
    """One split's metrics: top-1, top-5, loss, mean per-class accuracy, and each class's (up to 30 classes)."""
    if not metrics or not metrics.get("num_images"):
        return f"{name}: no images"
    lines = [f"{name}: top-1 {100 * metrics['top1']:.2f}%, top-{metrics['top5_k']} {100 * metrics['top5']:.2f}%, "
             f"loss {metrics['loss']:.4f}, mean per-class {100 * metrics['mean_per_class_accuracy']:.2f}% "
             f"({metrics['num_images']} images)"]
    per = metrics["per_class"]
    if len(per) <= 30:
        for cls, v in per.items():
            accuracy = "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.1f}%"
            lines.append(f"  {cls}: {accuracy} of {v['count']}")
    return "\n".join(lines)


def train(args: argparse.Namespace, config: ProbeConfig) -> int:
    """`probe train`: trains the head, prints its metrics and where it was saved; returns the exit status."""
    with reported_as("cannot load the model"):
        trunk_model = open_model(args.model, **precision(args), probe_layers=args.probe_layers,
                                 random_init=args.random_init, seed=config.seed, max_patches=args.max_patches)
        preprocessing = preprocessing_for(trunk_model.config, trunk_model.source.folder)
    trunk = trunk_description(trunk_model, args.model, args.random_init, config.seed)
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print  # stdout ends with the JSON
    try:
        result = train_probe(trunk_model, args.data, args.out, config, trunk=trunk, resume=args.resume,
                             force=args.force, save_model_folder=not args.no_model_folder,
                             progress=not args.no_progress, echo=say, preprocessing=preprocessing)
    except TrainingDiverged as error:  # the run produced no probe
        raise CommandError(str(error), EXIT_EMPTY) from None
    summary = result.summary()
    summary.update(peak_memory(), model=args.model, random_init=args.random_init)
    print(f"probe on {'a random-init ' if args.random_init else ''}{args.model} "
          f"(layers {trunk_model.config.probe_layers}): {result.steps} steps, "
          f"loss {summary['first_loss']} -> {summary['last_loss']}, {result.seconds:.1f} s")
    for name in ("train", "val"):
        if name in result.metrics:
            print(format_metrics(name, result.metrics[name]))
    print(f"saved to {args.out}: {HEAD_FILE}, {PROBE_INFO}" + ("" if args.no_model_folder else f", {MODEL_DIR}/"))
    print(result.skipped.report())
    print(memory_line(summary))
    if args.json:
        print_json(summary)
    return EXIT_OK


def trunk_source(head_dir: str, info: dict) -> str:
    """The trunk a probe folder was trained on: its model/ folder (trunk + head), else the source probe.json
    names."""
    if (Path(head_dir) / MODEL_DIR).is_dir():
        return str(Path(head_dir) / MODEL_DIR)
    source = info["trunk"]["source"]
    if source is None:
        raise CommandError(f"{head_dir} names no trunk and has no {MODEL_DIR}/ folder: pass --model")
    return source


def evaluate(args: argparse.Namespace) -> int:
    """`probe eval`: the saved head on its trunk over a split of the data; returns the exit status."""
    info = load_probe_info(args.head)
    model = args.model if args.model is not None else trunk_source(args.head, info)
    head_path = Path(args.head) / HEAD_FILE
    with reported_as("cannot load the model and head"):
        trunk = open_model(model, **precision(args), probe_layers=info["probe_layers"],
                           max_patches=args.max_patches)
        aim = with_trained_head(trunk, head_path)
        preprocessing = preprocessing_for(aim.config, trunk.source.folder)
    config = info.get("config", {})
    metrics, skipped = evaluate_probe(aim, args.data, info["classes"], split=args.split,
                                      val_ratio=config.get("val_ratio", 0.2), seed=config.get("seed", 0),
                                      batch_size=args.batch_size, num_workers=args.num_workers,
                                      progress=not args.no_progress, preprocessing=preprocessing)
    print(f"probe {head_path} on {model} (layers {aim.config.probe_layers}), {args.split} split of {args.data}")
    print(format_metrics(args.split, metrics))
    print(skipped.report())
    summary = {"split": args.split, args.split: metrics, "model": str(model), "head": str(head_path),
               "num_skipped": len(skipped), "skipped": skipped.to_list()}
    summary.update(peak_memory())
    print(memory_line(summary))
    if args.json:
        print_json(summary)
    return EXIT_OK if metrics["num_images"] else EXIT_EMPTY


def run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return evaluate(args)
    return train(args, args.probe_config)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            args.probe_config = ProbeConfig(**{k: v for k, v in vars(args).items() if k in args.recipe})
        except ValueError as error:
            parser.error(str(error))
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
