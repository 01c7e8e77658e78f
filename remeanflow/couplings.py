"""Coupling shard stores: rectified couplings (standard-normal noise n, teacher endpoint x, label)
in sharded Zarr v3 stores -- creation, resumable generation, verification.

Layout (`docs/architecture.md`, data and artifact layout). A *shard* covers a contiguous slice
``[start, stop)`` of the reflow index; its boundaries are multiples of the generation batch
(``chunk``), so the generation batches -- and therefore the couplings, even for a batch-dependent
sampler -- are the same whatever the number of shards. Each shard is its own Zarr v3 group::

    noise     [N, *shape]  float16|float32   standard normal n (the sampler starts from n * sigma_max)
    endpoint  [N, *shape]  float16|float32   teacher ODE endpoint x
    label     [N]          int32             class, copied from the index at creation
    sample_id [N]          int64             global id (= index position) that seeds n
    done      [num_chunks] bool, chunk 1     completion mask: done[i] <=> chunk i is complete

``noise``/``endpoint``/``label``/``sample_id`` use one Zarr chunk per generation batch along N and
no sharding codec, so processes that write different batches never touch the same object
(several writers in one Zarr chunk or shard silently lose data). They are stored uncompressed:
Gaussian noise does not compress and training reads them at full speed.

Why a bool array with chunk size 1 for the mask (rather than marker files): every mask entry is
its own 1-byte object, written by Zarr's LocalStore through a temporary file and rename, so two
ranks never share a mask object and a mask entry is either absent (False) or fully written; and
the whole mask reads back with one ``done[...]``. A chunk is marked only after its data arrays
are written, so a process killed mid-chunk leaves it unmarked and a rerun regenerates it.

``label`` and ``sample_id`` are written once when the store is created (the whole store is built
in a temporary directory and renamed into place), so they can never be torn; generation reads the
labels back from the store, so a stored label is by construction the one its endpoint was
generated for.

Merging the shards into one coupling set (manifest, truncation threshold) and reading it for
training live in `coupling_set`. Keep `meanflow` out of this module's imports: this module is in
the `couplings_shard` rule's import closure (its code version, `provenance.import_closure`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .fileio import json_sha256, tree_checksum
from .misc import require_int
from .reflow_index import ReflowIndex, load_index
from .sampling import per_sample_noise

SHARD_FORMAT = "remeanflow.couplings.shard/1"
DTYPES = ("float16", "float32")
DATA_ARRAYS = ("noise", "endpoint", "label", "sample_id")
# Zarr's LocalStore writes through "<name>.<uuid>.partial" temporaries; a killed writer can leave one.
_PARTIAL_SUFFIX = ".partial"
# Most ids / chunk numbers an error message lists before it abbreviates.
_MAX_LISTED = 20

GenerateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CouplingStoreError(Exception):
    """A coupling shard or manifest is missing, malformed, inconsistent or corrupt."""


class FingerprintMismatchError(CouplingStoreError):
    """Stores (or a store and the caller) disagree on what made the couplings."""


class IncompleteShardError(CouplingStoreError):
    """A shard still has chunks that are not marked complete."""

    def __init__(self, path, missing: Sequence[int]):
        self.path, self.missing = str(path), [int(i) for i in missing]
        super().__init__(f"{path}: {len(self.missing)} chunk(s) not complete: {_abbrev(self.missing)}")


class NonFiniteEndpointError(CouplingStoreError):
    """The sampler returned NaN/inf endpoints; the chunk was neither stored nor marked."""


def _abbrev(items: Sequence[Any]) -> str:
    """Short list rendering for error messages."""
    items = list(items)
    head = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return f"[{head}{', ...' if len(items) > _MAX_LISTED else ''}] ({len(items)} total)"


def _labels_sha256(labels: np.ndarray) -> str:
    """Hash of a label slice (int32 little-endian), recorded at creation and checked on verify."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i4").tobytes()).hexdigest()


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint's canonical JSON (key order and tuple-vs-list do not matter)."""
    return json_sha256(fingerprint)


# ----------------------------------------------------------------------------------------------
# Shard geometry


def shard_range(num_samples: int, shard: int, num_shards: int, chunk: int) -> tuple[int, int]:
    """[start, stop) of `shard` out of `num_shards`: whole generation chunks, split as evenly as possible.

    Every boundary is a multiple of `chunk` except the final stop (= `num_samples`).
    """
    for name, value in (("num_samples", num_samples), ("num_shards", num_shards), ("chunk", chunk)):
        require_int(name, value, 1)
    require_int("shard", shard, 0, num_shards)
    num_chunks = -(-num_samples // chunk)
    if num_shards > num_chunks:
        raise ValueError(
            f"{num_shards} shards for {num_chunks} chunks of {chunk} ({num_samples} samples): "
            "every shard needs at least one chunk; use fewer shards or a smaller chunk"
        )
    first, last = shard * num_chunks // num_shards, (shard + 1) * num_chunks // num_shards
    return first * chunk, min(last * chunk, num_samples)


def _chunk_bounds(attrs: dict[str, Any], i: int) -> tuple[int, int]:
    """Local [lo, hi) of chunk i inside a shard store."""
    chunk, count = int(attrs["chunk"]), int(attrs["count"])
    return i * chunk, min((i + 1) * chunk, count)


# ----------------------------------------------------------------------------------------------
# Creating a shard store


def create_shard_store(
    path,
    *,
    index_store,
    shard: int,
    num_shards: int,
    chunk: int,
    shape: Sequence[int],
    noise_dtype: str = "float32",
    endpoint_dtype: str = "float32",
    seed: int,
    fingerprint: dict[str, Any],
) -> None:
    """Create the (empty) store for one shard, or reuse it if it exists with identical attributes.

    Raises FingerprintMismatchError if a store exists at `path` with different attributes (a
    different teacher, sampler, seed, index or geometry): it is never overwritten. Safe to call
    from several processes at once: the store is built aside and renamed without clobbering.
    """
    path = Path(path)
    index = load_index(index_store)
    attrs = _shard_attrs(index, shard, num_shards, chunk, shape, noise_dtype, endpoint_dtype, seed, fingerprint)
    if path.exists():
        _check_existing(path, attrs)
        return
    start, stop = attrs["range"]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_empty_shard(tmp, attrs, index.labels[start:stop], index.sample_ids[start:stop])
        os.rename(tmp, path)  # fails if another process published the store first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise
        _check_existing(path, attrs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shard_attrs(
    index: ReflowIndex, shard, num_shards, chunk, shape, noise_dtype, endpoint_dtype, seed, fingerprint
) -> dict[str, Any]:
    """Validated attributes of a new shard store (JSON-normalised, as read back from Zarr)."""
    shape = tuple(shape)
    if not shape:
        raise ValueError("shape must be a non-empty sequence of positive integers, e.g. [C, H, W]")
    for k, size in enumerate(shape):
        require_int(f"shape[{k}]", size, 1)
    for name, value in (("noise_dtype", noise_dtype), ("endpoint_dtype", endpoint_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {DTYPES}, got {value!r}")
    require_int("seed", seed, 0)
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:
        fp_hash = fingerprint_hash(fingerprint)
    except (TypeError, ValueError) as e:
        raise ValueError(f"fingerprint must be JSON-serialisable without NaN/inf: {e}") from e
    start, stop = shard_range(len(index), shard, num_shards, chunk)
    attrs = {
        "format": SHARD_FORMAT, "shard": int(shard), "num_shards": int(num_shards),
        "range": [start, stop], "count": stop - start, "chunk": int(chunk),
        "num_chunks": -(-(stop - start) // int(chunk)), "shape": [int(s) for s in shape],
        "noise_dtype": noise_dtype, "endpoint_dtype": endpoint_dtype, "seed": int(seed),
        "index_hash": index.index_hash, "num_classes": index.num_classes,
        "label_sha256": _labels_sha256(index.labels[start:stop]),
        "fingerprint": fingerprint, "fingerprint_hash": fp_hash,
    }
    return json.loads(json.dumps(attrs))  # tuples -> lists, exactly as Zarr will return them


def _write_empty_shard(tmp: Path, attrs: dict[str, Any], labels: np.ndarray, sample_ids: np.ndarray) -> None:
    """Write arrays and attrs of a not-yet-generated shard into directory `tmp`."""
    group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
    n, chunk, shape = attrs["count"], attrs["chunk"], tuple(attrs["shape"])
    for name, dtype in (("noise", attrs["noise_dtype"]), ("endpoint", attrs["endpoint_dtype"])):
        group.create_array(name, shape=(n, *shape), chunks=(chunk, *shape), dtype=dtype,
                           compressors=None, fill_value=0)
    group.create_array("label", shape=(n,), chunks=(chunk,), dtype="int32")[...] = labels
    group.create_array("sample_id", shape=(n,), chunks=(chunk,), dtype="int64")[...] = sample_ids
    group.create_array("done", shape=(attrs["num_chunks"],), chunks=(1,), dtype="bool",
                       compressors=None, fill_value=False)


def _check_existing(path: Path, attrs: dict[str, Any]) -> None:
    """Accept an existing store only if its attributes equal `attrs`; never overwrite it."""
    existing = read_shard_attrs(path)
    if existing != attrs:
        keys = sorted(k for k in attrs.keys() | existing.keys() if existing.get(k) != attrs.get(k))
        raise FingerprintMismatchError(
            f"{path}: a coupling shard with different attributes already exists (differs in {keys}); "
            "refusing to overwrite it -- remove it or write to another path"
        )


def read_shard_attrs(path: Path) -> dict[str, Any]:
    """Attributes of a shard store, or CouplingStoreError if `path` is not one."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r", zarr_format=3).attrs)
    except (OSError, ValueError, KeyError) as e:
        raise CouplingStoreError(f"{path}: not a readable Zarr v3 coupling shard ({type(e).__name__}: {e})") from e
    if attrs.get("format") != SHARD_FORMAT:
        raise CouplingStoreError(f"{path}: not a coupling shard (format={attrs.get('format')!r}, expected {SHARD_FORMAT!r})")
    return attrs


def open_shard(path, mode: str = "r") -> tuple[zarr.Group, dict[str, Any]]:
    """Open a shard store and return (group, attrs)."""
    attrs = read_shard_attrs(Path(path))
    return zarr.open_group(str(path), mode=mode, zarr_format=3), attrs


def completion_mask(path) -> np.ndarray:
    """Bool vector: which chunks of the shard at `path` are marked complete."""
    group, _ = open_shard(path)
    return group["done"][...]


# ----------------------------------------------------------------------------------------------
# Generation


def chunk_noise(seed: int, sample_ids: np.ndarray, shape: Sequence[int], dtype: str) -> np.ndarray:
    """Stored noise for `sample_ids`: per-sample standard normal, rounded to the storage dtype."""
    return per_sample_noise(seed, sample_ids, shape, dtype=getattr(torch, dtype)).numpy()


def generate_shard(
    path,
    generate_fn: GenerateFn,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate this rank's missing chunks of the shard at `path`; returns counts and timing.

    Rank r owns the chunks whose index is r modulo `world_size` (fixed by chunk number, not by
    a snapshot of the mask, so ranks that start at different times never claim the same chunk)
    and skips those already marked. `generate_fn(noise, labels)` gets the float32 CPU noise
    exactly as it will be stored (already rounded to the storage dtype) and int64 CPU labels, and
    returns endpoints of the same shape; it is called under `torch.no_grad()`.
    `on_chunk_done(i)` runs after chunk i is marked.
    """
    require_int("world_size", world_size, 1)
    require_int("rank", rank, 0, world_size)
    group, attrs = open_shard(path, mode="r+")
    arrays = {name: group[name] for name in (*DATA_ARRAYS, "done")}
    done = arrays["done"][...]
    mine = [i for i in range(attrs["num_chunks"]) if i % world_size == rank and not done[i]]
    samples = sum(hi - lo for lo, hi in (_chunk_bounds(attrs, i) for i in mine))
    t0 = time.perf_counter()
    desc = f"couplings shard {attrs['shard']} rank {rank}"
    with tqdm(total=samples, unit="sample", desc=desc, disable=not progress) as bar:
        for i in mine:
            bar.update(_generate_chunk(path, arrays, attrs, i, generate_fn))
            if on_chunk_done is not None:
                on_chunk_done(i)
    seconds = time.perf_counter() - t0
    return {
        "path": str(path), "shard": attrs["shard"], "rank": int(rank), "world_size": int(world_size),
        "chunks_total": attrs["num_chunks"], "chunks_done_before": int(done.sum()),
        "chunks_generated": len(mine), "samples_generated": samples,
        "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else None,
    }


def _generate_chunk(path, arrays: dict[str, zarr.Array], attrs: dict[str, Any], i: int, generate_fn: GenerateFn) -> int:
    """Generate, check, write and then mark chunk i (the mark comes last: see module docstring).

    Returns the number of samples written."""
    lo, hi = _chunk_bounds(attrs, i)
    ids, labels = arrays["sample_id"][lo:hi], arrays["label"][lo:hi]
    noise = chunk_noise(attrs["seed"], ids, attrs["shape"], attrs["noise_dtype"])
    with torch.no_grad():
        out = generate_fn(torch.from_numpy(noise.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))
    endpoint = _as_endpoint(out, noise.shape, attrs["endpoint_dtype"], path, i, ids)
    arrays["noise"][lo:hi] = noise
    arrays["endpoint"][lo:hi] = endpoint
    arrays["done"][i] = True
    return hi - lo


def _as_endpoint(out: Any, shape: tuple[int, ...], dtype: str, path, i: int, ids: np.ndarray) -> np.ndarray:
    """generate_fn's output as a finite numpy array in the storage dtype, or a clear error."""
    if not isinstance(out, torch.Tensor):
        raise CouplingStoreError(f"{path}: generate_fn returned {type(out).__name__} for chunk {i}, expected a Tensor")
    if tuple(out.shape) != shape:
        raise CouplingStoreError(f"{path}: generate_fn returned shape {tuple(out.shape)} for chunk {i}, expected {shape}")
    # Cast first: an endpoint beyond float16's range becomes inf and must be caught too.
    with np.errstate(over="ignore"):  # overflow is reported below, as non-finite values
        endpoint = out.detach().to("cpu", torch.float32).numpy().astype(dtype)
    bad = ~np.isfinite(endpoint.reshape(len(endpoint), -1)).all(axis=1)
    if bad.any():
        raise NonFiniteEndpointError(
            f"{path}: chunk {i}: non-finite endpoint ({dtype}) for sample ids {_abbrev(ids[bad].tolist())}; "
            "chunk not stored and not marked"
        )
    return endpoint


# ----------------------------------------------------------------------------------------------
# Verification


def coupling_distance(noise: np.ndarray, endpoint: np.ndarray) -> np.ndarray:
    """Per-sample mean((n - x)^2) in float64 -- the quantity the truncation threshold applies to."""
    diff = noise.astype(np.float64) - endpoint.astype(np.float64)
    return np.square(diff).reshape(len(diff), -1).mean(axis=1)


def verify_shard(path, *, index_store=None, check_noise: bool = False, progress: bool = False) -> dict[str, Any]:
    """Check a shard is complete and sound; returns a report, raises a CouplingStoreError subclass.

    Checks: every chunk marked (IncompleteShardError lists the missing ones); sample ids are the
    shard's index slice; labels match the hash taken at creation (and, with `index_store`, the
    index itself); noise and endpoints finite. `check_noise` also regenerates every noise chunk
    and compares it bit for bit (costly for big stores).
    """
    index = load_index(index_store) if index_store is not None else None
    report, _ = scan_shard(path, index=index, check_noise=check_noise, progress=progress)
    return report


def scan_shard(
    path, *, index: ReflowIndex | None, check_noise: bool = False, progress: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """One pass over a shard: all verify_shard checks plus the per-sample distances."""
    group, attrs = open_shard(path)
    missing = np.flatnonzero(~group["done"][...])
    if missing.size:
        raise IncompleteShardError(path, missing.tolist())
    labels, ids = _check_ids_and_labels(path, group, attrs, index)
    distances = np.empty(attrs["count"], dtype=np.float64)
    noise_arr, endpoint_arr = group["noise"], group["endpoint"]
    bad_chunks: list[int] = []
    for i in tqdm(range(attrs["num_chunks"]), desc=f"verify {Path(path).name}", disable=not progress):
        lo, hi = _chunk_bounds(attrs, i)
        noise, endpoint = read_array(path, noise_arr, lo, hi), read_array(path, endpoint_arr, lo, hi)
        if not (np.isfinite(noise).all() and np.isfinite(endpoint).all()):
            bad_chunks.append(i)
            continue
        if check_noise and not np.array_equal(noise, chunk_noise(attrs["seed"], ids[lo:hi], attrs["shape"], attrs["noise_dtype"])):
            raise CouplingStoreError(f"{path}: chunk {i}: stored noise differs from the noise of its sample ids")
        distances[lo:hi] = coupling_distance(noise, endpoint)
    if bad_chunks:
        raise CouplingStoreError(f"{path}: non-finite noise/endpoint values in chunk(s) {_abbrev(bad_chunks)}")
    partial = _partial_files(Path(path))
    report = {
        "path": str(path), "shard": attrs["shard"], "range": attrs["range"], "count": attrs["count"],
        "num_chunks": attrs["num_chunks"], "fingerprint_hash": attrs["fingerprint_hash"],
        "index_hash": attrs["index_hash"], "stray_partial_files": len(partial),
        "class_counts": np.bincount(labels, minlength=attrs["num_classes"]).tolist(),
    }
    return report, distances


def read_array(path, array: zarr.Array, lo: int, hi: int) -> np.ndarray:
    """Whole-chunk read that names the store, array and range if the chunk cannot be decoded."""
    try:
        return array[lo:hi]
    except Exception as e:  # codec/IO errors come in many types; all mean "corrupt chunk"
        raise CouplingStoreError(f"{path}: cannot read '{array.basename}'[{lo}:{hi}]: {type(e).__name__}: {e}") from e


def _check_ids_and_labels(path, group: zarr.Group, attrs: dict[str, Any], index: ReflowIndex | None):
    """Sample ids must be the shard's index slice; labels must match the creation hash and index."""
    start, stop = attrs["range"]
    ids, labels = group["sample_id"][...], group["label"][...]
    expected_ids = np.arange(start, stop, dtype=np.int64)
    if ids.shape != expected_ids.shape or not np.array_equal(ids, expected_ids):
        raise CouplingStoreError(f"{path}: sample_id is not the index slice {start}..{stop - 1}")
    if _labels_sha256(labels) != attrs["label_sha256"]:
        raise CouplingStoreError(f"{path}: labels changed since the store was created (label_sha256 mismatch)")
    if index is not None:
        if attrs["index_hash"] != index.index_hash:
            raise FingerprintMismatchError(
                f"{path}: cut from index {attrs['index_hash'][:12]}..., not {index.path} ({index.index_hash[:12]}...)"
            )
        wrong = np.flatnonzero(labels != index.labels[start:stop])
        if wrong.size:
            raise CouplingStoreError(f"{path}: labels differ from {index.path} at sample ids {_abbrev((wrong + start).tolist())}")
    return labels, ids


def _partial_files(path: Path) -> list[Path]:
    """Temporaries a killed Zarr writer left behind (never part of the data)."""
    return sorted(p for p in path.rglob(f"*{_PARTIAL_SUFFIX}") if p.is_file())


def store_checksum(path) -> str:
    """`fileio.tree_checksum` of a directory store (Zarr ``*.partial`` temporaries excluded)."""
    root = Path(path)
    if not root.is_dir():
        raise CouplingStoreError(f"{root}: not a directory store")
    return tree_checksum(root)
