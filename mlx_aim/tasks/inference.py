"""Opening a model for the commands that run one over images (`classify`, `extract-features`, `probe`).

`open_model` loads what `mlx_aim.load` accepts, or (with `random_init`) the same architecture with fresh seeded
weights (`build_model`), or with a head file a probe head on a trunk or a zero-shot head on an AIMv2-LiT
(`zeroshot.ZeroShotClassifier`, which `classify.classify` takes as it takes a model).

It sits above the jobs and zero-shot: zero-shot classification is built on `classify`, and opening a zero-shot head
is the one thing here that needs `zeroshot`; so the jobs (`classify`, `features`, `search`, the probe's features) and
the encoding pipeline under them (`encode`) import neither this module nor `zeroshot`.
"""

from __future__ import annotations

import os
from typing import Optional

from ..checkpoints.loading import load, source_config
from ..checkpoints.sources import ModelSource, as_list, local_folder
from ..data import is_native
from ..models.model import TrunkModel, build_model
from .zeroshot import ZeroShotClassifier, is_zero_shot_head, open_zero_shot


def open_model(
    model: str | os.PathLike,
    *,
    dtype=None,
    quantize=None,
    probe_layers=None,
    random_init: bool = False,
    seed: int = 0,
    max_patches: Optional[int] = None,
    head: Optional[str | os.PathLike] = None,
) -> TrunkModel | ZeroShotClassifier:
    """`mlx_aim.load(model, ...)`, or with `random_init` the same architecture (stored quantization aside) with
    the paper's initialisation drawn from `seed` (`build_model`): the random-init baseline, a trunk without a probe.
    Either records its source in `.source` (`ModelSource`: what was named, the folder of its preprocessor_config.json,
    ...).

    `max_patches` replaces a native-resolution model's guard (config `max_patches`, which `preprocessing_for`
    reads too); a fixed-size model refuses it, having no use for it.

    `head`: a head file to classify with, told apart by its metadata: a probe head (Apple's `head.*` keys) for an
    AIM or AIMv2 trunk (`load(..., head=...)`), or a zero-shot head (`mlx-aim zero-shot --save-head`) for an
    AIMv2-LiT, which gives a `zeroshot.ZeroShotClassifier` on the LiT's image side (`open_zero_shot`)."""
    if head is not None and is_zero_shot_head(head):
        if random_init or probe_layers is not None or max_patches is not None:
            raise ValueError(f"{head}: a zero-shot head classifies with the AIMv2-LiT's own image side; random "
                             "weights, probe layers and max_patches do not apply to it")
        return open_zero_shot(model, head, dtype=dtype, quantize=quantize)
    if random_init and head is not None:
        raise ValueError(f"{head}: a head file goes on a loaded model, not on a random-init baseline")
    if random_init:
        config = source_config(model, probe_layers).replace(quantization=None)
        opened = build_model(config, dtype, quantize, seed=seed)
        opened.source = ModelSource(tuple(as_list(model)), local_folder(model),
                                    f"random init (seed {seed}) of the architecture of {model}")
    else:
        opened = load(model, dtype=dtype, quantize=quantize, probe_layers=probe_layers, head=head)
    if max_patches is not None:
        if not is_native(opened.config):
            raise ValueError(f"max_patches={max_patches}: {model} takes {opened.config.image_size}x"
                             f"{opened.config.image_size} images; the limit applies to native-resolution models "
                             "(aimv2-large-patch14-native) only")
        opened.config = opened.config.replace(max_patches=max_patches)
    return opened
