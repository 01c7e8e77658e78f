"""Decode, center-crop and store an ImageNet-style archive as a Zarr v3 image store.

Stages (each an all-or-nothing output):

* ``preprocess_shard``: the classes ``[k*C//K, (k+1)*C//K)`` of the sorted synset list go to one
  shard store; JPEG decoding runs in a bounded process pool;
* ``merge_shards``: shard stores, in shard order, become ``images.zarr`` plus ``labels.csv``.

Store format (shard and merged stores alike; ``attrs["format"] == FORMAT``)::

    images   uint8  [N, 3, R, R]   chunks of CHUNK images (<= 256, ~16 MiB)
    labels   int32  [N]            class index = position of the synset in attrs["synsets"]
    members  str    [N]            member name of each image inside its class tar
    attrs    format, resolution, synsets (the full sorted list), class_range [lo, hi),
             shard_synsets, class_counts {synset: images kept}, num_images, num_seen,
             num_bad, bad_members [{synset, member, error}], archive, archive_bytes,
             and for shards: shard, num_shards; for merged stores: num_parts.

Images are ordered by class index, then by archive order within a class, so the merged store is
the same whatever the number of shards.

A bad member is an image that does not decode, or one whose name is not UTF-8 (it could not be
stored as text; recorded by its repr, with the archive named in its error): both count towards
``max_bad_fraction``.

A class with fewer than ``min_images_per_class`` decodable images (default 1: an empty class tar,
or one whose images are all undecodable) is a ``TooFewImagesError`` naming the class and its
counts; ``min_images_per_class=0`` accepts such classes with a logged warning. Each class lies in
exactly one shard, so ``preprocess_shard`` sees complete counts; ``merge_shards`` checks again.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from PIL import Image
from tqdm import tqdm

from remeanflow import fileio
from remeanflow.data.imagenet_tar import iter_images, list_synsets, name_problem

__all__ = [
    "FORMAT",
    "TooManyBadImagesError",
    "TooFewImagesError",
    "ShardMismatchError",
    "StoreFormatError",
    "center_crop_dhariwal",
    "decode_and_crop",
    "preprocess_shard",
    "merge_shards",
    "load_images",
    "shard_class_range",
]

log = logging.getLogger(__name__)

FORMAT = "remeanflow-images-v1"
_CHUNK_BYTES = 16 << 20  # ~16 MiB image chunks: whole-chunk reads stay efficient, RAM stays small
_MAX_CHUNK_IMAGES = 256
_LABEL_CHUNK = 1 << 16
_DECODE_BATCH = 32  # images per pool task: amortises pickling without big in-flight memory
_MAX_ERROR_CHARS = 200
_REPORTED_BAD_NAMES = 10

# PIL raises these for undecodable, truncated or hostile (decompression bomb) image data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class TooManyBadImagesError(Exception):
    """More than ``max_bad_fraction`` of a shard's images could not be decoded."""


class TooFewImagesError(ValueError):
    """A class has fewer decodable images than ``min_images_per_class``."""


class ShardMismatchError(ValueError):
    """Shard stores that do not belong together (resolution, synsets, class ranges, archive)."""


class StoreFormatError(ValueError):
    """A store lacks the arrays/attributes of the image store format."""


# ----------------------------------------------------------------------------------------------
# Cropping and decoding.


def center_crop_dhariwal(pil_image: Image.Image, resolution: int) -> np.ndarray:
    """ADM / EDM2 "center-crop-dhariwal": ``uint8 [resolution, resolution, 3]`` RGB.

    Halve with a BOX filter while the short side is >= 2*resolution (cheap, alias-free
    downscaling), then BICUBIC-resize so the short side equals ``resolution``, then crop the
    center (rounding the offset down).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(
        tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])


def decode_and_crop(data: bytes, resolution: int) -> np.ndarray:
    """Decode image bytes and crop them: ``uint8 [3, R, R]``; PIL errors propagate."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode fully here, so truncated files fail now and not half-way later
        return center_crop_dhariwal(image, resolution).transpose(2, 0, 1)


def _decode_batch(datas: list[bytes | str], resolution: int) -> list[np.ndarray | str]:
    """Pool task: an image array per item, or the error text for an undecodable one (or for one
    that carries its error already, `_usable_names`)."""
    out: list[np.ndarray | str] = []
    for data in datas:
        if isinstance(data, str):
            out.append(data)
            continue
        try:
            out.append(decode_and_crop(data, resolution))
        except _DECODE_ERRORS as e:
            out.append(f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS])
    return out


def _batches(items: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pool_context():
    # Not fork: the parent may run zarr's event-loop thread, and forking a threaded process can
    # deadlock the children.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _usable_names(items: Iterator[tuple[str, str, bytes]], archive: Path) -> Iterator[tuple[str, str, bytes | str]]:
    """Items whose member name cannot be stored as text (not UTF-8: Zarr would fail on it deep in
    the write, naming nothing) become bad members: the name's repr, and the error instead of bytes."""
    for synset, member, data in items:
        problem = name_problem(member)
        if problem is None:
            yield synset, member, data
        else:
            yield synset, repr(member), f"member name {problem} (class {synset} of {archive})"


def _split(batch: list[tuple[str, str, bytes | str]]) -> tuple[list[tuple[str, str]], list[bytes | str]]:
    """(synset, member) names and image bytes of a batch: only the bytes go to a worker."""
    return [(s, m) for s, m, _ in batch], [d for _, _, d in batch]


def _decoded_batches(
    items: Iterator[tuple[str, str, bytes | str]], resolution: int, workers: int
) -> Iterator[tuple[list[tuple[str, str]], list[np.ndarray | str]]]:
    """Yield ``(names, results)`` per batch in input order, decoding in ``workers`` processes.

    At most ``2 * workers`` batches are in flight, so memory does not grow with the archive.
    ``workers <= 1`` decodes in this process.
    """
    if workers <= 1:
        for names, datas in map(_split, _batches(items, _DECODE_BATCH)):
            yield names, _decode_batch(datas, resolution)
        return
    pending: deque[tuple[list[tuple[str, str]], Future]] = deque()
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        for names, datas in map(_split, _batches(items, _DECODE_BATCH)):
            pending.append((names, pool.submit(_decode_batch, datas, resolution)))
            if len(pending) >= 2 * workers:
                names, fut = pending.popleft()
                yield names, fut.result()
        while pending:
            names, fut = pending.popleft()
            yield names, fut.result()


# ----------------------------------------------------------------------------------------------
# Writing image stores.


def _chunk_images(resolution: int) -> int:
    return max(1, min(_MAX_CHUNK_IMAGES, _CHUNK_BYTES // (3 * resolution * resolution)))


class _ImageAppender:
    """Appends image blocks to a zarr array in whole chunks only.

    Rows are buffered until a chunk is full, so every chunk is written once (no read-modify-
    write of partial chunks) and the store's chunk layout does not depend on block sizes.
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.chunk = array.chunks[0]
        self.blocks: list[np.ndarray] = []
        self.buffered = 0

    def append(self, block: np.ndarray) -> None:
        if len(block):
            self.blocks.append(block)
            self.buffered += len(block)
        if self.buffered >= self.chunk:
            self._write(self.buffered - self.buffered % self.chunk)

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, rows: int) -> None:
        data = np.concatenate(self.blocks)
        self.array.append(data[:rows])
        rest = data[rows:]
        self.blocks = [rest] if len(rest) else []
        self.buffered = len(rest)


def _create_store(
    path: Path, resolution: int, chunk_images: int
) -> tuple[zarr.Group, _ImageAppender]:
    group = zarr.open_group(str(path), mode="w")
    images = group.create_array(
        "images",
        shape=(0, 3, resolution, resolution),
        dtype="uint8",
        chunks=(chunk_images, 3, resolution, resolution),
    )
    return group, _ImageAppender(images)


def _write_index_arrays(group: zarr.Group, labels: np.ndarray, members: Sequence[str]) -> None:
    """labels and member names are small (1.3M rows ~ 5 MB + names): written once, at the end."""
    n = len(labels)
    chunk = (max(1, min(_LABEL_CHUNK, n)),)
    group.create_array("labels", shape=(n,), dtype="int32", chunks=chunk)[:] = labels
    names = group.create_array("members", shape=(n,), dtype=str, chunks=chunk)
    if n:
        names[:] = np.asarray(members, dtype=str)


# ----------------------------------------------------------------------------------------------
# Sharded preprocessing.


def shard_class_range(num_classes: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous class range ``[lo, hi)`` of shard ``shard`` out of ``num_shards``."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(
            f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}"
        )
    return shard * num_classes // num_shards, (shard + 1) * num_classes // num_shards


@dataclass
class _ShardTally:
    """What preprocessing saw: kept labels/names, per-class counts and the bad members."""

    synsets: list[str]
    labels: list[int] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    bad: list[dict] = field(default_factory=list)

    @property
    def num_seen(self) -> int:
        return len(self.labels) + len(self.bad)


def _bad_fraction_check(tally: _ShardTally, archive: Path, max_bad_fraction: float) -> None:
    seen, nbad = tally.num_seen, len(tally.bad)
    if seen and nbad / seen > max_bad_fraction:
        names = [f"{b['synset']}/{b['member']}" for b in tally.bad[:_REPORTED_BAD_NAMES]]
        raise TooManyBadImagesError(
            f"{archive}: {nbad} of {seen} images ({nbad / seen:.2%}) could not be decoded, "
            f"above max_bad_fraction={max_bad_fraction:.2%}; first bad members: {names}; "
            f"first error: {tally.bad[0]['error']}"
        )


def _check_min_images(
    class_counts: dict[str, int],
    label_of: dict[str, int],
    min_images_per_class: int,
    where: str,
    bad: Sequence[dict] = (),
) -> None:
    """Raise ``TooFewImagesError`` naming every class of ``label_of`` (synset -> class index)
    with fewer than ``min_images_per_class`` images; with 0, log a warning for empty classes."""
    if isinstance(min_images_per_class, bool) or not isinstance(min_images_per_class, int):
        raise TypeError(f"min_images_per_class must be an int, got {min_images_per_class!r}")
    if min_images_per_class < 0:
        raise ValueError(f"min_images_per_class must be >= 0, got {min_images_per_class}")
    synsets = sorted(label_of, key=label_of.get)
    nbad: dict[str, int] = {}
    for b in bad:
        nbad[b["synset"]] = nbad.get(b["synset"], 0) + 1
    counts = {s: class_counts.get(s, 0) for s in synsets}

    def describe(names: list[str]) -> str:
        shown = [
            f"{s} (class {label_of[s]}): {counts[s]} images" + (f", {nbad[s]} undecodable" if s in nbad else "")
            for s in names[:_REPORTED_BAD_NAMES]
        ]
        more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
        return "; ".join(shown) + more

    if min_images_per_class == 0:
        empty = [s for s in synsets if counts[s] == 0]
        if empty:
            log.warning(
                "%s: %d class(es) without any decodable image, kept as empty classes "
                "(min_images_per_class=0): %s", where, len(empty), describe(empty)
            )
        return
    few = [s for s in synsets if counts[s] < min_images_per_class]
    if few:
        raise TooFewImagesError(
            f"{where}: {len(few)} class(es) with fewer than min_images_per_class="
            f"{min_images_per_class} decodable images: {describe(few)}. A class without data "
            "would still get a class index; fix the archive, or set "
            "dataset.min_images_per_class (0 accepts empty classes)"
        )


def _consume(
    decoded: Iterator[tuple[list[tuple[str, str]], list[np.ndarray | str]]],
    tally: _ShardTally,
    appender: _ImageAppender,
    label_of: dict[str, int],
    bar: tqdm,
) -> None:
    """Append decoded images in order, record labels/names, count and list the bad ones."""
    current = None
    for names, results in decoded:
        good = []
        for (synset, member), result in zip(names, results):
            if synset != current:
                if current is not None:
                    bar.update(1)
                current = synset
            if isinstance(result, str):
                tally.bad.append({"synset": synset, "member": member, "error": result})
                continue
            good.append(result)
            tally.labels.append(label_of[synset])
            tally.members.append(member)
            tally.class_counts[synset] += 1
        if good:
            appender.append(np.stack(good))
        bar.set_postfix(images=len(tally.labels), bad=len(tally.bad), refresh=False)
    if current is not None:
        bar.update(1)


def preprocess_shard(
    archive,
    out_store,
    *,
    shard: int,
    num_shards: int,
    resolution: int,
    workers: int = 2,
    max_bad_fraction: float = 0.01,
    progress: bool = True,
    chunk_images: int | None = None,
    min_images_per_class: int = 1,
) -> dict:
    """Decode and crop the classes of shard ``shard`` of ``archive`` into a Zarr store.

    Undecodable images are skipped, counted and listed; if more than ``max_bad_fraction`` of the
    shard's images are bad, ``TooManyBadImagesError`` is raised and no store is written. A class
    with fewer than ``min_images_per_class`` decodable images raises ``TooFewImagesError``
    (naming the synset, its class index and its counts) and no store is written; 0 accepts empty
    classes with a logged warning.
    ``workers`` decoding processes (<= 1: decode in this process). ``chunk_images`` defaults to
    min(256, ~16 MiB worth). Returns the store's attributes plus ``out_store`` and ``seconds``.
    """
    start = time.monotonic()
    _check_min_images({}, {}, min_images_per_class, "")  # argument check before any work
    archive = Path(archive)
    synsets = list_synsets(archive)
    lo, hi = shard_class_range(len(synsets), shard, num_shards)
    mine = synsets[lo:hi]
    tally = _ShardTally(synsets=mine, class_counts={s: 0 for s in mine})
    label_of = {s: lo + i for i, s in enumerate(mine)}
    chunk = chunk_images or _chunk_images(resolution)
    with fileio.atomic_path(out_store) as tmp:
        group, appender = _create_store(tmp, resolution, chunk)
        with tqdm(
            total=len(mine), desc=f"shard {shard}/{num_shards}", unit="class", disable=not progress
        ) as bar:
            items = _usable_names(iter_images(archive, mine), archive) if mine else iter(())
            _consume(_decoded_batches(items, resolution, workers), tally, appender, label_of, bar)
        appender.close()
        _bad_fraction_check(tally, archive, max_bad_fraction)
        _check_min_images(tally.class_counts, label_of, min_images_per_class, str(archive), tally.bad)
        _write_index_arrays(group, np.asarray(tally.labels, dtype=np.int32), tally.members)
        attrs = {
            "format": FORMAT,
            "resolution": resolution,
            "synsets": synsets,
            "shard_synsets": mine,
            "class_range": [lo, hi],
            "shard": shard,
            "num_shards": num_shards,
            "class_counts": tally.class_counts,
            "num_images": len(tally.labels),
            "num_seen": tally.num_seen,
            "num_bad": len(tally.bad),
            "bad_members": tally.bad,
            "archive": str(archive),
            "archive_bytes": archive.stat().st_size,
        }
        group.attrs.update(attrs)
    return {**attrs, "out_store": str(out_store), "seconds": round(time.monotonic() - start, 3)}


# ----------------------------------------------------------------------------------------------
# Reading and merging.


_REQUIRED_ATTRS = (
    "format",
    "resolution",
    "synsets",
    "class_range",
    "num_images",
    "num_seen",
    "num_bad",
    "bad_members",
    "class_counts",
    "archive_bytes",
)


def _open_store(store) -> zarr.Group:
    """Open an image store read-only and check its format, arrays and row counts."""
    path = Path(store)
    if not path.is_dir():
        raise FileNotFoundError(f"image store not found: {path}")
    try:
        group = zarr.open_group(str(path), mode="r")
    except zarr.errors.GroupNotFoundError as e:
        raise StoreFormatError(f"{path}: not a Zarr group ({e})") from e
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreFormatError(
            f"{path}: attrs['format'] is {attrs.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    missing += [
        f"array {a}" for a in ("images", "labels", "members") if a not in group.array_keys()
    ]
    if missing:
        raise StoreFormatError(f"{path}: missing {missing}")
    n = attrs["num_images"]
    rows = {a: group[a].shape[0] for a in ("images", "labels", "members")}
    if set(rows.values()) != {n}:
        raise StoreFormatError(f"{path}: row counts {rows} disagree with num_images={n}")
    return group


def _check_parts(paths: Sequence[Path], groups: Sequence[zarr.Group]) -> None:
    """Parts must share resolution, synsets and archive, and tile the class range in order."""
    first = groups[0].attrs
    num_classes = len(first["synsets"])
    expected_lo = 0
    for path, group in zip(paths, groups):
        a = group.attrs
        for key in ("resolution", "synsets", "archive_bytes"):
            if a[key] != first[key]:
                raise ShardMismatchError(f"{path}: {key} differs from {paths[0]}")
        lo, hi = a["class_range"]
        if lo != expected_lo:
            raise ShardMismatchError(
                f"{path}: class range [{lo}, {hi}) does not start where the previous part ended "
                f"({expected_lo}); parts must be given in shard order and cover every class once"
            )
        labels = group["labels"][:]
        if len(labels) and (labels.min() < lo or labels.max() >= hi or np.any(np.diff(labels) < 0)):
            raise ShardMismatchError(f"{path}: labels not sorted within class range [{lo}, {hi})")
        expected_lo = hi
    if expected_lo != num_classes:
        raise ShardMismatchError(
            f"parts cover classes [0, {expected_lo}) of {num_classes}; a shard is missing"
        )


def _copy_images(src: zarr.Array, appender: _ImageAppender, bar: tqdm) -> None:
    step = src.chunks[0]
    for start in range(0, src.shape[0], step):
        block = src[start : start + step]
        appender.append(block)
        bar.update(len(block))


def _write_labels_csv(
    path: Path, labels: np.ndarray, synsets: list[str], members: np.ndarray
) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "synset", "member"])
        for i, (label, member) in enumerate(zip(labels.tolist(), members.tolist())):
            writer.writerow([i, label, synsets[label], member])


def merge_shards(
    part_stores: Sequence,
    out_store,
    labels_csv,
    *,
    progress: bool = True,
    min_images_per_class: int = 1,
) -> dict:
    """Concatenate shard stores (given in shard order) into one store plus ``labels.csv``.

    Raises ``ShardMismatchError`` unless the parts share resolution, synset list and archive size
    and their class ranges are disjoint, contiguous and cover every class. Raises
    ``TooFewImagesError`` when a class has fewer than ``min_images_per_class`` images in all
    (counted from the labels; parts written with a lower bound are caught here). Nothing is
    written on error.
    """
    _check_min_images({}, {}, min_images_per_class, "")
    if not part_stores:
        raise ValueError("merge_shards needs at least one part store")
    paths = [Path(p) for p in part_stores]
    groups = [_open_store(p) for p in paths]
    _check_parts(paths, groups)
    first = groups[0].attrs
    synsets = list(first["synsets"])
    labels = np.concatenate([g["labels"][:] for g in groups]).astype(np.int32)
    members = np.concatenate([g["members"][:].astype(object) for g in groups])
    bad = [b for g in groups for b in g.attrs["bad_members"]]
    class_counts = {s: c for g in groups for s, c in g.attrs["class_counts"].items()}
    # the labels are what a class index gets: count them, not the parts' own bookkeeping
    per_label = np.bincount(labels, minlength=len(synsets))
    counted = {s: int(per_label[i]) for i, s in enumerate(synsets)}
    if disagree := sorted(s for s in set(class_counts) | set(counted) if class_counts.get(s) != counted.get(s)):
        raise StoreFormatError(
            f"class_counts of the parts disagree with their labels for {disagree[:10]}"
        )
    _check_min_images(
        counted,
        {s: i for i, s in enumerate(synsets)},
        min_images_per_class,
        "merge of " + ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else ""),
        bad,
    )
    chunk = groups[0]["images"].chunks[0]
    with fileio.atomic_path(out_store) as tmp_store, fileio.atomic_path(labels_csv) as tmp_csv:
        group, appender = _create_store(tmp_store, first["resolution"], chunk)
        with tqdm(total=len(labels), desc="merge", unit="img", disable=not progress) as bar:
            for g in groups:
                _copy_images(g["images"], appender, bar)
        appender.close()
        _write_index_arrays(group, labels, members.tolist())
        attrs = {
            "format": FORMAT,
            "resolution": first["resolution"],
            "synsets": synsets,
            "shard_synsets": synsets,
            "class_range": [0, len(synsets)],
            "num_parts": len(groups),
            "class_counts": class_counts,
            "num_images": int(len(labels)),
            "num_seen": sum(g.attrs["num_seen"] for g in groups),
            "num_bad": len(bad),
            "bad_members": bad,
            "archive": first.get("archive"),
            "archive_bytes": first["archive_bytes"],
        }
        group.attrs.update(attrs)
        _write_labels_csv(tmp_csv, labels, synsets, members)
    return {
        **attrs,
        "out_store": str(out_store),
        "labels_csv": str(labels_csv),
        "parts": [str(p) for p in paths],
    }


def load_images(store) -> tuple[zarr.Array, np.ndarray]:
    """``(images, labels)`` of an image store: the lazy ``uint8 [N,3,R,R]`` array, int32 labels.

    Read ``images`` in whole chunks (``images.chunks[0]`` rows) for speed.
    """
    group = _open_store(store)
    return group["images"], group["labels"][:]
