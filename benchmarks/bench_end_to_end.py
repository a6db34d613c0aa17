"""Measure classification, feature extraction and search indexing end to end on a folder of camera-size photos
(JPEG, HEIC, or both): decode, resize, model.

- photos: --num-images photo-like images (smooth colour gradients, filled shapes, fine texture and sensor-like
  noise, so the decoder sees a realistic share of non-zero coefficients) at phone-camera sizes, 4032x3024
  landscape and 3024x4032 portrait alternating. --format jpeg: JPEG quality 90; heic: HEIC through pillow-heif
  (x265, quality HEIC_QUALITY, preset ultrafast: the default preset takes minutes per photo on 2 cores; about the
  size of an iPhone's 12-megapixel HEIC); mixed: two JPEGs, then two HEICs, and so on (both orientations in both
  formats). Drawn from a seed once into --workdir and reused.
- model: a random-weight --preset folder with its head (`write_random_model`); head.* weights load as a trained
  head, so classify accepts it. The search_index job: a random-weight full-size LiT (`AIMv2LiTConfig()`, the shape
  of aimv2-large-patch14-224-lit), image side only, as `mlx-aim search index` loads it.
- one process runs the --jobs over the folder: `classify.classify`, `features.extract_features` (features
  "embedding"), `search.build_index` (a new index), each reporting end-to-end images/s, model-only images/s
  (images / model_seconds, the time spent in the model's forward) and their ratio: the share of the model's speed
  the whole pipeline keeps. Decoding runs in the data layer's --num-workers threads while the model runs.
- decode alone, per format, in this thread, no model, on up to --decode-images photos of each format:
  `load_image` (decoding to upright RGB), then the model's preprocessing (`preprocessing_for`: decoding again,
  resize, crop, normalise): seconds per image.

    python benchmarks/bench_end_to_end.py --num-images 200 --batch-size 8 --json
    python benchmarks/bench_end_to_end.py --format mixed --jobs search_index --num-images 48 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

import mlx_aim  # noqa: F401  (loads the optimized BLAS, where there is one, before mlx)
from mlx_aim import platforms
from mlx_aim.apps.benchmark import machine_info, write_random_model
from mlx_aim.models.config import AIMv2LiTConfig, get_config
from mlx_aim.data import NUM_WORKERS, load_image, missing_support, preprocessing_for
from mlx_aim.tasks.classify import classify
from mlx_aim.tasks.features import extract_features
from mlx_aim.tasks.inference import open_model
from mlx_aim.tasks.search import build_index

CAMERA_SIZE = (4032, 3024)  # a 12-megapixel phone camera; photos alternate landscape and portrait
JPEG_QUALITY = 90
HEIC_QUALITY = 60  # x265 at preset ultrafast: about 2 MiB for these photos, the size of the JPEGs
FORMATS = ("jpeg", "heic", "mixed")
SUFFIXES = {"jpeg": ".jpg", "heic": ".heic"}
JOBS = ("classify", "extract_features", "search_index")
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "mlx-aim-end-to-end"


def draw_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a smooth two-axis colour gradient, a few dozen filled shapes, a low-frequency
    texture and per-pixel luminance noise (sigma 3 levels), as a camera's sensor leaves. The full-size work is
    Pillow's resizes, shapes and channel adds and a tiled uint8 noise, so 200 camera-size photos take a minute or two.
    Deterministic given `rng`."""
    small = (max(width // 8, 2), max(height // 8, 2))
    y = np.linspace(0.0, 1.0, small[1], dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, small[0], dtype=np.float32)[None, :, None]
    corners = rng.uniform(20, 235, size=(3, 3)).astype(np.float32)
    base = corners[0] + (corners[1] - corners[0]) * x + (corners[2] - corners[0]) * y  # (h, w, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 40))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20 + 1, width // 3 + 2)), int(rng.integers(height // 20 + 1, height // 3 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(2))]
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    texture = Image.fromarray(rng.normal(128.0, 40.0, (max(height // 16, 1), max(width // 16, 1))).clip(0, 255)
                              .astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    texture = texture.point(lambda v: 128 + (v - 128) // 6)  # +-20 levels of soft texture
    # Sensor noise: a seeded 512x512 Gaussian tile (sigma 3, centred on 128), rolled at random and tiled.
    tile = np.roll(rng.normal(128.0, 3.0, (512, 512)).round().clip(0, 255).astype(np.uint8),
                   tuple(int(v) for v in rng.integers(0, 512, 2)), axis=(0, 1))
    noise = Image.fromarray(np.tile(tile, (-(-height // 512), -(-width // 512)))[:height, :width])
    grain = ImageChops.add(texture, noise, scale=1.0, offset=-128)
    return ImageChops.add(img, Image.merge("RGB", (grain, grain, grain)), scale=1.0, offset=-128)


def photo_sizes(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(width, height) of the landscape and the portrait photos."""
    return (max(size), min(size)), (min(size), max(size))


def photo_kind(fmt: str, i: int) -> str:
    """The format of photo `i` in a folder of `fmt` ("mixed": two JPEGs, two HEICs, ...)."""
    return fmt if fmt != "mixed" else ("jpeg", "heic")[(i // 2) % 2]


def write_photos(folder: Path, count: int, size: tuple[int, int] = CAMERA_SIZE, seed: int = 0,
                 fmt: str = "jpeg") -> list[Path]:
    """`count` photos in `folder`, photo-00000.jpg (or .heic) ..., landscape and portrait in turn, in format `fmt`;
    files already there are kept (same seed, same pixels: photo i of every format shows the same picture)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind = photo_kind(fmt, i)
        path = folder / f"photo-{i:05d}{SUFFIXES[kind]}"
        if not path.exists():
            width, height = photo_sizes(size)[i % 2]
            partial = path.with_name(path.name + ".tmp")
            photo = draw_photo(np.random.default_rng([seed, i]), width, height)
            if kind == "jpeg":
                photo.save(partial, format="JPEG", quality=JPEG_QUALITY)
            else:
                photo.save(partial, format="HEIF", quality=HEIC_QUALITY, enc_params={"preset": "ultrafast"})
            partial.replace(path)
        paths.append(path)
    return paths


def decode_seconds(paths: list[Path], preprocessing, per_kind: int) -> dict:
    """Per format (by extension), on its first `per_kind` photos: `load_image` alone (decode to upright RGB; wall
    and CPU seconds, the CPU time less sensitive to other jobs on the machine), then the model's preprocessing
    alone (decode, resize, crop, normalise), in this thread, seconds per image. The photos are timed in folder
    order, so in a mixed folder the formats take turns under the same machine load."""
    timed: dict[str, dict[str, list]] = {}
    for path in paths:
        kind = next(k for k, suffix in SUFFIXES.items() if path.suffix == suffix)
        times = timed.setdefault(kind, {"load": [], "cpu": [], "prep": [], "bytes": []})
        if len(times["load"]) == per_kind:
            continue
        tick, cpu = time.perf_counter(), time.process_time()
        load_image(path)
        times["load"].append(time.perf_counter() - tick)
        times["cpu"].append(time.process_time() - cpu)  # every thread's: the decoder may use several
        tick = time.perf_counter()
        preprocessing(path)
        times["prep"].append(time.perf_counter() - tick)
        times["bytes"].append(path.stat().st_size)
    return {kind: {"images": len(t["prep"]), "mean_seconds": float(np.mean(t["prep"])),
                   "median_seconds": float(np.median(t["prep"])),
                   "images_per_second_one_thread": len(t["prep"]) / float(np.sum(t["prep"])),
                   "load_image_mean_seconds": float(np.mean(t["load"])),
                   "load_image_median_seconds": float(np.median(t["load"])),
                   "load_image_cpu_mean_seconds": float(np.mean(t["cpu"])), "bytes_mean": int(np.mean(t["bytes"]))}
            for kind, t in timed.items()}


def _ratio_row(result) -> dict:
    """A job's images, wall and model seconds, and rates, from its result unrounded (the results' `to_dict` rounds
    the rates to 3 decimals: 0.5% at 0.1 images/s). The ratio is model seconds / wall seconds."""
    n = result.to_dict()["num_images"]
    return {"num_images": n, "seconds": round(result.seconds, 3), "model_seconds": round(result.model_seconds, 3),
            "images_per_second": n / result.seconds, "model_images_per_second": n / result.model_seconds,
            "ratio": round(result.model_seconds / result.seconds, 4)}


def _load_report() -> dict:
    info = {}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


def cpu_model() -> str:
    return platforms.probe_cpu_record().get("cpu_model", "unknown")


def index_job(workdir: Path, folder: Path, args):
    """A new search index of `folder` with a random-weight full-size LiT's image side."""
    model_dir = workdir / "model-lit-large"
    if not (model_dir / "config.json").exists():
        write_random_model(model_dir, AIMv2LiTConfig(), force=True)
    model = mlx_aim.load(model_dir, text_tower=False)
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        return build_index(model, [folder], Path(out) / "index", model_name=str(model_dir),
                           batch_size=args.batch_size, num_workers=args.num_workers, progress=False)


def run(args) -> dict:
    workdir = Path(args.workdir)
    size = photo_sizes(args.photo_size)[0]
    if args.format != "jpeg" and missing_support("photo.heic"):
        raise SystemExit(missing_support("photo.heic"))
    photos_dir = workdir / f"photos-{size[0]}x{size[1]}-q{JPEG_QUALITY}"  # HEICs beside the JPEGs: photo-k.heic
    tick = time.perf_counter()
    paths = write_photos(photos_dir, args.num_images, size, fmt=args.format)
    photos_seconds = time.perf_counter() - tick
    # Only the first --num-images photos take part, even where the cache holds more.
    name = f"photos-{size[0]}x{size[1]}-first-{args.num_images}"
    folder = workdir / (name if args.format == "jpeg" else f"{name}-{args.format}")
    folder.mkdir(exist_ok=True)
    for path in paths:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    model_dir = workdir / f"model-{args.preset}"
    if not (model_dir / "config.json").exists():
        write_random_model(model_dir, get_config(args.preset), force=True)
    model = open_model(model_dir)
    preprocessing = preprocessing_for(model.config)
    report = {
        "machine": {**machine_info(), "cpu_model": cpu_model()},
        "settings": {"preset": args.preset, "lit": "AIMv2LiTConfig() (aimv2-large-patch14-224-lit's shape)",
                     "format": args.format, "jobs": args.jobs, "num_images": args.num_images,
                     "batch_size": args.batch_size, "num_workers": args.num_workers,
                     "photo_sizes": [list(s) for s in photo_sizes(size)], "jpeg_quality": JPEG_QUALITY,
                     "heic_quality": HEIC_QUALITY, "preprocessing": preprocessing.settings(),
                     "photo_bytes_mean": int(np.mean([p.stat().st_size for p in paths])),
                     "photos_written_seconds": round(photos_seconds, 2)},
        "load_before": _load_report(),
    }
    report["decode"] = decode_seconds(paths, preprocessing, args.decode_images)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
    if "classify" in args.jobs:
        report["classify"] = _ratio_row(classify(model, [folder], **common))
    if "extract_features" in args.jobs:
        with tempfile.TemporaryDirectory(dir=workdir) as out:
            extracted = extract_features(model, [folder], out, features="embedding", overwrite=True, **common)
        report["extract_features"] = _ratio_row(extracted)
    if "search_index" in args.jobs:
        report["search_index"] = _ratio_row(index_job(workdir, folder, args))
    report["load_after"] = _load_report()
    for job in args.jobs:
        if report[job]["num_images"] != args.num_images:
            raise SystemExit(f"{job}: {report[job]['num_images']} of {args.num_images} images used")
    return report


def print_table(report: dict) -> None:
    m, s = report["machine"], report["settings"]
    print(f"{s['num_images']} photos ({s['format']}) {s['photo_sizes'][0][0]}x{s['photo_sizes'][0][1]} / "
          f"{s['photo_sizes'][1][0]}x{s['photo_sizes'][1][1]}, JPEG quality {s['jpeg_quality']}, HEIC quality "
          f"{s['heic_quality']} (mean {s['photo_bytes_mean'] / 2**20:.2f} MiB); {s['preset']} (search_index: the "
          f"full-size LiT) random weights, batch {s['batch_size']}, {s['num_workers']} decode worker(s)")
    print(f"CPU {m['cpu_model']}; backend {m['backend_path']}; BLAS {m['blas'].get('name', '?')}; "
          f"load {report['load_before'].get('load_average')} before, {report['load_after'].get('load_average')} after")
    for kind, d in report["decode"].items():
        print(f"{kind} alone (one thread, {d['images']} images, mean {d['bytes_mean'] / 2**20:.2f} MiB): load_image "
              f"{d['load_image_mean_seconds'] * 1000:.1f} ms/image mean ({d['load_image_median_seconds'] * 1000:.1f} "
              f"median, {d['load_image_cpu_mean_seconds'] * 1000:.1f} CPU); decode + preprocess "
              f"{d['mean_seconds'] * 1000:.1f} ms mean, {d['median_seconds'] * 1000:.1f} ms median")
    print(f"{'job':<18} {'images/s':>10} {'model images/s':>15} {'ratio':>7} {'seconds':>9}")
    for job in s["jobs"]:
        r = report[job]
        print(f"{job:<18} {r['images_per_second']:>10.3f} {r['model_images_per_second']:>15.3f} "
              f"{r['ratio']:>7.1%} {r['seconds']:>9.1f}")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4032x3024") from None
    if min(width, height) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive sides")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    parser.add_argument("--preset", default="aim-600M")
    parser.add_argument("--format", choices=FORMATS, default="jpeg", help="the photos' format (default jpeg)")
    parser.add_argument("--jobs", nargs="*", choices=JOBS, default=["classify", "extract_features"],
                        help="the jobs timed, in this order (default classify extract_features; none: decoding only)")
    parser.add_argument("--photo-size", type=_size, default=CAMERA_SIZE, metavar="WxH",
                        help="photo size, landscape and portrait in turn (default 4032x3024)")
    parser.add_argument("--decode-images", type=int, default=20,
                        help="photos of each format timed for decoding and preprocessing alone")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="cache of the photos and the model folder")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object, last")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1 or args.num_workers < 0 or args.decode_images < 1:
        raise SystemExit("--num-images, --batch-size and --decode-images take positive integers, --num-workers >= 0")
    report = run(args)
    print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
