"""Sample grids: which held-out samples an evaluation shows (`grid_indices`), a plain tiled PNG
(`save_grid`) and the labelled comparison of several generators (`save_panels`: one panel per
generator, classes as rows and samples as columns, the same layout in every panel)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import inception
from .fileio import atomic_path
from .misc import require_int

LABEL_PX = 14  # height of a text line (PIL's default bitmap font), plus room around it


def grid_indices(labels: np.ndarray, per_class: int = 2, max_classes: int = 10) -> np.ndarray:
    """The first `per_class` held-out samples of each of the first `max_classes` classes present
    (in class order): a fixed, class-covering selection for the grid."""
    labels = np.asarray(labels)
    classes = np.unique(labels)[:max_classes]
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def _tile(images, nrow: int, scale: int, pad: int, pad_value: int) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] (C = 1 or 3) -> one uint8 [rows·h, nrow·w, C] tiling, each
    image upscaled `scale`x by nearest neighbour, separated and framed by `pad` pixels."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"grid images must be [N, 1 or 3, H, W] with N >= 1, got shape {tuple(x.shape)}")
    require_int("nrow", nrow, 1)
    require_int("scale", scale, 1)
    # float [-1, 1] -> uint8 as saved to disk (EDM2's StandardRGBEncoder)
    x = inception.to_uint8(x.float()).repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        canvas[:, top : top + h, left : left + w] = x[i]
    return canvas.permute(1, 2, 0).numpy()


def _save_png(image: Image.Image, path) -> tuple[int, int]:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG")
    return image.size


def save_grid(images, path, nrow: int, scale: int = 4, pad: int = 1, pad_value: int = 255) -> tuple[int, int]:
    """Tile images [N, C, H, W] in [-1, 1] (C = 1 or 3) into a PNG, `nrow` images per row
    (torchvision's convention), each upscaled `scale`x by nearest neighbour and separated (and
    framed) by `pad` pixels of grey level `pad_value`. Written atomically; returns (width, height).
    """
    pixels = _tile(images, nrow, scale, pad, pad_value)
    return _save_png(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels), path)


def readable_scale(size: int, min_px: int = 64) -> int:
    """The nearest-neighbour factor that shows a `size`-pixel image at least `min_px` wide."""
    return max(1, math.ceil(min_px / size))


def save_panels(panels: list[tuple[str, object]], path, *, per_row: int, row_labels: list[str] | None = None,
                min_px: int = 64, pad: int = 1, gap: int = 12) -> tuple[int, int]:
    """Several generators side by side, the same layout in each panel: rows are classes, columns
    `per_row` samples of that class. `panels` is [(title, images [rows·per_row, C, H, W] in
    [-1, 1])] with the same shape for every panel; titles go above the panels, `row_labels`
    (e.g. class names) left of the first. Images are upscaled by nearest neighbour to at least
    `min_px` pixels. Written atomically; returns (width, height)."""
    if not panels:
        raise ValueError("save_panels needs at least one panel")
    shapes = {tuple(torch.as_tensor(images).shape) for _, images in panels}
    if len(shapes) != 1:
        raise ValueError(f"every panel must hold images of one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    scale = readable_scale(shape[-1], min_px)
    tiles = [_tile(images, per_row, scale, pad, 255) for _, images in panels]
    th, tw = tiles[0].shape[:2]
    rows = -(-shape[0] // per_row)
    left = max((len(label) for label in row_labels or []), default=0) * 6 + (gap if row_labels else 0)
    width, height = left + len(tiles) * tw + (len(tiles) - 1) * gap, LABEL_PX + th
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((title, _), tile) in enumerate(zip(panels, tiles, strict=True)):
        x0 = left + k * (tw + gap)
        canvas.paste(Image.fromarray(np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile), (x0, LABEL_PX))
        draw.text((x0, 1), title, fill="black")
    row_h = (th - pad) / rows
    for r, label in enumerate(row_labels or []):
        draw.text((1, LABEL_PX + pad + r * row_h + row_h / 2 - 5), label, fill="black")
    return _save_png(canvas, path)
