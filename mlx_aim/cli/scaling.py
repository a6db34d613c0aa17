"""The AIM paper's two findings on a laptop: pre-train a grid of small AIMs (capacities x data sizes x seeds) on the
built-in shapes or your own labelled images, probe every checkpoint, and say whether each finding holds.

    mlx-aim scaling                  # the default grid on the built-in shapes (minutes on a laptop CPU)
    mlx-aim scaling --data DIR       # your own folder: class sub-folders (or train/ and val/ of them)
    mlx-aim scaling --data DIR --data-sizes 32,256,1438   # the pre-training set sizes, chosen
    mlx-aim scaling --long           # 2000 steps, larger trunks: a third more time
    mlx-aim scaling --quick --json   # a tiny grid of the same shape, for tests; one JSON object last

Everything lands under --out (default ./mlx_aim_scaling): the image folder, one folder per grid with its runs
(checkpoints, cached probe results), scaling.json and scaling.png. An interrupted grid continues where it stopped
and finished runs are reused (--force starts the grid over). The pre-training set sizes are fractions of the
training pool (1%, 10% and 100%; --quick 25% and 100%); on a folder too small for those (the smallest under one
batch) they run from one batch to the pool instead, at least 8x apart, unless --data-sizes chooses them. See
mlx_aim/apps/scaling.py for the grid and its decisions.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..apps.scaling import DEFAULT, LONG, MIN_DATA_SPREAD, QUICK, check_data_sizes, run_scaling
from .options import add_output_options
from .output import EXIT_OK, print_json, run_command


def seed_list(text: str) -> tuple[int, ...]:
    """The argparse type of --seeds: comma-separated distinct integers >= 0."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct integers >= 0")
    return seeds


def data_size_list(text: str) -> tuple[int, ...]:
    """The argparse type of --data-sizes: comma-separated increasing image counts, at least `MIN_DATA_SPREAD` times
    apart (whether the smallest holds a batch and the largest fits the pool is checked once both are known)."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    try:
        return check_data_sizes(sizes)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mlx_aim_scaling", help="working folder: data, runs, figure (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="a labelled image folder of your own instead of the built-in shapes (class sub-folders, or "
                        "train/ and val/ folders of them)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true",
                        help="a tiny grid (seconds a run), for tests: numbers not meaningful")
    budget.add_argument("--long", action="store_true",
                        help=f"a longer grid: {LONG.steps} steps, larger trunks (a third more time than the default)")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help=f"seeds of every cell (default: {','.join(map(str, DEFAULT.seeds))}; with --quick "
                        f"{','.join(map(str, QUICK.seeds))})")
    p.add_argument("--data-sizes", type=data_size_list, default=None, metavar="N,N,N",
                   help=f"the pre-training set sizes, in images: increasing, the largest at least {MIN_DATA_SPREAD}x "
                        "the smallest, which holds one batch (default: fractions of the training pool, or sizes "
                        "adapted to a pool too small for them)")
    p.add_argument("--force", action="store_true", help="discard this grid's earlier runs and start over")
    add_output_options(p, json_help="print one JSON object with every run's figures on the last line")
    return p


def _percent(mean: float, std: float, low: float, high: float, seeds: int) -> str:
    if seeds == 1:
        return f"{100 * mean:.1f}%"
    return f"{100 * mean:.1f} ± {100 * std:.1f}% ({100 * low:.1f}-{100 * high:.1f})"


def format_table(result: dict) -> str:
    """One row per cell at the end of pre-training: capacity, parameters, data size, validation loss, top-1 over
    seeds, and the same probe's top-1 on random trunks of the capacity; then the top-1 of every checkpoint, averaged
    over seeds."""
    seeds = len(result["seeds"])
    spread = "mean ± std (min-max) over seeds " + ", ".join(map(str, result["seeds"])) if seeds > 1 else "one seed"
    header = ("capacity", "parameters", "images", "val loss", "probe top-1", "random trunk")
    random = {c["name"]: c["random_trunk"] for c in result["capacities"]}
    rows = []
    for c in result["cells"]:
        loss = f"{c['val_loss_mean']:.4f}" + (f" ± {c['val_loss_std']:.4f}" if seeds > 1 else "")
        r = random[c["capacity"]]
        rows.append((c["capacity"], f"{c['parameters']:,}", str(c["data_size"]), loss,
                     _percent(c["top1_mean"], c["top1_std"], c["top1_min"], c["top1_max"], seeds),
                     _percent(r["top1_mean"], r["top1_std"], r["top1_min"], r["top1_max"], seeds)))
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]
    lines = ["   ".join(f"{v:<{w}}" if k < 1 else f"{v:>{w}}" for k, (v, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    rule = "-" * len(lines[0])
    steps = result["checkpoint_steps"]
    out = [rule, lines[0], rule, *lines[1:], rule,
           f"at step {steps[-1]} of {result['batch_size']}-image batches; {spread}; "
           f"{result['num_classes']} classes, probe trained on {result['probe_train']} images, "
           f"top-1 on {result['num_val']} held-out images; random trunk: the same probe on the capacity's "
           "initialisation, never pre-trained",
           "", "probe top-1 by checkpoint (mean over seeds): step " + ", ".join(map(str, steps))]
    for capacity in result["capacities"]:
        for size in result["data_sizes"]:
            runs = [r for r in result["runs"] if r["capacity"] == capacity["name"] and r["data_size"] == size]
            means = [sum(r["checkpoints"][k]["top1"] for r in runs) / len(runs) for k in range(len(steps))]
            out.append(f"  {capacity['name']:<{widths[0]}}  {size:>{widths[2]}} images: "
                       + " -> ".join(f"{100 * m:.1f}%" for m in means))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    config = QUICK if args.quick else LONG if args.long else DEFAULT
    if args.seeds is not None:
        config = config.replace(seeds=args.seeds)
    result = run_scaling(args.out, data=args.data, quick=args.quick, long=args.long, config=config,
                         data_sizes=args.data_sizes, force=args.force, progress=not args.no_progress, echo=print)
    print()
    print(format_table(result))
    print()
    print("\n".join(result["verdicts"]))
    print(f"figure: {result['figure']}")
    reused = sum(r["pretraining_reused"] for r in result["runs"])
    randoms = [p for c in result["capacities"] for p in c["random_trunk"]["seeds"]]
    print(f"wall time: {result['seconds']:.0f} s ({len(result['runs'])} runs, {reused} reused; {len(randoms)} random "
          f"trunk probes, {sum(p['reused'] for p in randoms)} reused, {result['random_trunks_s']:.0f} s)")
    if args.json:
        print_json(result)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
