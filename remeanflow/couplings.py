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
    digest    [num_chunks, 4] uint64, chunk (1, 4)  digest[i, k]: digest of chunk i of DATA_ARRAYS[k]
    done      [num_chunks] bool, chunk 1     completion mask: done[i] <=> chunk i is complete

Compact stores (``store_noise=False``, attribute ``"noise": "regenerated"``) leave ``noise`` out:
it is a function of (sample_id, seed) (`sampling.per_sample_noise`), so every reader regenerates it
(`RegeneratedNoise`, which `chunk_arrays` returns in its place) and checks it against the noise
digest recorded when the endpoint was generated: a numpy whose generator gives other noise is a
`CorruptChunkError` naming the numpy versions, never other training data. With float16 endpoints
this is 32 KiB per 4x64x64 coupling instead of 128 KiB.

``noise``/``endpoint``/``label``/``sample_id`` use one Zarr chunk per generation batch along N and
no sharding codec, so processes that write different batches never touch the same object
(several writers in one Zarr chunk or shard silently lose data). They are stored uncompressed:
Gaussian noise does not compress and training reads them at full speed.

Why a bool array with chunk size 1 for the mask (rather than marker files): every mask entry is
its own 1-byte object, written by Zarr's LocalStore through a temporary file and rename, so two
ranks never share a mask object and a mask entry is either absent (False) or fully written; and
the whole mask reads back with one ``done[...]``. A chunk is marked only after its data arrays
are written, so a process killed mid-chunk leaves it unmarked and a rerun regenerates it.

Chunk digests. When chunk i is generated, ``digest[i]`` receives, for each of noise, endpoint,
label and sample_id, the digest of the chunk's *position* followed by the little-endian bytes of
its chunk i, exactly as written, before ``done[i]`` is set. The position (`chunk_position`) is the
store's identity (fingerprint hash, index hash, seed, shard of num_shards), the chunk index and the
sample-id range the reflow index assigns to the chunk, plus the array's name; it enters the hash as
the sha256 of its canonical JSON (`position_header`). So a chunk copied to another position --
replayed over another chunk, swapped with one, moved from another shard or another store -- fails
its digest even when its digest row travels with it; and every checked read also compares the
sample ids it read with the ones the index assigns to that position (the index's ids are
``0..N-1`` in order, so that is ``range[0] + lo .. range[0] + hi - 1``: no index read per chunk),
naming the chunk whose ids they are. The algorithm is recorded in the attributes (``digest``): XXH3-64 (``xxh3_64``,
the `xxhash` package, about 30 GB/s) by default, or CRC-32 (`zlib.crc32`, standard library, about
7 GB/s) when the store is created with ``digest="zlib.crc32"``; a store is verified with the
algorithm it records. Like ``done``, ``digest`` has one Zarr chunk per entry, so each rank writes
only the entries of its own chunks. Every read that feeds training or the merge
(`read_checked_chunk`: `scan_shard`, hence `verify_shard` and `coupling_set.merge_shards`, and
`coupling_set.CouplingReader.read_chunk`) recomputes the digests of what it read and raises
`CorruptChunkError` on a mismatch -- naming the shard, the chunk, the array and, when the chunk
file is gone (Zarr would silently return fill values, which cannot match the digest of real
data), the missing file -- so corrupt, lost or misplaced couplings are an error, never training
data. The digests do not depend on the number of writer processes. Stores in an older format are
refused with `OutdatedShardError`: format ``remeanflow.couplings.shard/1`` has no digests, ``/2``
position-free ones (a replayed chunk passed them); neither can be verified, so they must be
regenerated (the couplings come out bit-identical). The digests are integrity checks, not
signatures: XXH3 has no key, so whoever can write the store can also write matching digests.
Repair: `unmark_corrupt_chunks` (called by the couplings job before it resumes a store) unmarks the
marked chunks that fail their digest, so `generate_shard` regenerates only those.

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
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .fileio import json_sha256, tree_checksum
from .misc import require_int, shard_range
from .reflow_index import ReflowIndex, load_index
from .sampling import per_sample_noise

SHARD_FORMAT = "remeanflow.couplings.shard/3"
# Older stores, refused (OutdatedShardError) with why their chunks cannot be verified.
OUTDATED_FORMATS = {
    "remeanflow.couplings.shard/1": "written before chunk digests",
    "remeanflow.couplings.shard/2": "written with position-free chunk digests (a chunk copied over another one "
                                    "passed them)",
}
DTYPES = ("float16", "float32")
DATA_ARRAYS = ("noise", "endpoint", "label", "sample_id")
# Chunk digest algorithms (module docstring, chunk digests); the one a store uses is in its attributes.
DIGEST_ALGORITHMS = ("zlib.crc32", "xxh3_64")
DEFAULT_DIGEST = "xxh3_64"
# What a chunk digest covers (recorded in the attributes; module docstring, chunk digests).
DIGEST_OF = ("position_header(chunk position, array name) followed by the little-endian bytes of chunk i of the "
             "array")
# Zarr's LocalStore writes through "<name>.<uuid>.partial" temporaries; a killed writer can leave one.
_PARTIAL_SUFFIX = ".partial"
# Value of the "noise" attribute of a compact store (no noise array; readers regenerate it).
REGENERATED = "regenerated"
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


class OutdatedShardError(CouplingStoreError):
    """A shard in an older format (`OUTDATED_FORMATS`): its chunks cannot be verified; regenerate it."""

    def __init__(self, path, found: str):
        self.path = str(path)
        if work_store_for(path) is not None:  # a published shard of the workflow
            todo = (f"Regenerate it: rerun the workflow with `--forcerun {path}` (the couplings_shard job "
                    "regenerates it; the couplings come out bit-identical).")
        else:
            todo = f"Delete {path} and generate it again (the couplings come out bit-identical)."
        why = OUTDATED_FORMATS.get(found, "an older format")
        super().__init__(
            f"{path}: coupling shard in format {found!r}, {why} (now {SHARD_FORMAT!r}): its chunks cannot be "
            f"verified, so it is not used. {todo}"
        )


class CorruptChunkError(CouplingStoreError):
    """Marked chunks of a shard whose stored data no longer match the digests recorded when they
    were written (changed bytes, a missing or unreadable chunk file). `chunks` lists them and
    `problems[i]` maps each bad array of chunk i to what is wrong with it."""

    def __init__(self, path, problems: Mapping[int, Mapping[str, str]]):
        self.path = str(path)
        self.chunks = sorted(int(i) for i in problems)
        self.problems = {int(i): dict(p) for i, p in problems.items()}
        details = "; ".join(
            f"chunk {i}: " + ", ".join(f"{name} {what}" for name, what in self.problems[i].items())
            for i in self.chunks[:_MAX_LISTED]
        )
        super().__init__(
            f"{path}: corrupt coupling chunk(s) {_abbrev(self.chunks)}: {details}. {regenerate_advice(path)}"
        )


def work_store_for(path) -> Path | None:
    """The couplings job's work store for the shard at `path` (`reflow/couplings/<name>` ->
    `reflow/work/<name>`, the rule's `work` path), or None when `path` is not laid out that way."""
    path = Path(path)
    if path.parent.name == "couplings" and path.parent.parent.name == "reflow":
        return path.parent.parent / "work" / path.name
    return None


def regenerate_advice(path) -> str:
    """What to do about a shard with corrupt chunks (the end of every CorruptChunkError).

    Deleting a published shard is not enough: Snakemake does not rerun a job whose output is gone
    when the outputs downstream of it still exist, so the advice is `--forcerun <shard>`."""
    work = work_store_for(path)
    if work is None:  # not a published shard of the workflow (a work store, or library use)
        return ("The shard must be regenerated: `couplings.unmark_corrupt_chunks` on it, then "
                "`couplings.generate_shard`, regenerates only the bad chunk(s).")
    return (f"The shard must be regenerated: rerun the workflow with `--forcerun {path}` (the couplings_shard "
            "job regenerates it; the merge and everything after it rerun). To regenerate only the bad "
            f"chunk(s), first move {path} to {work}: the job then re-verifies every finished chunk there and "
            "regenerates only those that fail.")


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
    digest: str = DEFAULT_DIGEST,
    store_noise: bool = True,
) -> None:
    """Create the (empty) store for one shard, or reuse it if it exists with identical attributes.

    Raises FingerprintMismatchError if a store exists at `path` with different attributes (a
    different teacher, sampler, seed, index or geometry): it is never overwritten. Safe to call
    from several processes at once: the store is built aside and renamed without clobbering.
    `digest` names the chunk digest algorithm (`DIGEST_ALGORITHMS`). `store_noise=False` makes a
    compact store (module docstring): the noise is regenerated by every reader.
    """
    path = Path(path)
    index = load_index(index_store)
    attrs = _shard_attrs(index, shard, num_shards, chunk, shape, noise_dtype, endpoint_dtype, seed, fingerprint, digest)
    if not store_noise:  # only then: the attributes of a store with noise stay those of earlier stores
        attrs["noise"] = REGENERATED
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
    index: ReflowIndex, shard, num_shards, chunk, shape, noise_dtype, endpoint_dtype, seed, fingerprint, digest
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
    if digest not in DIGEST_ALGORITHMS:
        raise ValueError(f"digest must be one of {DIGEST_ALGORITHMS}, got {digest!r}")
    digest_fn(digest)  # an algorithm this machine cannot compute is refused before anything is written
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
        "digest": {"algorithm": digest, "of": DIGEST_OF, "arrays": list(DATA_ARRAYS)},
    }
    return json.loads(json.dumps(attrs))  # tuples -> lists, exactly as Zarr will return them


def _write_empty_shard(tmp: Path, attrs: dict[str, Any], labels: np.ndarray, sample_ids: np.ndarray) -> None:
    """Write arrays and attrs of a not-yet-generated shard into directory `tmp`."""
    group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
    n, chunk, shape = attrs["count"], attrs["chunk"], tuple(attrs["shape"])
    stored = {} if noise_regenerated(attrs) else {"noise": attrs["noise_dtype"]}
    for name, dtype in {**stored, "endpoint": attrs["endpoint_dtype"]}.items():
        group.create_array(name, shape=(n, *shape), chunks=(chunk, *shape), dtype=dtype,
                           compressors=None, fill_value=0)
    group.create_array("label", shape=(n,), chunks=(chunk,), dtype="int32")[...] = labels
    group.create_array("sample_id", shape=(n,), chunks=(chunk,), dtype="int64")[...] = sample_ids
    # one object per entry, like `done`: each rank writes the digests of its own chunks only
    group.create_array("digest", shape=(attrs["num_chunks"], len(DATA_ARRAYS)), chunks=(1, len(DATA_ARRAYS)),
                       dtype="uint64", compressors=None, fill_value=0)
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
    if attrs.get("format") in OUTDATED_FORMATS:
        raise OutdatedShardError(path, attrs["format"])
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


def noise_regenerated(attrs: Mapping[str, Any]) -> bool:
    """Whether a shard is compact: its noise is regenerated from (sample_id, seed), not stored."""
    return attrs.get("noise") == REGENERATED


class RegeneratedNoise:
    """The noise "array" of a compact store: ``[lo:hi]`` regenerates the noise of the stored sample
    ids lo..hi-1 (`chunk_noise`, rounded to the store's noise dtype), exactly what generation started
    from; the chunk digests then check it like stored data."""

    basename = "noise (regenerated)"

    def __init__(self, sample_id: zarr.Array, attrs: Mapping[str, Any]):
        self.sample_id, self.attrs = sample_id, attrs
        self.dtype = np.dtype(attrs["noise_dtype"])
        self.shape = (int(attrs["count"]), *attrs["shape"])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError(f"regenerated noise is read by contiguous slices, got {item!r}")
        return chunk_noise(self.attrs["seed"], self.sample_id[item], self.attrs["shape"], self.attrs["noise_dtype"])


def chunk_arrays(path, group: zarr.Group) -> dict[str, zarr.Array]:
    """The data arrays and the `digest` array of an open shard (CouplingStoreError if one is gone);
    `RegeneratedNoise` stands in for the noise of a compact store."""
    arrays: dict[str, Any] = {}
    regenerated = noise_regenerated(group.attrs)
    for name in (*DATA_ARRAYS, "digest"):
        if name == "noise" and regenerated:
            continue
        try:
            arrays[name] = group[name]
        except KeyError as e:
            raise CouplingStoreError(f"{path}: array '{name}' is missing (store damaged). {regenerate_advice(path)}") from e
    if regenerated:
        arrays["noise"] = RegeneratedNoise(arrays["sample_id"], dict(group.attrs))
    return arrays


def read_digests(path, array: zarr.Array) -> np.ndarray:
    """All recorded chunk digests, uint64 [num_chunks, len(DATA_ARRAYS)] (an unwritten entry reads as 0)."""
    try:
        return array[...]
    except Exception as e:  # codec/IO errors come in many types
        raise CouplingStoreError(f"{path}: cannot read the chunk digests: {type(e).__name__}: {e}. "
                                 f"{regenerate_advice(path)}") from e


# ----------------------------------------------------------------------------------------------
# Chunk digests


def digest_fn(algorithm: str) -> Callable[[bytes, Any], int]:
    """The function (header, data) -> int of a chunk digest algorithm: the digest of `header`
    followed by the bytes-like `data`, without concatenating them. CouplingStoreError if this
    machine cannot compute it (XXH3 needs the `xxhash` package)."""
    if algorithm == "zlib.crc32":
        return lambda header, data: zlib.crc32(data, zlib.crc32(header))
    if algorithm == "xxh3_64":
        try:
            import xxhash
        except ImportError as e:
            raise CouplingStoreError("chunk digest 'xxh3_64' needs the xxhash package (pip install xxhash)") from e

        def xxh3(header: bytes, data: Any) -> int:
            h = xxhash.xxh3_64(header)  # streaming equals one-shot XXH3 of header + data
            h.update(data)
            return h.intdigest()

        return xxh3
    raise CouplingStoreError(f"unknown chunk digest algorithm {algorithm!r} (known: {DIGEST_ALGORITHMS})")


def store_digest(attrs: Mapping[str, Any]) -> str:
    """The chunk digest algorithm a shard records in its attributes."""
    return attrs["digest"]["algorithm"]


def chunk_position(attrs: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Where chunk i of a shard sits: the store's identity, the chunk index and the sample ids
    [start, stop) that the reflow index assigns to it (what a chunk digest binds besides the bytes)."""
    lo, hi = _chunk_bounds(attrs, i)
    start = int(attrs["range"][0])
    return {"fingerprint_hash": attrs["fingerprint_hash"], "index_hash": attrs["index_hash"], "seed": attrs["seed"],
            "shard": attrs["shard"], "num_shards": attrs["num_shards"], "chunk": int(i),
            "sample_ids": [start + lo, start + hi]}


def position_header(attrs: Mapping[str, Any], i: int, name: str) -> bytes:
    """The bytes hashed before chunk i of array `name`: the sha256 of the canonical JSON of its
    `chunk_position` and name (32 bytes, whatever the position's size)."""
    return bytes.fromhex(json_sha256({**chunk_position(attrs, i), "array": name}))


def array_digest(a: np.ndarray, algorithm: str = DEFAULT_DIGEST, header: bytes = b"") -> int:
    """Digest of `header` followed by an array's little-endian bytes in C order (= the stored bytes
    of an uncompressed chunk)."""
    a = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False)
    return int(digest_fn(algorithm)(header, a.reshape(-1).view(np.uint8)))


def digest_at(a: np.ndarray, attrs: Mapping[str, Any], i: int, name: str) -> int:
    """The digest of `a` as chunk i of array `name` of the shard with attributes `attrs`."""
    return array_digest(a, store_digest(attrs), position_header(attrs, i, name))


def chunk_digest(data: Mapping[str, np.ndarray], attrs: Mapping[str, Any], i: int) -> np.ndarray:
    """uint64 [len(DATA_ARRAYS)]: `digest_at` of chunk i of every data array."""
    return np.array([digest_at(data[name], attrs, i, name) for name in DATA_ARRAYS], dtype=np.uint64)


def chunk_file(path, array: zarr.Array, i: int) -> Path:
    """The file that holds Zarr chunk i (along N) of `array` in the directory store at `path`."""
    return Path(path) / array.path / array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))


def read_checked_chunk(
    path, arrays: Mapping[str, zarr.Array], attrs: Mapping[str, Any], i: int, expected: np.ndarray
) -> dict[str, np.ndarray]:
    """Chunk i of every data array of the shard at `path` (attributes `attrs`), checked against its
    recorded digests `expected` (row i of `digest`) and its sample ids against those the index
    assigns to chunk i; CorruptChunkError names the shard, the chunk, the bad arrays and what to do."""
    data, problems = _read_and_check(path, arrays, attrs, i, expected)
    if problems:
        raise CorruptChunkError(path, {i: problems})
    return data


def _read_and_check(
    path, arrays: Mapping[str, zarr.Array], attrs: Mapping[str, Any], i: int, expected: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(data, problems): chunk i of every data array, and what is wrong with each array that cannot
    be read, does not match its digest at this position, or (sample_id) holds other ids than the
    position's. A missing chunk file reads as fill values, whose digest cannot match that of the
    data once written; the file's absence is then named."""
    lo, hi = _chunk_bounds(attrs, i)
    data: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    for name in DATA_ARRAYS:
        try:
            data[name] = arrays[name][lo:hi]
        except Exception as e:  # codec/IO errors come in many types; all mean "corrupt chunk"
            problems[name] = f"cannot be read ({type(e).__name__}: {e})"
    misplaced = _misplaced_ids(attrs, i, data["sample_id"]) if "sample_id" in data else None
    for k, name in enumerate(DATA_ARRAYS):
        if name in data and digest_at(data[name], attrs, i, name) != int(expected[k]):
            problems[name] = _mismatch(path, arrays, name, i, misplaced)
    if misplaced:  # a check of its own, whatever the digests say; named first, as it explains the others
        problems = {"sample_id": problems.pop("sample_id", misplaced), **problems}
    return data, problems


def _misplaced_ids(attrs: Mapping[str, Any], i: int, ids: np.ndarray) -> str | None:
    """None if chunk i holds the sample ids the reflow index assigns to its position, else what it
    holds instead (and whose they are, when another chunk's of this shard)."""
    want_lo, want_hi = chunk_position(attrs, i)["sample_ids"]
    if np.array_equal(ids, np.arange(want_lo, want_hi)):
        return None
    start, stop = attrs["range"]
    first = int(ids[0]) if ids.size else 0
    contiguous = ids.size > 0 and np.array_equal(ids, np.arange(first, first + ids.size))
    held = f"{first}..{int(ids[-1])}" if contiguous else _abbrev(ids.tolist())
    if ids.size and not (start <= ids.min() and ids.max() < stop):
        held += f", not all in this shard's range {start}..{stop - 1}"
    elif contiguous and (first - start) % int(attrs["chunk"]) == 0:
        held += f" (those of chunk {(first - start) // int(attrs['chunk'])})"
    return (f"holds sample ids {held} where the reflow index assigns {want_lo}..{want_hi - 1}: a chunk replayed, "
            "swapped or moved from another position")


def _mismatch(path, arrays: Mapping[str, zarr.Array], name: str, i: int, misplaced: str | None) -> str:
    """Why chunk i of array `name` does not match its digest, as far as the files tell (error path
    only); `misplaced`: what `_misplaced_ids` found wrong with the chunk's sample ids, if anything."""
    if isinstance(arrays[name], RegeneratedNoise):
        if misplaced:
            return "regenerated from sample ids that are not this position's (see sample_id)"
        made_with = (arrays[name].attrs.get("fingerprint", {}).get("noise") or {}).get("numpy")
        made = f"numpy {made_with} when the store was made" if made_with else "the store records no numpy version"
        return (f"regenerated from (sample_id, seed) differs from the noise its endpoints were generated from "
                f"(numpy {np.__version__} here, {made}): this numpy's generator gives other noise, or the sample "
                "ids changed")
    data_file, digest_file = chunk_file(path, arrays[name], i), chunk_file(path, arrays["digest"], i)
    rel = data_file.relative_to(path).as_posix()
    if not data_file.exists():
        return f"chunk file {rel} is missing (Zarr would have returned fill values)"
    if not digest_file.exists():
        return f"has no recorded digest (file {digest_file.relative_to(path).as_posix()} is missing)"
    if name == "sample_id" and misplaced:
        return misplaced
    return f"data (file {rel}) differ from the digest recorded when the chunk was written"


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
    arrays = {**chunk_arrays(path, group), "done": group["done"]}
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
    """Generate, check, write, record the digests of and then mark chunk i (the mark comes last:
    see module docstring). Returns the number of samples written."""
    lo, hi = _chunk_bounds(attrs, i)
    ids, labels = arrays["sample_id"][lo:hi], arrays["label"][lo:hi]
    noise = chunk_noise(attrs["seed"], ids, attrs["shape"], attrs["noise_dtype"])
    with torch.no_grad():
        out = generate_fn(torch.from_numpy(noise.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))
    endpoint = _as_endpoint(out, noise.shape, attrs["endpoint_dtype"], path, i, ids)
    if not isinstance(arrays["noise"], RegeneratedNoise):
        arrays["noise"][lo:hi] = noise
    arrays["endpoint"][lo:hi] = endpoint
    data = {"noise": noise, "endpoint": endpoint, "label": labels, "sample_id": ids}
    arrays["digest"][i] = chunk_digest(data, attrs, i)
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
    """One pass over a shard: all verify_shard checks plus the per-sample distances.

    Every chunk is read once and checked against its recorded digests first; CorruptChunkError
    lists every chunk that fails, with what is wrong and what to do."""
    group, attrs = open_shard(path)
    missing = np.flatnonzero(~group["done"][...])
    if missing.size:
        raise IncompleteShardError(path, missing.tolist())
    arrays = chunk_arrays(path, group)
    digests = read_digests(path, arrays["digest"])
    count = attrs["count"]
    distances = np.empty(count, dtype=np.float64)
    labels, ids = np.empty(count, dtype=np.int32), np.empty(count, dtype=np.int64)
    corrupt: dict[int, dict[str, str]] = {}
    bad_chunks: list[int] = []
    for i in tqdm(range(attrs["num_chunks"]), desc=f"verify {Path(path).name}", disable=not progress):
        lo, hi = _chunk_bounds(attrs, i)
        data, problems = _read_and_check(path, arrays, attrs, i, digests[i])
        if problems:
            corrupt[i] = problems
            continue
        noise, endpoint = data["noise"], data["endpoint"]
        labels[lo:hi], ids[lo:hi] = data["label"], data["sample_id"]
        if not (np.isfinite(noise).all() and np.isfinite(endpoint).all()):
            bad_chunks.append(i)
            continue
        if check_noise and not np.array_equal(noise, chunk_noise(attrs["seed"], ids[lo:hi], attrs["shape"], attrs["noise_dtype"])):
            raise CouplingStoreError(f"{path}: chunk {i}: stored noise differs from the noise of its sample ids")
        distances[lo:hi] = coupling_distance(noise, endpoint)
    if corrupt:
        raise CorruptChunkError(path, corrupt)
    if bad_chunks:
        raise CouplingStoreError(f"{path}: non-finite noise/endpoint values in chunk(s) {_abbrev(bad_chunks)}")
    _check_ids_and_labels(path, attrs, ids, labels, index)
    partial = _partial_files(Path(path))
    report = {
        "path": str(path), "shard": attrs["shard"], "range": attrs["range"], "count": attrs["count"],
        "num_chunks": attrs["num_chunks"], "fingerprint_hash": attrs["fingerprint_hash"],
        "index_hash": attrs["index_hash"], "stray_partial_files": len(partial),
        "class_counts": np.bincount(labels, minlength=attrs["num_classes"]).tolist(),
    }
    return report, distances


def unmark_corrupt_chunks(path, *, index_store) -> list[int]:
    """Unmark every marked chunk of the shard at `path` that fails its digest (or cannot be read), so
    that `generate_shard` regenerates exactly those; returns their numbers.

    The bad chunk files are deleted first (a regenerated chunk never merges with a damaged object);
    `label` and `sample_id`, written only at creation, are rewritten from the index (`index_store`,
    the one the store was cut from) for every chunk whose stored values differ from it, marked or
    not. Chunks that pass are left alone, so resuming a sound store costs one read of it.
    """
    group, attrs = open_shard(path, mode="r+")
    index = load_index(index_store)
    if attrs["index_hash"] != index.index_hash:
        raise FingerprintMismatchError(
            f"{path}: cut from index {attrs['index_hash'][:12]}..., not {index.path} ({index.index_hash[:12]}...)"
        )
    arrays, done_arr = chunk_arrays(path, group), group["done"]
    done, digests = done_arr[...], read_digests(path, arrays["digest"])
    start = attrs["range"][0]
    bad: list[int] = []
    for i in range(attrs["num_chunks"]):
        lo, hi = _chunk_bounds(attrs, i)
        want = {"label": index.labels[start + lo : start + hi], "sample_id": index.sample_ids[start + lo : start + hi]}
        if done[i]:  # the digests cover label and sample_id too
            _, problems = _read_and_check(path, arrays, attrs, i, digests[i])
        else:  # not generated yet: only the creation-time arrays must be right
            problems = {name: "differs from the index" for name in want if not _equals(arrays[name], lo, hi, want[name])}
        for name in problems:
            if isinstance(arrays[name], RegeneratedNoise):
                continue  # nothing stored: regenerating the chunk makes noise and endpoint agree again
            chunk_file(path, arrays[name], i).unlink(missing_ok=True)
            if name in want:
                arrays[name][lo:hi] = want[name]
        if done[i] and problems:
            chunk_file(path, arrays["digest"], i).unlink(missing_ok=True)
            done_arr[i] = False
            bad.append(i)
    return bad


def _equals(array: zarr.Array, lo: int, hi: int, want: np.ndarray) -> bool:
    """Whether array[lo:hi] reads back as `want` (False if it cannot be read)."""
    try:
        return bool(np.array_equal(array[lo:hi], want))
    except Exception:  # a damaged chunk: rewrite it
        return False


def read_array(path, array: zarr.Array, lo: int, hi: int) -> np.ndarray:
    """Whole-chunk read that names the store, array and range if the chunk cannot be decoded."""
    try:
        return array[lo:hi]
    except Exception as e:  # codec/IO errors come in many types; all mean "corrupt chunk"
        raise CouplingStoreError(f"{path}: cannot read '{array.basename}'[{lo}:{hi}]: {type(e).__name__}: {e}") from e


def _check_ids_and_labels(path, attrs: dict[str, Any], ids: np.ndarray, labels: np.ndarray,
                          index: ReflowIndex | None) -> None:
    """Sample ids must be the shard's index slice; labels must match the creation hash and index."""
    start, stop = attrs["range"]
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


def _partial_files(path: Path) -> list[Path]:
    """Temporaries a killed Zarr writer left behind (never part of the data)."""
    return sorted(p for p in path.rglob(f"*{_PARTIAL_SUFFIX}") if p.is_file())


def store_checksum(path) -> str:
    """`fileio.tree_checksum` of a directory store (Zarr ``*.partial`` temporaries excluded)."""
    root = Path(path)
    if not root.is_dir():
        raise CouplingStoreError(f"{root}: not a directory store")
    return tree_checksum(root)
