"""Zero-shot top-k labels for images with an AIMv2-LiT, no training:
    mlx-aim zero-shot --model aimv2-large-patch14-224-lit --labels "cat,dog,car" [--top-k 5] [--json] PATH...
    mlx-aim zero-shot --model M --labels-file labels.txt | --imagenet [--templates FILE] [--save-head FILE] [PATH...]

Each label becomes a class embedding: the mean of its unit-length text embeddings through the prompt templates
(default: CLIP's 80 ImageNet templates, "a bad photo of a {}.", ...; --templates FILE: one a line, {} where the
label goes). Each image's labels are ranked by cosine similarity, times the model's logit scale, softmaxed.

--save-head FILE writes the class embeddings as a head file (PATHs may then be left out): `mlx-aim classify
--model M --head FILE PATH...` classifies with it at the image side's cost, the text tower not loaded.
PATH: image files, folders (searched recursively) or glob patterns; unreadable files are skipped and listed.
Exit status 1 when PATHs were given and no image could be classified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..data import imagenet_classes, preprocessing_for
from ..tasks.classify import TOP_K, classify
from ..tasks.lit import open_lit
from ..tasks.zeroshot import (
    ZeroShotClassifier, build_head, check_labels, default_templates, read_labels, read_templates,
)
from .classify import report_classification
from .options import add_batching_options, add_model_options, add_output_options, positive_int, precision
from .output import EXIT_OK, CommandError, print_json, reported_as, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True,
                   help="an AIMv2-LiT: aimv2-large-patch14-224-lit, a hub repo id, or a folder of one (converted, "
                        "transformers' layout) with its tokenizer files")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,car"')
    labels.add_argument("--labels-file", metavar="FILE", help="labels one a line (blank lines ignored)")
    labels.add_argument("--imagenet", action="store_true", help="the 1000 ImageNet-1k class names")
    p.add_argument("--templates", metavar="FILE",
                   help="prompt templates one a line, {} where the label goes (default: CLIP's 80 ImageNet templates)")
    p.add_argument("--top-k", type=positive_int, default=TOP_K)
    p.add_argument("--save-head", metavar="FILE",
                   help="write the class embeddings as a head file for `mlx-aim classify --head FILE`")
    add_batching_options(p)
    add_model_options(p)
    add_output_options(p)
    return p


def labels_of(args: argparse.Namespace) -> list[str]:
    """The labels the options name: --labels (comma-separated), --labels-file or --imagenet."""
    if args.imagenet:
        return imagenet_classes()
    if args.labels_file is not None:
        return read_labels(args.labels_file)
    return check_labels([label.strip() for label in args.labels.split(",")], "--labels")


def run(args: argparse.Namespace) -> int:
    with reported_as("bad labels or templates"):
        labels = labels_of(args)
        templates = default_templates() if args.templates is None else read_templates(args.templates)
    if args.save_head is not None and not Path(args.save_head).resolve().parent.is_dir():
        raise CommandError(f"--save-head {args.save_head}: its folder does not exist")
    with reported_as("cannot load the model"):
        model, tokenizer = open_lit(args.model, **precision(args))
        preprocessing = preprocessing_for(model.config.image, model.source.folder)
    head = build_head(model, tokenizer, labels, templates, model_name=args.model, progress=not args.no_progress)
    fields = {"model": args.model, "num_labels": len(labels), "num_templates": len(templates),
              "templates": args.templates or "clip-imagenet-80"}
    if args.save_head is not None:
        head.save(args.save_head)
        fields["head"] = args.save_head
        print(f"saved the zero-shot head ({len(labels)} labels, {len(templates)} templates) to {args.save_head}; "
              f"classify with it: mlx-aim classify --model {args.model} --head {args.save_head} PATH...")
    if not args.paths:
        if args.json:
            print_json(fields)
        return EXIT_OK
    classifier = ZeroShotClassifier(model, head, model_name=args.model)
    result = classify(classifier, args.paths, top_k=args.top_k, batch_size=args.batch_size, labels=head.classes,
                      num_workers=args.num_workers, model_name=args.model, progress=not args.no_progress,
                      preprocessing=preprocessing)
    return report_classification(result, classifier, as_json=args.json, batch_size=args.batch_size, **fields)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.paths and args.save_head is None:
        parser.error("give images to classify (PATH...), --save-head FILE, or both")
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
