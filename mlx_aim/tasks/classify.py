"""Top-k classification of image files: every image named by the inputs through a classifier, in input order, a file
that cannot be used skipped and listed (`mlx-aim classify`, `mlx-aim zero-shot`).

- `classify` runs the encoding pipeline (`encode.EncodeRun`) with `encode.top_k_classes` into a `TopKRows` sink,
  and returns a `ClassifyResult`. Its model is anything that answers `model(images)` with class logits: an AIM or
  AIMv2 with a trained probe head, or a `zeroshot.ZeroShotClassifier`. A trunk without a trained head is refused
  (`check_classifier`), naming the command that trains one.
- `class_names` finds the label names that go with a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from ..checkpoints.run_folders import PROBE_INFO
from ..data import NUM_WORKERS, Preprocessing, Skipped, imagenet_classes, is_native, preprocessing_for
from ..fileio import confined, read_json_object
from ..models.model import AIM, AIMEncoder, AIMv2, ProbedAIMv2, UntrainedHeadError, untrained_head_message
from .encode import BATCH_SIZE, EncodedBatch, EncodeRun, top_k_classes

if TYPE_CHECKING:  # zero-shot is built on classify; the type alone names it
    from .zeroshot import ZeroShotClassifier

TOP_K = 5


def class_names(model_source, num_classes: int) -> list[str]:
    """Label names for a model: a trained probe's classes (its folder's probe.json), else ImageNet's for
    1000 classes, else the class indices as text."""
    if isinstance(model_source, (str, os.PathLike)):
        info_path = confined(model_source, PROBE_INFO)
        if info_path.is_file():
            classes = read_json_object(info_path).get("classes")
            if isinstance(classes, list) and len(classes) == num_classes:
                return [str(c) for c in classes]
            raise ValueError(f"{info_path}: 'classes' should list {num_classes} names, the model's class count")
    if num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(num_classes)]


def check_classifier(model, model_name: str = "", wanted: str = "classes", hint: str = "") -> None:
    """A trunk without a trained head (an AIMv2 encoder, an AIM trunk export, a random init) raises
    `UntrainedHeadError`, naming the command that trains a probe: its classes would be noise. A probed trunk
    (`AIM`, `ProbedAIMv2`) or a zero-shot classifier passes."""
    if isinstance(model, (AIMEncoder, AIMv2)):
        raise UntrainedHeadError(untrained_head_message(model.config, model_name, wanted, hint))


@dataclass
class ClassifyResult:
    predictions: list[dict]  # {"path", "top_k": [{"index", "label", "probability"}]}
    skipped: Skipped
    seconds: float
    model_seconds: float

    @property
    def num_images(self) -> int:
        return len(self.predictions)

    def to_dict(self) -> dict:
        return {
            "num_images": self.num_images,
            "num_skipped": len(self.skipped),
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.num_images / self.seconds, 3) if self.seconds > 0 else None,
            "model_images_per_second": (round(self.num_images / self.model_seconds, 3)
                                        if self.model_seconds > 0 else None),
            "predictions": self.predictions,
            "skipped": self.skipped.to_list(),
        }


class TopKRows:
    """`classify`'s sink: each image's top-k labels with their probabilities, put back in input order."""

    def __init__(self, labels: Sequence[str]):
        self.labels = labels
        self.found: dict[int, dict] = {}  # input index -> prediction

    def add(self, batch: EncodedBatch) -> None:
        classes, probabilities = batch.outputs["classes"].tolist(), batch.outputs["probabilities"].tolist()
        for index, path, idx, p in zip(batch.indices, batch.paths, classes, probabilities):
            self.found[index] = {
                "path": str(path),
                "top_k": [{"index": i, "label": self.labels[i], "probability": q} for i, q in zip(idx, p)],
            }

    def close(self, skipped: Skipped) -> None:
        pass  # the run lists them

    @property
    def predictions(self) -> list[dict]:
        return [self.found[index] for index in sorted(self.found)]


def classify(
    model: "AIM | ProbedAIMv2 | ZeroShotClassifier",
    inputs: Sequence,
    *,
    top_k: int = TOP_K,
    batch_size: int = BATCH_SIZE,
    labels: Optional[Sequence[str]] = None,
    num_workers: int = NUM_WORKERS,
    model_name: str = "",
    progress: bool = True,
    preprocessing: Optional[Preprocessing] = None,
) -> ClassifyResult:
    """Top-k classes with softmax probabilities for every image named by `inputs` (files, folders, globs), in
    input order. `preprocessing`: default `preprocessing_for(model.config)` (the family's default; the command
    line passes the checkpoint folder's file). A trunk without a trained head is refused (`check_classifier`)."""
    check_classifier(model, model_name)
    num_classes = model.config.num_classes
    labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"labels: {len(labels)} names for a model with {num_classes} classes")
    if not 1 <= top_k:
        raise ValueError(f"top_k={top_k}: expected a positive integer")
    top_k = min(top_k, num_classes)
    run = EncodeRun(preprocessing or preprocessing_for(model.config), batch_size=batch_size, num_workers=num_workers,
                    group_by_shape=is_native(model.config), progress=progress, desc="classify")
    rows = TopKRows(labels)
    run.encode(run.gather(inputs), top_k_classes(model, top_k), rows)
    return ClassifyResult(rows.predictions, run.skipped, run.seconds, run.model_seconds)
