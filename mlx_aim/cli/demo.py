"""Pre-train a small AIM on built-in synthetic shapes, then compare attentive probes on the pre-trained and a
randomly initialised trunk. Nothing to download. With --model, classify the bundled sample images with a
released AIM instead, or with a trunk and the probe trained on it (an AIMv2 probe's PROBE/model).

    mlx-aim demo                     # the default run: a few minutes on a laptop CPU
    mlx-aim demo --seed 1 --json     # another seed; one JSON object with the figures last
    mlx-aim demo --finetune          # then the probe against LoRA and full fine-tuning, over 3 seeds
    mlx-aim demo --model aim-600M    # classify the bundled sample images with a released model
    mlx-aim demo --model PROBE/model # with an AIMv2 trunk and your probe (Apple released no AIMv2 heads)

Everything lands under --out (default ./mlx_aim_demo): the image folder, the run (checkpoint, exported
trunk, probes), demo.json and demo.png. See mlx_aim/apps/demo.py for the recipe and its decisions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..models.config import AIMV2_PRESET_NAMES, get_config
from ..apps.demo import DEFAULT, compare_finetuning, run_demo, sample_images
from ..models.model import untrained_head_message
from .classify import classify_and_report
from .options import add_max_patches_option, add_model_options, add_output_options, positive_int, precision
from .output import EXIT_OK, CommandError, print_json, run_command


def seed_list(text: str) -> list[int]:
    """Comma-separated distinct seeds >= 0, e.g. 0,1,2: refused before the demo runs, not minutes into it."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct integer seeds >= 0, comma-separated (0,1,2)")
    return seeds


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mlx_aim_demo", help="working folder: data, runs, figure (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, initialisation and training (default: 0)")
    p.add_argument("--steps", type=int, default=None, help=f"pre-training steps (default: {DEFAULT.steps})")
    p.add_argument("--quick", action="store_true", help="a tiny budget (seconds), for tests: numbers not meaningful")
    p.add_argument("--force", action="store_true", help="discard this seed's earlier run folder and start over")
    p.add_argument("--finetune", action="store_true",
                   help="then train the attentive probe, LoRA and full fine-tuning on the pre-trained trunk with each "
                        "--finetune-seeds seed, and compare them (AIM section 5.5)")
    p.add_argument("--finetune-seeds", type=seed_list, default=[0, 1, 2],
                   metavar="S,S,...", help="seeds of the comparison (default: 0,1,2)")
    p.add_argument("--model", default=None,
                   help="instead of pre-training: classify the bundled sample images with this model "
                        "(aim-600M, a hub repo id, or a local model folder such as a probe's PROBE/model)")
    p.add_argument("--top-k", type=positive_int, default=5, help="labels per image with --model (default: 5)")
    add_model_options(p, dtype_help="with --model: compute dtype (default: as stored)")
    add_max_patches_option(p)
    add_output_options(p, json_help="print one JSON object with the figures on the last line")
    return p


def format_table(result: dict) -> str:
    """The demo's small table: pre-training loss at start and end, probe top-1 for both trunks."""
    pre = result["pretraining"]
    probes = result["probe"]
    chance = 100.0 / result["num_classes"]
    rows = [
        ("pre-training loss, step 1", f"{pre['loss_start']:.4f}"),
        (f"pre-training loss, step {pre['steps']} (mean of last {min(10, pre['steps'])})", f"{pre['loss_end']:.4f}"),
    ]
    if pre.get("val_loss") is not None:
        rows.append(("validation loss (held-out images), end", f"{pre['val_loss']:.4f}"))
    rows += [
        ("probe top-1, random-init trunk", f"{100 * probes['random']['top1']:.1f}%"),
        ("probe top-1, pre-trained trunk", f"{100 * probes['pretrained']['top1']:.1f}%"),
        ("pre-training gain", f"{100 * (probes['pretrained']['top1'] - probes['random']['top1']):+.1f} points"),
    ]
    key_width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "-" * (key_width + value_width + 3)
    lines = [rule] + [f"{k:<{key_width}}   {v:>{value_width}}" for k, v in rows] + [rule]
    lines.append(f"{result['num_classes']} classes (chance {chance:.1f}%), probe trained on "
                 f"{result['probe_train']} images, top-1 on {probes['pretrained']['num_images']} held-out images")
    return "\n".join(lines)


METHOD_NAMES = {"probe": "attentive probe (frozen trunk)", "lora": "LoRA rank 8 + probe", "full": "full fine-tuning + probe"}


def format_comparison(result: dict) -> str:
    """`compare_finetuning`'s table: top-1 per seed and its range, trainable parameters, median wall time."""
    seeds = result["seeds"]
    header = ("method", *[f"seed {s}" for s in seeds], "range", "trainable", "wall time")
    table = [header]
    for method, m in result["methods"].items():
        table.append((METHOD_NAMES[method], *[f"{100 * r['top1']:.1f}%" for r in m["runs"]],
                      f"{100 * m['top1_min']:.1f}-{100 * m['top1_max']:.1f}", f"{m['trainable_parameters']:,}",
                      f"{m['seconds_median']:.0f} s"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    said = {True: "beats", False: "does not beat"}
    b = result["beats"]
    lines.append(f"top-1 on {result['num_images']} held-out images; LoRA {said[b['lora_over_probe']]} the probe, full "
                 f"fine-tuning {said[b['full_over_lora']]} LoRA and {said[b['full_over_probe']]} the probe (beats: "
                 "the seeds' ranges do not overlap)")
    return "\n".join(lines)


def released_aimv2(model: str) -> Optional[str]:
    """The AIMv2 name `model` gives (a name or Apple's hub id, not a local path), else None: a head-less trunk."""
    if Path(model).exists():
        return None
    names = {name.lower(): name for name in AIMV2_PRESET_NAMES}
    return names.get(model.lower().removeprefix("apple/"))


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        name = released_aimv2(args.model)
        if name is not None:  # refused before a download: no AIMv2 checkpoint holds a head
            raise CommandError(untrained_head_message(get_config(name), args.model))
        return classify_and_report(args.model, [str(p) for p in sample_images()], top_k=args.top_k, **precision(args),
                                   progress=not args.no_progress, as_json=args.json, max_patches=args.max_patches)
    result = run_demo(args.out, args.seed, quick=args.quick, steps=args.steps, force=args.force,
                      progress=not args.no_progress, echo=print)
    print()
    print(format_table(result))
    print(f"figure: {result['figure']}")
    print(f"pre-trained trunk: {result['model_dir']} (mlx_aim.load); checkpoint: {result['checkpoint']}")
    print(f"wall time: {result['seconds']['total']:.0f} s (data {result['seconds']['data']:.0f}, pre-training "
          f"{result['seconds']['pretrain']:.0f}, probes {result['seconds']['probe']:.0f})")
    if args.finetune:
        print(f"\nfine-tuning: the attentive probe, LoRA and full fine-tuning of the pre-trained trunk, seeds "
              f"{','.join(map(str, args.finetune_seeds))}")
        result["finetune"] = compare_finetuning(result, args.finetune_seeds, quick=args.quick,
                                                progress=not args.no_progress, echo=print)
        print()
        print(format_comparison(result["finetune"]))
    if args.json:
        print_json(result)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.model is not None and args.finetune:
        parser.error("--finetune compares on the demo's own pre-trained trunk: drop --model")
    if args.model is None and (args.dtype or args.quantize or args.q_group_size or args.max_patches):
        parser.error("--dtype, --quantize, --q-group-size and --max-patches apply to --model (the demo's own run is "
                     "a float32 AIM)")
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
