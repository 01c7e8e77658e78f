"""The sample grid of an evaluation: which held-out samples it shows (`grid_indices`) and the PNG
itself (`save_grid`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import inception
from .fileio import atomic_path
from .misc import require_int


def grid_indices(labels: np.ndarray, per_class: int = 2, max_classes: int = 10) -> np.ndarray:
    """The first `per_class` held-out samples of each of the first `max_classes` classes present
    (in class order): a fixed, class-covering selection for the grid."""
    labels = np.asarray(labels)
    classes = np.unique(labels)[:max_classes]
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def save_grid(images, path, nrow: int, scale: int = 4, pad: int = 1, pad_value: int = 255) -> tuple[int, int]:
    """Tile images [N, C, H, W] in [-1, 1] (C = 1 or 3) into a PNG, `nrow` images per row
    (torchvision's convention), each upscaled `scale`x by nearest neighbour and separated (and
    framed) by `pad` pixels of grey level `pad_value`. Written atomically; returns (width, height).
    """
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
    pixels = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG")
    return image.size
