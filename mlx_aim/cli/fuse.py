"""Fuse LoRA adapters into their base model: an ordinary MLX model folder that every command reads.

    mlx-aim fuse --model aim-600M --adapters runs/lora --out aim-600M-tuned
    mlx-aim fuse --model q4-folder --adapters runs/qlora --out DIR --dequantize

Each adapter's scale * B A is added into its layer's weight; a quantized base is re-quantized with its own bits and
group size (`--dequantize`: the whole model is written in float). Adapters made for another base are refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from mlx.utils import tree_flatten

from ..checkpoints.loading import load
from ..checkpoints.weights import save_model
from ..data.preprocessing import PREPROCESSOR_CONFIG
from ..fileio import confined
from ..models.lora import fuse_lora
from .options import add_output_options
from .output import EXIT_OK, print_json, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base: preset name, hub repo id, local folder or checkpoint")
    p.add_argument("--adapters", required=True, help="the adapter folder (adapters.safetensors, adapter_config.json)")
    p.add_argument("--out", required=True, help="the MLX model folder to write")
    p.add_argument("--dequantize", action="store_true", help="write a quantized base's fused model in float")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    add_output_options(p, json_help="also print one JSON object with the figures, on the last line")
    return p


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model = fuse_lora(load(args.model, adapters=args.adapters), dequantize=args.dequantize)
    folder = model.source.folder
    extra = [confined(folder, PREPROCESSOR_CONFIG)] if folder is not None else []
    out = save_model(args.out, dict(tree_flatten(model.parameters())), model.config, force=args.force,
                     source_note=f"{model.source.description} with the LoRA adapters of {args.adapters} fused in.",
                     extra_files=[f for f in extra if f.is_file()])
    seconds = time.perf_counter() - start
    print(f"wrote {out} in {seconds:.1f} s")
    if args.json:
        print_json({"out": str(out), "seconds": round(seconds, 2)})
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
