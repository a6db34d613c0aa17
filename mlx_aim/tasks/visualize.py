"""Pictures drawn with Pillow, saved as PNG: next-patch prediction grids, loss curves, charts of several series
(`draw_chart`: the scaling figure's panels), figures of several panels, and contact sheets of search results.

The pixel head predicts normalised patches (zero mean, unit variance per patch), so a prediction is shown
un-normalised with the true patch's mean and standard deviation: the picture shows the structure the model
predicts, with the true patch's brightness and contrast. Patches inside the prefix (the first `prefix_len`,
by default only patch 0, which nothing predicts) are shown as they are.

    model, _ = load_pretraining_checkpoint("runs/tiny")      # needs the pixel head: a run or checkpoint folder
    save_prediction_grid(model, ["a.jpg", "b.png"], "grid.png")
    save_png(compose_figure([draw_loss_curve(train_losses, val_losses), prediction_panel(model, val)]), "fig.png")
    save_png(draw_contact_sheet(["a.jpg", "b.png"], [["#1  0.31", "a.jpg"], ["#2  0.27", "b.png"]]), "hits.png")
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageLoadError, eval_transform, load_image
from ..fileio import atomic_file
from ..models.objective import patchify, unpatchify

_EPS = 1e-6  # the target normalisation's eps (norm_pix_target)
_GAP = 4  # pixels between cells
_HEADER = 16  # pixels of the column titles


# ---------------------------------------------------------------------------------------------------
# Next-patch predictions


def next_patch_predictions(model, images: mx.array, prefix_len: int = 1) -> mx.array:
    """(B, H, W, C) normalised images -> the same shape, every patch from index `prefix_len` on replaced by
    the model's prediction of it (from the patches before it), un-normalised with its true mean and std."""
    c = model.config
    B, H, W, C = images.shape
    grid = (H // c.patch_size, W // c.patch_size)
    num_patches = grid[0] * grid[1]
    if not 1 <= prefix_len < num_patches:
        raise ValueError(f"prefix_len={prefix_len}: expected a value in [1, {num_patches - 1}]")
    attention = "prefix" if c.attention == "bidirectional" else "causal"
    prefix = mx.full((B,), prefix_len, dtype=mx.int32)
    pred = model(images, prefix if attention == "prefix" else None, attention=attention).astype(mx.float32)
    patches = patchify(images.astype(mx.float32), c.patch_size)
    mean = patches.mean(axis=-1, keepdims=True)
    std = mx.sqrt(mx.var(patches, axis=-1, keepdims=True, ddof=1) + _EPS)
    # Output i predicts patch i + 1.
    predicted = mx.concatenate([patches[:, :1], pred[:, :-1] * std[:, 1:] + mean[:, 1:]], axis=1)
    keep = (mx.arange(num_patches) < prefix_len)[None, :, None]
    return unpatchify(mx.where(keep, patches, predicted), c.patch_size, grid, C)


def to_uint8(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised float images -> uint8 pixels (undoing `(x - mean) / std`, clipping to [0, 255])."""
    pixels = np.asarray(images, dtype=np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(pixels, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def prediction_grid(model, images: np.ndarray, prefix_len: int = 1, cell: int = 128) -> np.ndarray:
    """uint8 RGB grid: one row per image, the input on the left and its next-patch predictions on the right,
    each scaled (nearest neighbour) to at least `cell` pixels high, under the column titles."""
    images = np.asarray(images, dtype=np.float32)
    predicted = np.concatenate([np.array(next_patch_predictions(model, mx.array(images[i : i + 16]), prefix_len))
                                for i in range(0, len(images), 16)])
    B, H, W, _ = images.shape
    scale = max(1, -(-cell // H))
    h, w = H * scale, W * scale
    canvas = np.full((_HEADER + B * (h + _GAP) + _GAP, 2 * w + 3 * _GAP, 3), 255, np.uint8)
    for row, pair in enumerate(zip(to_uint8(images), to_uint8(predicted))):
        top = _HEADER + _GAP + row * (h + _GAP)
        for col, picture in enumerate(pair):
            left = _GAP + col * (w + _GAP)
            canvas[top : top + h, left : left + w] = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    draw.text((_GAP, 2), "input", fill=(0, 0, 0))
    title = "next-patch predictions" if prefix_len == 1 else f"predictions after a {prefix_len}-patch prefix"
    draw.text((2 * _GAP + w, 2), title, fill=(0, 0, 0))
    return np.asarray(out)


def save_prediction_grid(
    model,
    images: Sequence[Union[str, os.PathLike]],
    out: Union[str, os.PathLike],
    prefix_len: int = 1,
    cell: int = 128,
) -> Path:
    """Loads `images` with the evaluation transform at the model's resolution and writes the grid as a PNG
    (under a temporary name, then renamed)."""
    if not images:
        raise ValueError("save_prediction_grid: no images given")
    batch = np.stack([eval_transform(path, model.config.image_size) for path in images])
    return save_png(Image.fromarray(prediction_grid(model, batch, prefix_len, cell)), out)


def prediction_panel(model, folder: ImageFolder, count: int = 4, cell: int = 128) -> Image.Image:
    """The next-patch prediction grid of `model` (with its pixel head) on the first image of each of the first
    `count` classes of `folder`, as an RGB PIL image."""
    firsts: dict[int, Path] = {}
    for path, label in folder.samples:
        firsts.setdefault(label, path)
    chosen = [firsts[label] for label in sorted(firsts)[:count]]
    batch = np.stack([eval_transform(path, model.config.image_size) for path in chosen])
    return Image.fromarray(prediction_grid(model, batch, prefix_len=1, cell=cell))


# ---------------------------------------------------------------------------------------------------
# Loss curves and figures


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


# The loss curve's colours: training loss per step (light), its moving average (dark), validation.
RAW_LOSS_COLOUR, SMOOTH_LOSS_COLOUR, VAL_LOSS_COLOUR = (174, 199, 232), (31, 119, 180), (214, 39, 40)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The mean of each value and the up to `window - 1` values before it (same length as `values`)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def draw_loss_curve(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]] = (),
                    size: tuple[int, int] = (520, 360), title: str = "pre-training loss") -> Image.Image:
    """A line plot of the training loss per step (light), its moving average over ~2% of the steps (dark)
    and the validation losses (dots), as an RGB PIL image."""
    if not train:
        raise ValueError("draw_loss_curve: no training loss records to plot")
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    left, right, top, bottom = 62, width - 16, 34, height - 44
    steps = [s for s, _ in train] + [s for s, _ in val]
    values = [v for _, v in train] + [v for _, v in val]
    x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)
    y_lo, y_hi = min(values), max(values)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_xy(step, value):
        x = left + (step - x_lo) / (x_hi - x_lo) * (right - left)
        y = bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top)
        return x, y

    draw.text((left, 8), title, fill="black", font=font)
    for tick in _nice_ticks(y_lo, y_hi):
        _, y = to_xy(x_lo, tick)
        draw.line([(left, y), (right, y)], fill=(228, 228, 228))
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=small, anchor="rm")
    for tick in _nice_ticks(x_lo, x_hi):
        x, _ = to_xy(tick, y_lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, height - 16), "step", fill="black", font=small, anchor="mm")
    window = max(1, len(train) // 50)
    smooth = moving_average([v for _, v in train], window)
    if len(train) > 1:
        if window > 1:
            draw.line([to_xy(s, v) for s, v in train], fill=RAW_LOSS_COLOUR, width=1)
        draw.line([to_xy(s, v) for (s, _), v in zip(train, smooth)], fill=SMOOTH_LOSS_COLOUR, width=2)
    else:
        x, y = to_xy(*train[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SMOOTH_LOSS_COLOUR)
    for s, v in val:
        x, y = to_xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=VAL_LOSS_COLOUR)
    legend = [("training, per step", RAW_LOSS_COLOUR)] if window > 1 else []
    legend += [(f"training, mean of {window} steps" if window > 1 else "training", SMOOTH_LOSS_COLOUR)]
    legend += [("validation (held-out images)", VAL_LOSS_COLOUR)] if val else []
    lx, ly = right - 200, top + 8
    for text, colour in legend:
        draw.line([(lx, ly + 6), (lx + 18, ly + 6)], fill=colour, width=3)
        draw.text((lx + 24, ly), text, fill="black", font=small)
        ly += 18
    return image


# The colours of a chart's series, in order (matplotlib's "tab10" first six).
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


@dataclass
class Series:
    """One series of a chart: (x, y) points, and optionally a (low, high) range of y per point (drawn as a
    vertical bar: the spread over seeds, say), an RGB colour (by default the next of `SERIES_COLOURS`) and a dashed
    line (a baseline, say)."""

    label: str
    points: Sequence[tuple[float, float]]
    ranges: Sequence[tuple[float, float]] = ()
    colour: Optional[tuple[int, int, int]] = None
    dashed: bool = False


def dashed_line(draw: ImageDraw.ImageDraw, xy: Sequence[tuple[float, float]], fill, width: int = 2,
                dash: float = 7.0, gap: float = 5.0) -> None:
    """A polyline through `xy` drawn as dashes of `dash` pixels `gap` pixels apart, the pattern running on across
    its vertices."""
    offset = 0.0  # where in the dash-gap period the next segment starts
    period = dash + gap
    for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        position = 0.0
        while position < length:
            phase = (offset + position) % period
            if phase < dash:
                end = min(length, position + dash - phase)
                draw.line([(x0 + (x1 - x0) * position / length, y0 + (y1 - y0) * position / length),
                           (x0 + (x1 - x0) * end / length, y0 + (y1 - y0) * end / length)], fill=fill, width=width)
            else:
                end = min(length, position + period - phase)
            position = end
        offset = (offset + length) % period


def draw_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, size: tuple[int, int] = (460, 420),
               log_x: bool = False, x_ticks: Sequence[tuple[float, str]] = (), connect: bool = True,
               note: str = "") -> Image.Image:
    """A chart of `series` as an RGB PIL image: lines through each series' points (or dots alone, without
    `connect`), their ranges as bars, a legend under the axes and `note` in the plot's top left corner. `x_ticks`
    (value, label) replace the automatic ticks of the x axis (as a log axis needs); `log_x` spaces x by log10."""
    if not any(s.points for s in series):
        raise ValueError("draw_chart: no points to plot")
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    legend_rows = len(series)
    left, right, top, bottom = 62, width - 16, 52, height - 44 - 16 * legend_rows
    to_x = math.log10 if log_x else float
    xs = [to_x(x) for s in series for x, _ in s.points] + [to_x(v) for v, _ in x_ticks]
    ys = [y for s in series for _, y in s.points] + [v for s in series for r in s.ranges for v in r]
    x_lo, x_hi = min(xs), max(xs)
    x_pad = 0.06 * (x_hi - x_lo or 1.0)
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad
    y_lo, y_hi = min(ys), max(ys)
    y_pad = 0.08 * (y_hi - y_lo or 1.0)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def to_xy(x, y):
        return (left + (to_x(x) - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.text((left, 8), title, fill="black", font=font)
    for tick in _nice_ticks(y_lo, y_hi):
        _, y = to_xy(x_ticks[0][0] if x_ticks else 1.0, tick)
        draw.line([(left, y), (right, y)], fill=(228, 228, 228))
        draw.text((left - 6, y), f"{tick:g}", fill="black", font=small, anchor="rm")
    ticks = list(x_ticks) or [(t, f"{t:g}") for t in _nice_ticks(x_lo, x_hi)]
    for value, label in ticks:
        x, _ = to_xy(value, y_lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), label, fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, bottom + 26), x_label, fill="black", font=small, anchor="mm")
    draw.text((6, top - 18), y_label, fill="black", font=small)
    palette = itertools.cycle(SERIES_COLOURS)  # for the series without a colour of their own
    for k, s in enumerate(series):
        colour = s.colour or next(palette)
        points = sorted(s.points) if connect else list(s.points)
        for (x, _), (low, high) in zip(s.points, s.ranges):
            (bx, by_low), (_, by_high) = to_xy(x, low), to_xy(x, high)
            draw.line([(bx, by_low), (bx, by_high)], fill=colour, width=1)
            draw.line([(bx - 3, by_low), (bx + 3, by_low)], fill=colour, width=1)
            draw.line([(bx - 3, by_high), (bx + 3, by_high)], fill=colour, width=1)
        if connect and len(points) > 1 and s.dashed:
            dashed_line(draw, [to_xy(x, y) for x, y in points], fill=colour, width=2)
        elif connect and len(points) > 1:
            draw.line([to_xy(x, y) for x, y in points], fill=colour, width=2)
        for x, y in points:
            px, py = to_xy(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = bottom + 40 + 16 * k
        if s.dashed:
            dashed_line(draw, [(left, ly + 6), (left + 18, ly + 6)], fill=colour, width=3, dash=5.0, gap=3.0)
        else:
            draw.line([(left, ly + 6), (left + 18, ly + 6)], fill=colour, width=3)
        draw.text((left + 24, ly), s.label, fill="black", font=small)
    if note:
        draw.text((left + 6, top + 6), note, fill="black", font=small)
    return image


def compose_figure(panels: Sequence[Image.Image], caption: str = "", gap: int = 16) -> Image.Image:
    """Panels side by side on a white canvas, tops aligned, with an optional caption below."""
    panels = [p.convert("RGB") for p in panels]
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + 2 * gap + (24 if caption else 0)
    canvas = Image.new("RGB", (width, height), "white")
    x = gap
    for panel in panels:
        canvas.paste(panel, (x, gap))
        x += panel.width + gap
    if caption:
        ImageDraw.Draw(canvas).text((gap, height - gap - 14), caption, fill="black", font=_font(13))
    return canvas


# Contact sheets: thumbnails in rows, each with its caption lines under it.
SHEET_CAPTION_LINE = 15  # pixels per caption line
SHEET_TITLE = 24  # pixels of the title band, when there is a title


def contact_sheet_size(count: int, cell: int = 160, columns: int = 5, caption_lines: int = 2,
                       title: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of `draw_contact_sheet`'s picture of `count` images."""
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    width = _GAP + columns * (cell + _GAP)
    height = (SHEET_TITLE if title else 0) + _GAP + rows * (cell + caption_lines * SHEET_CAPTION_LINE + _GAP)
    return width, height


def draw_contact_sheet(images: Sequence[Union[str, os.PathLike]], captions: Sequence[Sequence[str]],
                       title: str = "", cell: int = 160, columns: int = 5) -> Image.Image:
    """Thumbnails of `images` (each scaled to fit a `cell` square, aspect kept) left to right in rows of `columns`, each
    with its caption lines under it, below an optional title; an image that cannot be read is drawn as a grey
    square saying so. The size is `contact_sheet_size`."""
    if not images or len(images) != len(captions):
        raise ValueError(f"draw_contact_sheet: {len(images)} images and {len(captions)} captions; expected as many "
                         "of each, at least one")
    lines = max(len(c) for c in captions)
    columns = max(1, min(columns, len(images)))
    sheet = Image.new("RGB", contact_sheet_size(len(images), cell, columns, lines, bool(title)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    top = SHEET_TITLE if title else 0
    if title:
        draw.text((_GAP, 5), title, fill="black", font=_font(14))
    for i, (path, caption) in enumerate(zip(images, captions)):
        x = _GAP + (i % columns) * (cell + _GAP)
        y = top + _GAP + (i // columns) * (cell + lines * SHEET_CAPTION_LINE + _GAP)
        try:
            thumbnail = ImageOps.contain(load_image(path), (cell, cell), Image.Resampling.BICUBIC)
            sheet.paste(thumbnail, (x + (cell - thumbnail.width) // 2, y + (cell - thumbnail.height) // 2))
        except ImageLoadError as error:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            draw.text((x + 4, y + cell // 2), f"unreadable: {error.reason}"[: cell // 6], fill="black", font=font)
        for j, text in enumerate(caption):
            draw.text((x, y + cell + 1 + j * SHEET_CAPTION_LINE), _fit(draw, text, font, cell), fill="black",
                      font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened in the middle with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        short = text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2) :]
        if draw.textlength(short, font=font) <= width:
            return short
    return text[:2]


def save_png(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    """Writes a PNG under a temporary name, then renames it; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
