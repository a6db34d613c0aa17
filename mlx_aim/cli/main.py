"""`mlx-aim COMMAND [options]`: the installed command (pyproject's [project.scripts]); each COMMAND is a
module of this package, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .. import __version__

# command -> (module of mlx_aim.cli, what it does)
COMMANDS = {
    "classify": ("classify", "top-k labels for images"),
    "zero-shot": ("zero_shot", "top-k labels for images from label names, with an AIMv2-LiT; saves heads"),
    "extract-features": ("extract_features", "features of every image under a folder, in shards"),
    "probe": ("probe", "train or evaluate an attentive probe on a frozen trunk"),
    "pretrain": ("pretrain", "pre-train AIM on a folder of images"),
    "finetune": ("finetune", "fine-tune a trunk with LoRA and an attentive probe; writes adapters"),
    "fuse": ("fuse", "fuse LoRA adapters into their base model, an ordinary model folder"),
    "convert": ("convert", "convert Apple's checkpoints (or any model source) to an MLX model folder"),
    "demo": ("demo", "pre-train a small AIM on built-in shapes and compare probes; nothing to download"),
    "scaling": ("scaling", "the paper's two findings on a grid of small pre-training runs, with verdicts"),
    "benchmark": ("benchmark", "speed and memory, optionally against PyTorch"),
    "visualize": ("visualize", "next-patch predictions of a pre-trained model, as a PNG grid"),
    "search": ("search", "index a photo folder with AIMv2-LiT, then search it by text or by an example image"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<18}{text}" for name, (_, text) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="mlx-aim", usage="mlx-aim [-h] [--version] COMMAND [options]",
        description="AIM (Autoregressive Image Models) in MLX.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{listing}\n\n`mlx-aim COMMAND --help` lists a command's options.",
    )
    p.add_argument("--version", action="version", version=f"mlx-aim {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument; everything after it is the command's own (its --help included).
    split = next((i + 1 for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    args = build_parser().parse_args(argv[:split])
    module = importlib.import_module(f"{__package__}.{COMMANDS[args.command][0]}")
    return module.main(argv[split:], prog=f"mlx-aim {args.command}")


if __name__ == "__main__":
    sys.exit(main())
