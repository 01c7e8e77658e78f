"""Deterministic toy dataset written as an ImageNet-train-style archive.

The embedded default runs the real ingestion path (download via ``file://``, streaming tar
reader, center crop) on this archive, so it mimics ImageNet's layout: an outer tar of
``<synset>.tar`` class archives, each holding ``<synset>_<n>.JPEG`` files. Synsets are fake
WordNet ids ``n01000000 + k``, so sorted order is class order.

Class ``k`` is a (shape, colour) pair (40 of them; up to 1000 classes, class k looks like class
k % 40, for rehearsals that need ImageNet's label count); each image jitters position, size, rotation, colour,
background gradient and aspect ratio, so the classes form a distribution a generator has to
learn rather than ten fixed pictures. The bytes depend only on the arguments (and on the JPEG
encoder of the installed Pillow): per-image seeds, fixed JPEG settings, fixed tar metadata.
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from remeanflow import fileio

__all__ = ["SHAPES", "COLOURS", "synset_name", "class_name", "write_toy_archive"]

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
LOOKS = len(SHAPES) * len(COLOURS)  # distinct (shape, colour) pairs; class k looks like class k % LOOKS
MAX_CLASSES = 1000  # ImageNet's synsets (the rehearsal of the paper presets needs all of them)

_MTIME = 1262304000  # 2010-01-01, fixed so the archive bytes do not depend on the clock
_SUPERSAMPLE = 4  # draw large and downsample: anti-aliased edges like a photographed object
_JPEG = dict(format="JPEG", quality=90, subsampling=2, optimize=False, progressive=False)


def synset_name(k: int) -> str:
    """Fake WordNet id of class ``k`` (``n01000000`` + k)."""
    return f"n{1000000 + k:08d}"


def _colour(k: int) -> str:
    return list(COLOURS)[(k % LOOKS) // len(SHAPES)]


def class_name(k: int) -> str:
    """Human-readable name of class ``k``, e.g. ``'red circle'`` (``'red circle #2'`` for the third
    class with that look, beyond the first `LOOKS` classes)."""
    name = f"{_colour(k)} {SHAPES[k % len(SHAPES)]}"
    return name if k < LOOKS else f"{name} #{k // LOOKS}"


# ----------------------------------------------------------------------------------------------
# Drawing.


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height): short side ``size``, long side up to 25% longer, either orientation."""
    long_side = size + int(rng.integers(0, size // 4 + 1))
    return (long_side, size) if rng.random() < 0.5 else (size, long_side)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Linear gradient between two random muted colours, in a random direction."""
    c0 = rng.uniform(20, 140, size=3)
    c1 = rng.uniform(20, 140, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = (xs / max(w - 1, 1)) * math.cos(angle) + (ys / max(h - 1, 1)) * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    pixels = c0 + (c1 - c0) * ramp[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float):
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle, fill) -> None:
    """Draw one shape of 'radius' r centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.45 * r)))
    elif shape == "square":
        s = r / math.sqrt(2) * 1.2
        draw.polygon(_rotated([(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, angle), fill=fill)
    elif shape == "triangle":
        pts = [
            (r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
        draw.polygon(_rotated(pts, cx, cy, angle), fill=fill)
    elif shape == "cross":
        a, b = r, 0.35 * r
        arm = [(-a, -b), (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b),
               (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b)]  # fmt: skip
        draw.polygon(_rotated(arm, cx, cy, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(k: int, idx: int, *, size: int, seed: int) -> Image.Image:
    """Image ``idx`` of class ``k``: a jittered coloured shape on a gradient background."""
    rng = np.random.default_rng([seed, k, idx])
    w, h = _image_size(rng, size)
    W, H = w * _SUPERSAMPLE, h * _SUPERSAMPLE
    canvas = _background(rng, W, H)
    r = min(W, H) * rng.uniform(0.2, 0.34)
    cx = rng.uniform(r, W - r)
    cy = rng.uniform(r, H - r)
    base = np.array(COLOURS[_colour(k)], dtype=np.float64)
    fill = tuple(int(v) for v in np.clip(base + rng.normal(0, 12, size=3), 0, 255).round())
    angle = rng.uniform(0, 2 * math.pi)
    _draw_shape(ImageDraw.Draw(canvas), SHAPES[k % len(SHAPES)], cx, cy, r, angle, fill)
    small = canvas.resize((w, h), resample=Image.Resampling.LANCZOS)
    # Sensor-like noise so the images are not piecewise constant.
    noisy = np.asarray(small, dtype=np.float64) + rng.normal(0, 3.0, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# Archive writing.


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, **_JPEG)
    return buf.getvalue()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file with fixed metadata, so the archive is byte-for-byte reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _class_tar(k: int, images_per_class: int, size: int, seed: int) -> bytes:
    """The inner ``<synset>.tar`` of class k, built in memory (toy classes are small)."""
    synset = synset_name(k)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for idx in range(images_per_class):
            image = render_image(k, idx, size=size, seed=seed)
            # ImageNet numbers files without padding; keep that (it makes tar order != sort order).
            _add_bytes(tf, f"{synset}_{idx}.JPEG", _jpeg_bytes(image))
    return buf.getvalue()


def _check_args(num_classes: int, images_per_class: int, size: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}"
        )
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")


def write_toy_archive(
    path,
    *,
    num_classes: int = 10,
    images_per_class: int = 200,
    size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Write the toy dataset as an ImageNet-train-style tar at ``path`` (atomically).

    ``size`` is the short side of every image; the long side is up to 25% longer, landscape or
    portrait. Returns a JSON-able summary: path, sha256, bytes, counts, synsets, class names.
    """
    _check_args(num_classes, images_per_class, size)
    path = Path(path)
    synsets = [synset_name(k) for k in range(num_classes)]
    with fileio.atomic_path(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as outer:
            for k in tqdm(range(num_classes), desc="toy classes", disable=not progress):
                _add_bytes(outer, f"{synsets[k]}.tar", _class_tar(k, images_per_class, size, seed))
    return {
        "path": str(path),
        "sha256": fileio.sha256_file(path),
        "bytes": path.stat().st_size,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "num_images": num_classes * images_per_class,
        "size": size,
        "seed": seed,
        "synsets": synsets,
        "class_names": [class_name(k) for k in range(num_classes)],
    }
