"""Reflow index: which class each coupling is generated for, and the global sample id behind its noise.

The index is a Zarr v3 group with two 1-D arrays of the same length N:

- ``label``     int32, the class of coupling i;
- ``sample_id`` int64, always ``0..N-1``: the global id that seeds coupling i's noise, so a coupling
  is the same whatever shard, GPU or restart generates it.

Its attributes record how it was made (``format``, ``mode``, ``passes``, ``seed``, ``num_classes``,
``N``) and ``index_hash``: the sha256 of those parameters (canonical JSON) followed by the label
bytes (int32 little-endian). Coupling shards copy ``index_hash`` so that merging refuses shards
that were cut from a different index.

Modes:

- ``imagenet``: the dataset's labels repeated ``passes`` times, each pass an independent
  permutation drawn from ``(seed, pass)``; class balance therefore follows the dataset.
- ``random``: ``num_samples`` classes drawn uniformly from ``[0, num_classes)`` with ``seed``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .fileio import atomic_path, json_sha256

FORMAT = "remeanflow.reflow_index/1"
MODES = ("imagenet", "random")
# ~4 MB of int32 per chunk: large enough for whole-chunk reads, small enough to slice cheaply.
_INDEX_CHUNK = 1 << 20


class ReflowIndexError(ValueError):
    """Invalid arguments for, or an unreadable/corrupt, reflow index."""


@dataclass(frozen=True)
class ReflowIndex:
    """A loaded index: labels and sample ids (numpy) plus the group's attributes."""

    path: Path
    labels: np.ndarray
    sample_ids: np.ndarray
    attrs: dict[str, Any]

    @property
    def index_hash(self) -> str:
        return self.attrs["index_hash"]

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def compute_index_hash(params: dict[str, Any], labels: np.ndarray) -> str:
    """Content hash of an index: parameters first, then the int32 little-endian label bytes."""
    h = hashlib.sha256(json_sha256(params).encode())
    h.update(b"\0")
    h.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    return h.hexdigest()


def _load_labels(labels: Any) -> np.ndarray:
    """Dataset labels from an array-like, a ``.npy`` file or a Zarr array path."""
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.exists():
            raise ReflowIndexError(f"labels file {path} does not exist")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        try:
            return zarr.open_array(path, mode="r")[...]
        except Exception as e:  # zarr raises several unrelated types for "not an array"
            raise ReflowIndexError(f"labels path {path} is neither a .npy file nor a Zarr array: {e}") from e
    return np.asarray(labels)


def _check_labels(labels: np.ndarray, num_classes: int | None, what: str) -> np.ndarray:
    """Validate a 1-D integer label vector; returns it as int32."""
    if labels.ndim != 1 or labels.size == 0:
        raise ReflowIndexError(f"{what}: expected a non-empty 1-D label array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ReflowIndexError(f"{what}: expected integer labels, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = np.flatnonzero((labels < 0) | ((labels >= num_classes) if num_classes is not None else False))
        raise ReflowIndexError(
            f"{what}: labels must lie in [0, {num_classes if num_classes is not None else 'inf'}), "
            f"found {bad.size} outside (range seen [{lo}, {hi}], first at position {int(bad[0])})"
        )
    if hi > np.iinfo(np.int32).max:
        raise ReflowIndexError(f"{what}: label {hi} does not fit int32")
    return labels.astype(np.int32)


def _imagenet_labels(labels: Any, passes: int, num_classes: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Dataset labels repeated `passes` times, each pass permuted by its own (seed, pass) stream."""
    if labels is None:
        raise ReflowIndexError("mode 'imagenet' needs the dataset labels (labels=...)")
    if not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ReflowIndexError(f"mode 'imagenet': passes must be an integer >= 1, got {passes!r}")
    base = _check_labels(_load_labels(labels), num_classes, "mode 'imagenet' labels")
    # Without an explicit class count, take the largest label seen; a missing top class would
    # shrink it, which is why callers with a known class count should pass it.
    num_classes = int(num_classes) if num_classes is not None else int(base.max()) + 1
    # Separate streams per pass: adding a pass never changes the earlier ones.
    perms = [np.random.default_rng([seed, p]).permutation(base.size) for p in range(passes)]
    return np.concatenate([base[perm] for perm in perms]), num_classes


def _random_labels(num_samples: int | None, num_classes: int | None, seed: int) -> np.ndarray:
    """`num_samples` classes drawn uniformly from [0, num_classes)."""
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ReflowIndexError(f"mode 'random' needs num_samples >= 1, got {num_samples!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ReflowIndexError(f"mode 'random' needs num_classes >= 1, got {num_classes!r}")
    return np.random.default_rng(seed).integers(0, num_classes, size=int(num_samples)).astype(np.int32)


def build_index(
    out_store,
    *,
    mode: str,
    labels: Any = None,
    passes: int = 1,
    num_samples: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the reflow index to `out_store` (atomically) and return a summary.

    `labels` (mode 'imagenet') is an integer array-like, a ``.npy`` file or a Zarr array path.
    The summary holds the group attributes plus ``path`` and per-class ``class_counts``.
    """
    if mode not in MODES:
        raise ReflowIndexError(f"unknown reflow index mode {mode!r}; expected one of {MODES}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ReflowIndexError(f"seed must be a non-negative integer, got {seed!r}")
    if mode == "imagenet":
        label_arr, num_classes = _imagenet_labels(labels, passes, num_classes, int(seed))
    else:
        if labels is not None:
            raise ReflowIndexError("mode 'random' draws its own labels; do not pass labels=")
        label_arr, passes = _random_labels(num_samples, num_classes, int(seed)), 1
    params = {
        "format": FORMAT, "mode": mode, "passes": int(passes), "seed": int(seed),
        "num_classes": int(num_classes), "N": int(label_arr.size),
    }
    attrs = dict(params, index_hash=compute_index_hash(params, label_arr))
    _write_index(Path(out_store), label_arr, attrs)
    counts = np.bincount(label_arr, minlength=num_classes)
    return dict(attrs, path=str(out_store), class_counts=counts.tolist())


def _write_index(path: Path, labels: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write labels, sample ids and attrs into a fresh group that appears only when complete."""
    with atomic_path(path) as tmp:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
        chunk = min(_INDEX_CHUNK, labels.size)
        group.create_array("label", shape=labels.shape, chunks=(chunk,), dtype="int32")[...] = labels
        group.create_array("sample_id", shape=labels.shape, chunks=(chunk,), dtype="int64")[...] = (
            np.arange(labels.size, dtype=np.int64)
        )


def load_index(store, *, verify: bool = True) -> ReflowIndex:
    """Open an index; with `verify`, recompute its hash and check ids are 0..N-1."""
    path = Path(store)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        labels, sample_ids = group["label"][...], group["sample_id"][...]
    except (FileNotFoundError, KeyError) as e:
        raise ReflowIndexError(f"{path}: not a reflow index (missing group or array: {e})") from e
    missing = {"format", "mode", "passes", "seed", "num_classes", "N", "index_hash"} - attrs.keys()
    if missing or attrs.get("format") != FORMAT:
        raise ReflowIndexError(f"{path}: not a {FORMAT} store (format={attrs.get('format')!r}, missing attrs {sorted(missing)})")
    if verify:
        _verify_index(path, labels, sample_ids, attrs)
    return ReflowIndex(path=path, labels=labels, sample_ids=sample_ids, attrs=attrs)


def _verify_index(path: Path, labels: np.ndarray, sample_ids: np.ndarray, attrs: dict[str, Any]) -> None:
    """Raise ReflowIndexError unless the stored arrays still match the stored hash and N."""
    n = int(attrs["N"])
    if labels.shape != (n,) or sample_ids.shape != (n,):
        raise ReflowIndexError(f"{path}: N={n} but label {labels.shape} / sample_id {sample_ids.shape}")
    if not np.array_equal(sample_ids, np.arange(n, dtype=np.int64)):
        raise ReflowIndexError(f"{path}: sample_id is not 0..{n - 1}")
    params = {k: attrs[k] for k in ("format", "mode", "passes", "seed", "num_classes", "N")}
    actual = compute_index_hash(params, labels)
    if actual != attrs["index_hash"]:
        raise ReflowIndexError(f"{path}: index_hash mismatch (stored {attrs['index_hash']}, content {actual})")
