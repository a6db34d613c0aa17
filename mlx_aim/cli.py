"""Small argparse helpers shared by the command lines in `scripts/`."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from .config import parse_probe_layers
from .data import NUM_WORKERS
from .inference import BATCH_SIZE


def pair(kind: Callable) -> Callable[[str], tuple]:
    """An argparse type for two comma-separated values: `pair(float)("0.9,0.95")` is (0.9, 0.95)."""

    def parse(text):
        values = [kind(v) for v in text.split(",")]
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f"{text!r}: expected two comma-separated values")
        return tuple(values)

    return parse


def probe_layers(text: str):
    """The argparse type of --probe-layers: "best", "last" or comma-separated block indices
    (`config.parse_probe_layers`), a bad value reported as argparse reports errors."""
    try:
        return parse_probe_layers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_config_options(parser: argparse.ArgumentParser, options: Sequence[tuple], config_cls) -> set[str]:
    """Adds one option per (flag, type, help) naming a field of the dataclass `config_cls` (`--batch-size`:
    `batch_size`); returns the field names. An option left unset is absent from the parsed arguments, so the
    dataclass's default applies: the defaults live there only (the help shows them)."""
    names = set()
    for flag, kind, text in options:
        name = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                            help=f"{text} (default {getattr(config_cls, name)})")
        names.add(name)
    return names


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The batching, precision and probe-layer options of the scripts that run a model over image files."""
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (default: as stored)")
    parser.add_argument("--quantize", type=int, choices=[4, 8],
                        help="quantize the trunk's linear layers to 4 or 8 bits")
    parser.add_argument("--probe-layers", type=probe_layers,
                        help="'best', 'last' or comma-separated block indices")
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS, help="image decoding threads")
