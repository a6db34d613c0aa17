"""Argument types and option groups the commands share, so that one option means one thing everywhere."""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from ..models.config import MAX_PATCHES, parse_probe_layers
from ..data import NUM_WORKERS
from ..tasks.encode import BATCH_SIZE
from ..models.model import DTYPES, QUANTIZED_BITS, QUANTIZED_GROUP_SIZES, parse_dtype, parse_quantize

MODEL_HELP = ("preset name, hub repo id, MLX model folder (e.g. a probe's OUT/model), pre-training run folder "
              "(its model/) or checkpoint file")
_GROUP_SIZE = parse_quantize(QUANTIZED_BITS[0])["group_size"]  # the library's default, shown in --help


def pair(kind: Callable) -> Callable[[str], tuple]:
    """An argparse type for two comma-separated values: `pair(float)("0.9,0.95")` is (0.9, 0.95)."""

    def parse(text):
        values = [kind(v) for v in text.split(",")]
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f"{text!r}: expected two comma-separated values")
        return tuple(values)

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for an integer >= `minimum`; a smaller one is a usage error naming the option."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {minimum}")
        return value

    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


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


def add_model_options(parser: argparse.ArgumentParser, dtype_help: str = "compute dtype (default: as stored)",
                      dtype_default: Optional[str] = None) -> None:
    """--dtype and the quantization options of a command that loads a model."""
    parser.add_argument("--dtype", choices=list(DTYPES), default=dtype_default, help=dtype_help)
    add_quantize_options(parser)


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """--quantize {4,8} and --q-group-size, the same in every command that loads a model (`quantization`)."""
    parser.add_argument("--quantize", type=int, choices=QUANTIZED_BITS,
                        help="quantize the trunk's linear layers to 4 or 8 bits")
    parser.add_argument("--q-group-size", type=int, choices=QUANTIZED_GROUP_SIZES,
                        help=f"weights per quantization scale with --quantize (default {_GROUP_SIZE})")


def quantization(args: argparse.Namespace) -> Optional[dict]:
    """--quantize and --q-group-size as the library's quantization dict; None when not quantizing."""
    if args.quantize is None:
        return None
    return parse_quantize(args.quantize, *([] if args.q_group_size is None else [args.q_group_size]))


def precision(args: argparse.Namespace) -> dict:
    """--dtype, --quantize and --q-group-size parsed once, here, into what `load` and `convert` take:
    {"dtype": an mx.Dtype or None, "quantize": a quantization dict or None}."""
    return {"dtype": parse_dtype(args.dtype), "quantize": quantization(args)}


def add_max_patches_option(parser: argparse.ArgumentParser) -> None:
    """--max-patches N, the same in every command that runs a model: a native-resolution model's guard."""
    parser.add_argument("--max-patches", type=positive_int,
                        help="native-resolution models (aimv2-large-patch14-native): refuse (skip and list) images of "
                             f"more patches than this (default: the model's config, {MAX_PATCHES} unless changed)")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The batching, precision, probe-layer and native-resolution options of the commands that run a model over
    image files."""
    add_batching_options(parser)
    add_model_options(parser)
    add_max_patches_option(parser)
    parser.add_argument("--probe-layers", type=probe_layers,
                        help="'best', 'last' or comma-separated block indices")


def add_batching_options(parser: argparse.ArgumentParser) -> None:
    """--batch-size and --num-workers: how a command that runs a model over image files batches and decodes them
    (all of `add_inference_options` that a fixed-size model without a probe, the zero-shot LiT, takes besides the
    model options)."""
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    parser.add_argument("--num-workers", type=non_negative_int, default=NUM_WORKERS,
                        help="image decoding threads (0: in the main thread)")


def add_output_options(parser: argparse.ArgumentParser, json_help: Optional[str] = None) -> None:
    """--json and --no-progress, which every command takes."""
    parser.add_argument("--json", action="store_true",
                        help=json_help or "also print one JSON object with the results, on the last line")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (downloads included)")


# The config fields shared by the commands that train a head on labelled images (`probe train`, `finetune`), as
# options; each command adds its own to them. Unset options keep the config's defaults (the one place they live).
LABELLED_TRAINING_OPTIONS = [
    ("--epochs", int, "epochs"),
    ("--steps", int, "optimizer steps (0: epochs x batches per epoch)"),
    ("--batch-size", int, "training batch"),
    ("--lr", float, "peak learning rate"),
    ("--warmup-frac", float, "fraction of steps of linear warm-up"),
    ("--weight-decay", float, "AdamW weight decay (matrices only)"),
    ("--betas", pair(float), "AdamW betas, e.g. 0.9,0.999"),
    ("--label-smoothing", float, "cross-entropy label smoothing"),
    ("--val-ratio", float, "fraction held out when DIR has no val/ folder"),
    ("--ckpt-interval", int, "steps between checkpoints (0: at the end)"),
    ("--num-workers", non_negative_int, "image decoding threads"),
]
