"""Top-k labels for images: mlx-aim classify --model aim-600M [--top-k 5] [--head FILE] [--json] PATH...

PATH: image files, folders (searched recursively) or glob patterns. Files that cannot be read are skipped,
listed at the end, and make the exit status 1 only when no image could be classified.

--head FILE: a probe head (Apple's head.* keys, e.g. a probe's OUT/head.safetensors; the probe.json beside it
names the classes) for an AIM or AIMv2 trunk, or a zero-shot head (`mlx-aim zero-shot --save-head FILE`) for the
AIMv2-LiT it was computed with, which then classifies at its image side's cost (the text tower is not loaded).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pathlib import Path

from ..data import NUM_WORKERS, preprocessing_for
from ..checkpoints.run_folders import PROBE_INFO
from ..tasks.classify import TOP_K, ClassifyResult, class_names, classify
from ..tasks.encode import BATCH_SIZE, peak_memory
from ..tasks.inference import open_model
from ..models.model import dtype_name
from ..tasks.zeroshot import ZeroShotClassifier
from .options import MODEL_HELP, add_inference_options, add_output_options, positive_int, precision
from .output import EXIT_EMPTY, EXIT_OK, memory_line, print_json, reported_as, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--top-k", type=positive_int, default=TOP_K)
    p.add_argument("--head", metavar="FILE",
                   help="classify with this head file: a probe head (head.* keys) for an AIM/AIMv2 trunk, or a "
                        "zero-shot head (mlx-aim zero-shot --save-head) for an AIMv2-LiT")
    add_inference_options(p)
    add_output_options(p)
    return p


def classify_and_report(
    model: str,
    inputs: Sequence[str],
    *,
    top_k: int = TOP_K,
    batch_size: int = BATCH_SIZE,
    dtype=None,
    quantize: Optional[dict] = None,
    probe_layers=None,
    num_workers: int = NUM_WORKERS,
    progress: bool = True,
    as_json: bool = False,
    max_patches: Optional[int] = None,
    head: Optional[str] = None,
) -> int:
    """Loads `model` (with `head`, a probe or zero-shot head file over it), classifies `inputs` and prints each
    image's top-k labels, the skipped inputs and the figures (with `as_json`, also one JSON object last); returns
    the exit status."""
    with reported_as("cannot load the model"):
        aim = open_model(model, dtype=dtype, quantize=quantize, probe_layers=probe_layers, max_patches=max_patches,
                         head=head)
        # The checkpoint folder's preprocessor_config.json, else the family's default.
        preprocessing = preprocessing_for(aim.config, aim.source.folder)
        names = labels_for(aim, model, head)
    result = classify(aim, inputs, top_k=top_k, batch_size=batch_size, labels=names, num_workers=num_workers,
                      model_name=str(model), progress=progress, preprocessing=preprocessing)
    extra = {} if head is None else {"head": str(head)}
    return report_classification(result, aim, model=str(model), batch_size=batch_size, as_json=as_json, **extra)


def labels_for(aim, model: str, head: Optional[str]) -> list[str]:
    """The class names: a zero-shot head's labels; a probe head's from the probe.json beside it; else the model's
    (`classify.class_names`)."""
    if isinstance(aim, ZeroShotClassifier):
        return aim.classes
    if head is not None and (Path(head).parent / PROBE_INFO).is_file():
        return class_names(Path(head).parent, aim.config.num_classes)
    return class_names(model, aim.config.num_classes)


def report_classification(result: ClassifyResult, aim, *, as_json: bool = False, **fields) -> int:
    """Prints each image's top-k labels with their probabilities, the figures, the skipped inputs and the peak
    memory (with `as_json`, then one JSON object: the result, `fields`, the model's dtype and quantization);
    returns the exit status: 1 when no image was classified."""
    for pred in result.predictions:
        tops = ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in pred["top_k"])
        print(f"{pred['path']}: {tops}")
    summary = result.to_dict()
    summary.update(peak_memory(), **fields, dtype=dtype_name(aim.dtype), quantization=aim.config.quantization)
    rate = summary["images_per_second"]
    print(f"classified {result.num_images} image(s) in {result.seconds:.2f} s"
          + (f" ({rate:.2f} images/s)" if rate else ""))
    print(result.skipped.report())
    print(memory_line(summary))
    if as_json:
        print_json(summary)
    return EXIT_OK if result.num_images else EXIT_EMPTY


def run(args: argparse.Namespace) -> int:
    return classify_and_report(args.model, args.paths, top_k=args.top_k, batch_size=args.batch_size,
                               **precision(args), probe_layers=args.probe_layers,
                               num_workers=args.num_workers, progress=not args.no_progress, as_json=args.json,
                               max_patches=args.max_patches, head=args.head)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
