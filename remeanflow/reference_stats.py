"""Pixel features and reference statistics of the dataset (docs/method.md, FID conventions).

* `pixel_features` / `pixel_stats`: flattened pixels in [-1, 1] and their Gaussian statistics,
  for a Fréchet distance in pixel space (a weak stand-in for FID, which needs Inception weights).
* `reference_rows` / `store_blocks`: the rows of a preprocessed image store used for reference
  statistics, read a chunk at a time.
* `reference_pixel_stats` / `reference_inception_stats`: pixel statistics and FID reference
  statistics (Inception pool features) of the dataset's images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from . import fid, inception
from .data.preprocess import load_images
from .misc import require_int, uint8_to_float


def pixel_features(images, resolution: int | None = None) -> np.ndarray:
    """Flattened pixels in [-1, 1], float64 [N, C·H·W], of uint8 or float ([-1, 1]) images [N, C, H, W].

    Float images are first quantised like images written to disk, so that generated samples are
    compared with the (uint8) dataset on the same grid. With `resolution` below H, images are
    area-downsampled first: the covariance is (C·H·W)^2 and its square root cubic in that, so 64 px
    and up must be reduced to stay tractable.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or floating point in [-1, 1], got {x.dtype}")
        # float [-1, 1] -> uint8 as saved to disk (EDM2's StandardRGBEncoder)
        x = inception.to_uint8(x.float())
    x = uint8_to_float(x)
    if resolution is not None and resolution < x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x.reshape(x.shape[0], -1).double().numpy()


def pixel_stats(images, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics (mu, sigma) of `pixel_features(images, resolution)`."""
    return fid.gaussian_stats(pixel_features(images, resolution))


def reference_rows(num_images: int, max_images: int | None) -> np.ndarray:
    """Rows of an image store used for reference statistics: all, or `max_images` evenly spaced
    ones (the store is sorted by class, so a prefix would cover only the first classes)."""
    if max_images is None or max_images >= num_images:
        return np.arange(num_images)
    require_int("max_images", max_images, 1)
    return np.arange(max_images) * num_images // max_images


def store_blocks(images_store, max_images: int | None = None, *, desc: str = "image store", progress: bool = True):
    """uint8 blocks [B, 3, R, R] of a preprocessed image store (`data.preprocess` format), read a
    whole chunk at a time; all rows, or with `max_images` an evenly spaced subset (`reference_rows`)."""
    images, _ = load_images(images_store)
    rows = reference_rows(images.shape[0], max_images)
    step = images.chunks[0]
    for lo in tqdm.tqdm(range(0, images.shape[0], step), desc=desc, unit="chunk", disable=not progress,
                        leave=False):
        wanted = rows[(rows >= lo) & (rows < lo + step)]
        if wanted.size:
            yield images[lo : lo + step][wanted - lo]


def reference_pixel_stats(
    images_store, max_images: int | None = None, *, resolution: int | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel statistics of a preprocessed image store, read a chunk at a time (`store_blocks`)."""
    stats = fid.RunningStats()
    for block in store_blocks(images_store, max_images, desc="reference pixel stats", progress=progress):
        stats.update(pixel_features(block, resolution))
    return stats.finalize()


def reference_inception_stats(
    images_store, model: inception.InceptionV3, max_images: int | None = None, *, batch: int = 200,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics (mu, sigma) of the Inception pool features of an image store's
    uint8 images, streamed a chunk at a time (`store_blocks`)."""
    stats = fid.RunningStats()
    for block in store_blocks(images_store, max_images, desc="reference Inception stats", progress=progress):
        stats.update(inception.extract_features(model, block, batch=batch))
    return stats.finalize()
