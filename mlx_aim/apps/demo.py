"""The main job on a built-in default, with nothing to download: pre-train a small AIM, probe it, compare.

    mlx-aim demo                  # ~minutes on a laptop CPU: data, pre-training, two probes, figure
    mlx-aim demo --model aim-600M # classify the bundled sample images with a released model instead

(or `python scripts/demo.py`; the command line is `mlx_aim.cli.demo`, which prints what `run_demo` returns.)

The run (`run_demo`):
1. draws the built-in synthetic shapes dataset (`mlx_aim.data.synthetic`: 10 classes that differ in shape, not
   in colour) into an image folder, once (a folder already complete is reused);
2. pre-trains a small AIM on its training images for a fixed budget (`mlx_aim.training.pretrain.pretrain`: the AIM
   objective, prefix attention, the released recipe's optimiser and augmentation);
3. trains the same attentive probe (`mlx_aim.training.probe.train_probe`, cached frozen features) on the
   pre-trained trunk and on the trunk as it was before pre-training (the same seeded initialisation), and
   reports both top-1 accuracies on held-out images: the difference is what pre-training learned;
4. writes a PNG with the pre-training loss curve and the model's next-patch predictions on a few
   held-out images.

Decisions made here (measured on a 2-core x86 CPU; the figures are in docs/demo.md):
- The model is aim-tiny's layout scaled down until a few minutes of pre-training on a laptop CPU clearly
  beat a random trunk: 32x32 images in 8x8-pixel patches (a 4x4 grid, 16 tokens), width 64, depth 4,
  4 heads, a 2-block pixel head, 2000 steps of 32 images at lr 2e-3. What mattered was the number of
  optimiser steps: the first recipe (4x4-pixel patches, width 128, depth 6, 200 steps at lr 1e-3,
  49 images/s) gained 1.9 points over the random trunk; this one runs 335 images/s, so ten times the
  steps fit in about three minutes, and gains 9-12 points.
- The probe reads every block (the mean of their features), trains on all 4000 training images for 40
  epochs at lr 1e-2. On seed 0's trunks the gain was 12.0 points; 5.1 with the released probe recipe's
  lr 1e-3, 9.4 with 20 epochs, 9.0 with 2000 images.
- The baseline is the pre-training run's own initialisation (seeded, xavier-uniform), so the comparison
  isolates what the pre-training steps added.
- The run folder is named by seed and budget and pre-training resumes there: an interrupted demo
  continues where it stopped, and a finished one is reused (`force` starts over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from ..models.config import AIMConfig, get_config
from ..data import ImageFolder, load_splits
from ..fileio import write_json
from ..models.lora import trainable_parameters
from ..models.model import AIMEncoder, build_model
from ..training.finetune import FinetuneConfig, finetune
from ..training.probe import ProbeConfig, train_probe, trunk_description
from ..data.synthetic import SHAPE_CLASSES, render, write_image_folder
from ..training.runs import silent
from ..checkpoints.run_folders import DEMO_RUN_DIR, MODEL_DIR
from ..training.pretrain import TrainConfig, finished_pretraining, load_pretraining_checkpoint, loss_records, pretrain
from ..tasks.visualize import compose_figure, draw_loss_curve, prediction_panel, save_png

ASSETS = Path(__file__).parents[1] / "assets"
# The bundled sample images for `--model`: synthetic shapes at 128 px, drawn by `write_sample_images`.
SAMPLE_CLASSES = ("disc", "ring", "star", "stripes", "checkerboard", "dots")
SAMPLE_SIZE = 128
SAMPLE_SEED = 7


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers: data, model, pre-training and probe budgets."""

    # Data: the synthetic shapes (`mlx_aim.data.synthetic`), drawn once into an image folder.
    image_size: int = 32
    num_classes: int = 10
    num_train: int = 4000  # pre-training images, and the pool of the probe's training images
    num_val: int = 1000  # held-out images: the probe's top-1 and the pre-training validation loss
    probe_train: int = 4000  # the probe trains on training images 0 .. probe_train - 1 (balanced classes)
    # Model: aim-tiny's layout, scaled down to fit minutes on a CPU (see the module docstring).
    patch_size: int = 8
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    head_width: int = 64
    head_depth: int = 2
    probe_layers: Optional[tuple[int, ...]] = None  # None: every block (the last min(6, depth))
    # Pre-training (the rest of the recipe is `TrainConfig`'s: AdamW (0.9, 0.95), wd 0.05, clip 1.0).
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_frac: float = 0.05
    crop_scale: tuple[float, float] = (0.4, 1.0)
    val_images: int = 256
    # The attentive probe (the rest is `ProbeConfig`'s).
    probe_epochs: int = 40
    probe_batch_size: int = 128
    probe_lr: float = 1e-2
    # Fine-tuning (`--finetune`; the rest is `FinetuneConfig`'s): the pre-trained trunk with the same probe head,
    # LoRA (rank 8 on qkv and proj) or every weight, on the probe's training images without augmentation.
    finetune_epochs: int = 20
    finetune_batch_size: int = 128
    lora_lr: float = 1e-2
    full_lr: float = 2e-3

    def model_config(self) -> AIMConfig:
        layers = list(self.probe_layers) if self.probe_layers is not None else "last"
        return get_config(
            "aim-tiny", probe_layers=layers, image_size=self.image_size, patch_size=self.patch_size,
            width=self.width, depth=self.depth, num_heads=self.num_heads, head_width=self.head_width,
            head_depth=self.head_depth, num_classes=self.num_classes,
        ).replace(name="aim-demo")

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_frac=self.warmup_frac,
            crop_scale=self.crop_scale, seed=seed, val_images=self.val_images, log_interval=1,
            val_interval=-(-self.steps // 4), ckpt_interval=-(-self.steps // 4), keep_last=1,
        )

    def probe_config(self, seed: int) -> ProbeConfig:
        return ProbeConfig(epochs=self.probe_epochs, batch_size=self.probe_batch_size, lr=self.probe_lr,
                           seed=seed, eval_batch_size=256)

    def finetune_config(self, mode: str, seed: int) -> FinetuneConfig:
        return FinetuneConfig(fine_tune_type=mode, epochs=self.finetune_epochs, batch_size=self.finetune_batch_size,
                              lr=self.lora_lr if mode == "lora" else self.full_lr, augment=False, seed=seed,
                              eval_batch_size=256, log_interval=10)

    def replace(self, **changes) -> "DemoConfig":
        return dataclasses.replace(self, **changes)


DEFAULT = DemoConfig()
# A much smaller budget with the same pieces, for tests: seconds, not minutes; numbers not meaningful.
QUICK = DemoConfig(
    image_size=16, num_classes=4, num_train=96, num_val=32, probe_train=64, patch_size=4, width=32, depth=2,
    num_heads=2, head_width=32, head_depth=1, steps=6, batch_size=16, val_images=32, probe_epochs=3,
    probe_batch_size=32, finetune_epochs=2, finetune_batch_size=32,
)


# ---------------------------------------------------------------------------------------------------
# The pieces


def run_name(seed: int, quick: bool, steps: Optional[int], config: Optional[DemoConfig] = None) -> str:
    """The run folder's name: one folder per seed and budget, so a re-run resumes or reuses its own."""
    name = f"seed{seed}" + ("-quick" if quick else "") + (f"-steps{steps}" if steps is not None else "")
    if config is not None and config not in (DEFAULT, QUICK):
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()
        name += f"-custom{digest[:8]}"
    return name


def probe_splits(data_root: Path, probe_train: int) -> tuple[ImageFolder, ImageFolder]:
    """The probe's (train, val) image folders: training images with index < `probe_train` (file `<i>.png`,
    label i % classes, so balanced), and all held-out images."""
    train, val = load_splits(data_root)
    chosen = [k for k, (path, _) in enumerate(train.samples) if int(path.stem) < probe_train]
    return train.subset(chosen), val


def _file_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def probe_trunk(model: AIMEncoder, trunk: dict, data: tuple[ImageFolder, ImageFolder], out: Path, cfg: DemoConfig,
                seed: int, progress: bool, echo: Callable) -> dict:
    """Trains the attentive probe on `model`'s frozen features; returns its validation metrics."""
    result = train_probe(model, data, out, cfg.probe_config(seed), trunk=trunk, force=True,
                         save_model_folder=False, progress=progress, echo=echo)
    return {"val": result.metrics["val"], "train": result.metrics.get("train"),
            "first_loss": result.losses[0], "last_loss": result.losses[-1]}


# ---------------------------------------------------------------------------------------------------
# The run


def run_demo(
    out: Union[str, os.PathLike] = "mlx_aim_demo",
    seed: int = 0,
    *,
    quick: bool = False,
    steps: Optional[int] = None,
    config: Optional[DemoConfig] = None,
    force: bool = False,
    progress: bool = True,
    echo: Optional[Callable[[str], None]] = None,
) -> dict:
    """Runs the whole demo under `out`; returns its figures (what `--json` prints).

    `quick` uses `QUICK` (a tiny budget for tests) instead of `DEFAULT`, `config` any other `DemoConfig`;
    `steps` overrides the pre-training steps; `force` discards this seed's earlier run folder (the image
    folder is kept: it is deterministic). `echo` receives a line per stage (the command line prints them);
    by default they go nowhere.
    """
    echo = echo or silent
    start_time = time.perf_counter()
    cfg = config if config is not None else QUICK if quick else DEFAULT
    name = run_name(seed, quick, steps, cfg)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps={steps}: expected a positive number of pre-training steps")
        cfg = cfg.replace(steps=steps)
    if seed < 0:
        raise ValueError(f"seed={seed}: expected an integer >= 0")
    out = Path(out)
    shapes = f"shapes-{cfg.image_size}px-{cfg.num_classes}cls-{cfg.num_train}-{cfg.num_val}-seed{seed}"
    data_root = out / "data" / shapes
    run_dir = out / name
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    model_config = cfg.model_config()
    train_config = cfg.train_config(seed)

    echo(f"[1/4] synthetic shapes: {cfg.num_train} training + {cfg.num_val} held-out images, "
         f"{cfg.image_size}x{cfg.image_size}, {cfg.num_classes} classes -> {data_root}")
    tick = time.perf_counter()
    write_image_folder(data_root, cfg.num_train, cfg.num_val, cfg.image_size, seed, cfg.num_classes)
    seconds = {"data": time.perf_counter() - tick}

    grid = cfg.image_size // cfg.patch_size
    echo(f"[2/4] pre-training: {cfg.steps} steps of {cfg.batch_size} images (width {cfg.width}, depth {cfg.depth}, "
         f"{cfg.patch_size}x{cfg.patch_size}-pixel patches, a {grid}x{grid} grid of {grid * grid} patches) "
         f"-> {run_dir}")
    tick = time.perf_counter()
    pre_dir = run_dir / DEMO_RUN_DIR
    summary = finished_pretraining(pre_dir, model_config, train_config)
    if summary is not None:
        echo(f"  reusing the finished run in {pre_dir} (--force starts it over)")
    else:
        summary = pretrain(model_config, train_config, data_root, pre_dir, resume=True, progress=progress,
                           echo=echo)
    seconds["pretrain"] = time.perf_counter() - tick
    train_losses, val_losses = loss_records(pre_dir)
    if not train_losses:
        raise RuntimeError(f"{pre_dir}: the pre-training log holds no loss records")
    last = [v for _, v in train_losses[-10:]]

    echo(f"[3/4] attentive probes on frozen features: {cfg.probe_train} training images, "
         f"{cfg.num_val} held-out images, {cfg.probe_epochs} epochs each")
    tick = time.perf_counter()
    data = probe_splits(data_root, cfg.probe_train)
    import mlx_aim  # the package's loader: the exported trunk is an ordinary model folder

    model_dir = pre_dir / MODEL_DIR
    pretrained = mlx_aim.load(model_dir)
    random_trunk = build_model(model_config, seed=seed)  # the trunk exactly as pre-training with `seed` started
    trunks = {
        "random": (random_trunk, trunk_description(random_trunk, f"pre-training initialisation (seed {seed})",
                                                   random_init=True, seed=seed)),
        "pretrained": (pretrained, dict(trunk_description(pretrained, str(model_dir)),
                                        weights_sha256=_file_sha256(model_dir))),
    }
    probes = {}
    for name, (model, trunk) in trunks.items():
        echo(f"  probe on the {'randomly initialised' if name == 'random' else 'pre-trained'} trunk")
        probes[name] = probe_trunk(model, trunk, data, run_dir / f"probe-{name}", cfg, seed, progress, echo)
    seconds["probe"] = time.perf_counter() - tick

    echo("[4/4] figure: loss curve and next-patch predictions")
    tick = time.perf_counter()
    figure_path = run_dir / "demo.png"
    pixel_model, _ = load_pretraining_checkpoint(pre_dir)  # the pre-trained model with its pixel head
    grid = prediction_panel(pixel_model, data[1], count=4)
    panels = [draw_loss_curve(train_losses, val_losses, size=(560, grid.height),
                              title=f"pre-training loss ({cfg.steps} steps of {cfg.batch_size} images)"),
              grid]
    caption = (f"probe top-1: pre-trained {100 * probes['pretrained']['val']['top1']:.1f}%, "
               f"random init {100 * probes['random']['val']['top1']:.1f}%")
    save_png(compose_figure(panels, caption), figure_path)
    seconds["figure"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - start_time

    result = {
        "seed": seed,
        "quick": quick,
        "num_classes": cfg.num_classes,
        "probe_train": len(data[0]),
        "model": {k: v for k, v in model_config.to_dict().items()
                  if k in ("image_size", "patch_size", "width", "depth", "num_heads", "head_width",
                           "head_depth", "probe_layers")},
        "pretraining": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "loss_start": train_losses[0][1],
            "loss_end": float(np.mean(last)),
            "val_loss": val_losses[-1][1] if val_losses else None,
            "images_per_s": summary.get("images_per_s"),
        },
        "probe": {name: {"top1": p["val"]["top1"], "top5": p["val"]["top5"], "num_images": p["val"]["num_images"],
                         "train_top1": p["train"]["top1"] if p["train"] else None}
                  for name, p in probes.items()},
        "gain_points": 100 * (probes["pretrained"]["val"]["top1"] - probes["random"]["val"]["top1"]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "run_dir": str(run_dir),
        "data_root": str(data_root),
        "checkpoint": summary.get("checkpoint"),
        "model_dir": str(model_dir),
        "figure": str(figure_path),
    }
    write_json(run_dir / "demo.json", result)
    return result


# ---------------------------------------------------------------------------------------------------
# `--finetune`: the probe against LoRA and full fine-tuning of the pre-trained trunk (AIM section 5.5)


FINETUNE_METHODS = ("probe", "lora", "full")
FINETUNE_DIR = "finetune"


def _finetune_once(method: str, seed: int, model_dir: Path, data: tuple[ImageFolder, ImageFolder], folder: Path,
                   cfg: DemoConfig, progress: bool, echo: Callable) -> dict:
    """One method with one seed, from the pre-trained trunk: its validation top-1 and top-5, what it trained, its
    wall time."""
    import mlx_aim  # the package's loader: the exported trunk is an ordinary model folder

    tick = time.perf_counter()
    if method == "probe":
        model = mlx_aim.load(model_dir)
        result = train_probe(model, data, folder, cfg.probe_config(seed), trunk=trunk_description(model, str(model_dir)),
                             force=True, save_model_folder=False, progress=progress, echo=echo)
        val, trained = result.metrics["val"], trainable_parameters(result.head)
    else:
        result = finetune(model_dir, data, folder, cfg.finetune_config(method, seed), force=True, progress=progress,
                          echo=echo)
        val, trained = result.metrics["val"], result.trainable
    return {"method": method, "seed": seed, "top1": val["top1"], "top5": val["top5"], "num_images": val["num_images"],
            "trainable_parameters": trained, "seconds": round(time.perf_counter() - tick, 1)}


def compare_finetuning(demo: dict, seeds=(0, 1, 2), *, config: Optional[DemoConfig] = None, quick: bool = False,
                       progress: bool = True, echo: Optional[Callable[[str], None]] = None) -> dict:
    """The attentive probe (the demo's recipe), LoRA and full fine-tuning (`DemoConfig.finetune_config`) of the
    demo's pre-trained trunk (`demo`: what `run_demo` returned), each with every seed in `seeds` (the head's and
    adapters' initialisation and the data order; the trunk and the images stay), evaluated on the held-out images.

    Each (method, seed) result is written to RUN/finetune/METHOD-seedN.json and reused by a later call, so an
    interrupted comparison continues where it stopped. Returns per method its runs, the range of top-1 over the seeds,
    the trainable parameters and the median wall time, and which method beats which: "beats" means the seeds' ranges
    do not overlap (the worst seed of one above the best of the other)."""
    echo = echo or silent
    cfg = config if config is not None else QUICK if quick else DEFAULT
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: expected distinct integers >= 0")
    run_dir, model_dir = Path(demo["run_dir"]), Path(demo["model_dir"])
    data_root = Path(demo["data_root"])
    data = probe_splits(data_root, cfg.probe_train)
    methods = {}
    for method in FINETUNE_METHODS:
        runs = []
        for seed in seeds:
            record = run_dir / FINETUNE_DIR / f"{method}-seed{seed}.json"
            if record.is_file():
                runs.append(json.loads(record.read_text()))
                echo(f"  {method}, seed {seed}: reusing {record}")
                continue
            echo(f"  {method}, seed {seed}")
            result = _finetune_once(method, seed, model_dir, data, run_dir / FINETUNE_DIR / f"{method}-seed{seed}",
                                    cfg, progress, echo)
            write_json(record, result)
            runs.append(result)
        top1 = [r["top1"] for r in runs]
        methods[method] = {"runs": runs, "top1_min": min(top1), "top1_max": max(top1),
                           "top1_mean": float(np.mean(top1)), "trainable_parameters": runs[0]["trainable_parameters"],
                           "seconds_median": float(np.median([r["seconds"] for r in runs]))}

    def beats(a: str, b: str) -> bool:
        return methods[a]["top1_min"] > methods[b]["top1_max"]

    result = {"seeds": seeds, "num_images": methods["probe"]["runs"][0]["num_images"],
              "num_train": len(data[0]), "methods": methods,
              "beats": {"lora_over_probe": beats("lora", "probe"), "full_over_lora": beats("full", "lora"),
                        "full_over_probe": beats("full", "probe")},
              "recipes": {"probe": cfg.probe_config(seeds[0]).recipe(),
                          "lora": cfg.finetune_config("lora", seeds[0]).recipe(),
                          "full": cfg.finetune_config("full", seeds[0]).recipe()}}
    write_json(run_dir / "finetune.json", result, default=str)
    return result


# ---------------------------------------------------------------------------------------------------
# `--model`: the bundled sample images through a released (or any) model


def sample_images() -> list[Path]:
    """The bundled sample images (`mlx_aim/assets/sample_*.png`)."""
    found = sorted(ASSETS.glob("sample_*.png"))
    if not found:
        raise FileNotFoundError(f"{ASSETS}: no sample_*.png images; the package data is incomplete "
                                "(reinstall mlx-aim, or regenerate them with mlx_aim.apps.demo.write_sample_images)")
    return found


def draw_sample(name: str) -> np.ndarray:
    """The bundled sample image of class `name`, uint8 (SAMPLE_SIZE, SAMPLE_SIZE, 3), deterministic."""
    label = SHAPE_CLASSES.index(name)
    rng = np.random.default_rng(np.random.SeedSequence([SAMPLE_SEED, label]))
    return render(label, rng, SAMPLE_SIZE)


def write_sample_images(folder: Union[str, os.PathLike] = ASSETS) -> list[Path]:
    """(Re)draws the bundled sample images into `folder` as `sample_<class>.png`."""
    folder = Path(folder)
    return [save_png(Image.fromarray(draw_sample(name)), folder / f"sample_{name}.png") for name in SAMPLE_CLASSES]
