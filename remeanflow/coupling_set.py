"""The merged coupling set: the manifest that ties the shard stores together, the global
truncation threshold, and reading the set for training.

Manifest (``reflow/manifest.json``, format ``MANIFEST_FORMAT``; `docs/architecture.md`): per shard
its path (relative to the manifest), range, count, chunk count and store checksum
(`couplings.store_checksum`); the shape, dtypes, seed, chunk and class count shared by all shards;
the fingerprint of the teacher/config that made them and its hash; the index hash; the truncation;
distance statistics with a histogram; the keep mask (``keep_mask``: every coupling's keep flag, in
sample-id order, bit-packed and base64-encoded, with its sha256 and counts) so that training never
recomputes the distances. `merge_shards` writes it atomically, after verifying every
shard (`couplings.scan_shard`: every chunk against its recorded digests, ids, labels, finite values)
and checking that the shards agree and tile the index exactly.

Truncation (`docs/method.md`, distance truncation): the threshold is computed once, at merge, over
the distances `couplings.coupling_distance` of all couplings (a quantile, or a fixed value), and
training keeps the couplings with distance <= threshold. The merge stores the resulting flags in the
manifest (``keep_mask``), so the training stream takes them from there instead of recomputing a
float64 distance per coupling per epoch; they are the same flags bit for bit, being the same
comparison of the same float64 distances. A manifest of format ``.../1`` (written before the mask
was stored) is still read: its keep flags are recomputed from each chunk, with a warning saying to
rerun the merge.

Reading for training: `open_couplings` returns a `CouplingReader`, which checks each shard against
the manifest (attributes only: fingerprint, index, and that the store at entry k's path is shard k
with the range the merge recorded, the entries tiling the set in order -- shard paths swapped in the
manifest or on disk are refused, naming both), loads each shard's chunk digests (the ``digest``
array, `couplings` module docstring) and reads whole generation chunks (`ChunkRef`), checking every
chunk it reads against its position-bound digests and its sample ids against those of its position
(`couplings.read_checked_chunk`), and adding each sample's keep flag (and, unless asked not to, its
distance). A changed, missing, unreadable, replayed, swapped or moved chunk raises
`couplings.CorruptChunkError` (shard, chunk, array, what to do): bad couplings never reach training.
The merge verifies every chunk the same way (`couplings.scan_shard`). A shard in an older format
(no digests, or position-free ones) is refused (`couplings.OutdatedShardError`).

The truncation threshold comes from `meanflow`; the shard store layer (`couplings`) does not
import this module, so the shard job's code version does not depend on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .couplings import (
    DATA_ARRAYS,
    CouplingStoreError,
    FingerprintMismatchError,
    chunk_arrays,
    coupling_distance,
    fingerprint_hash,
    open_shard,
    read_array,
    read_checked_chunk,
    read_digests,
    read_shard_attrs,
    scan_shard,
    store_checksum,
)
from .fileio import atomic_path
from .meanflow import truncation_mask, truncation_threshold
from .misc import diff_keys, require_int
from .reflow_index import ReflowIndex, load_index

MANIFEST_FORMAT = "remeanflow.couplings.manifest/2"
# Still read: the same manifest without `keep_mask` (the keep flags are then recomputed per chunk).
_MANIFEST_FORMATS_WITHOUT_MASK = ("remeanflow.couplings.manifest/1",)
KEEP_MASK_ENCODING = "numpy.packbits(bitorder='little'), base64"
# Attributes that must agree between shards of one coupling set (besides the fingerprint).
_GENERATION_KEYS = ("seed", "shape", "chunk", "noise_dtype", "endpoint_dtype", "num_shards", "num_classes")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Merging the shards


def merge_shards(
    shard_paths: Iterable,
    manifest_path,
    *,
    index_store,
    quantile: float | None = 0.9,
    fixed_threshold: float | None = None,
    histogram_bins: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Verify the shards together, compute the truncation threshold, write the manifest atomically.

    Truncation keeps couplings with distance <= threshold. The threshold is `fixed_threshold` if
    given (the official code's 0.87; `quantile` is then ignored), else the `quantile` of all
    distances (0.9 drops the top 10%), else (quantile=None) there is no truncation.
    """
    _check_truncation_args(quantile, fixed_threshold)
    require_int("histogram_bins", histogram_bins, 1)
    index = load_index(index_store)
    shards = _order_and_check_shards(shard_paths, index)
    distances, entries = [], []
    manifest_dir = Path(manifest_path).resolve().parent
    for path, attrs in shards:
        _, d = scan_shard(path, index=index, progress=progress)
        distances.append(d)
        entries.append({
            "path": os.path.relpath(Path(path).resolve(), manifest_dir), "range": attrs["range"],
            "count": attrs["count"], "num_chunks": attrs["num_chunks"], "checksum": store_checksum(path),
        })
    d = np.concatenate(distances)
    first = shards[0][1]
    trunc = truncation(d, quantile=quantile, fixed_threshold=fixed_threshold)
    keep = np.ones(d.size, bool) if trunc["threshold"] is None else truncation_mask(d, trunc["threshold"])
    manifest = {
        "format": MANIFEST_FORMAT, "shards": entries, "total": int(d.size),
        **{k: first[k] for k in ("chunk", "shape", "noise_dtype", "endpoint_dtype", "seed", "num_classes")},
        "fingerprint": first["fingerprint"], "fingerprint_hash": first["fingerprint_hash"],
        "index_hash": index.index_hash,
        "truncation": trunc,
        "distance_stats": distance_stats(d, histogram_bins),
        "keep_mask": encode_keep_mask(keep),  # last: a long line nobody needs to read
    }
    with atomic_path(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def _order_and_check_shards(shard_paths: Iterable, index: ReflowIndex) -> list[tuple[Path, dict[str, Any]]]:
    """Shards sorted by start, after the cheap attribute checks (before any data is read)."""
    shards = [(Path(p), read_shard_attrs(Path(p))) for p in shard_paths]
    if not shards:
        raise CouplingStoreError("merge_shards: no shard paths given")
    ref_path, ref = shards[0]
    for path, attrs in shards:
        if attrs["fingerprint_hash"] != ref["fingerprint_hash"]:
            raise FingerprintMismatchError(
                f"{path}: fingerprint {attrs['fingerprint_hash'][:12]}... differs from {ref_path} "
                f"({ref['fingerprint_hash'][:12]}...; keys {diff_keys(attrs['fingerprint'], ref['fingerprint'])})"
            )
        if attrs["index_hash"] != index.index_hash:
            raise FingerprintMismatchError(
                f"{path}: cut from index {attrs['index_hash'][:12]}..., not {index.path} ({index.index_hash[:12]}...)"
            )
        diff = [k for k in _GENERATION_KEYS if attrs[k] != ref[k]]
        if diff:
            raise FingerprintMismatchError(f"{path}: generation settings {diff} differ from {ref_path}")
    shards.sort(key=lambda s: s[1]["range"][0])
    _check_coverage(shards, len(index))
    return shards


def _check_coverage(shards: list[tuple[Path, dict[str, Any]]], total: int) -> None:
    """Sorted shard ranges must tile [0, total) with no gap, overlap or duplicate."""
    expected, prev = 0, None
    for path, attrs in shards:
        start, stop = attrs["range"]
        if start < expected:
            raise CouplingStoreError(f"{path}: range [{start}, {stop}) overlaps {prev} (which ends at {expected})")
        if start > expected:
            raise CouplingStoreError(f"{path}: gap before it: samples [{expected}, {start}) are in no shard")
        expected, prev = stop, path
    if expected != total:
        raise CouplingStoreError(f"shards cover [0, {expected}) but the index has {total} samples (last: {prev})")


def _check_truncation_args(quantile: float | None, fixed_threshold: float | None) -> None:
    """Reject bad truncation settings before any data is read."""
    if fixed_threshold is not None and not np.isfinite(fixed_threshold):
        raise ValueError(f"fixed_threshold must be finite, got {fixed_threshold!r}")
    if fixed_threshold is None and quantile is not None and not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")


def truncation(d: np.ndarray, *, quantile: float | None, fixed_threshold: float | None) -> dict[str, Any]:
    """Threshold and kept/dropped counts for per-sample distances `d` (keep d <= threshold)."""
    _check_truncation_args(quantile, fixed_threshold)
    if fixed_threshold is not None:
        mode, quantile, threshold = "fixed", None, float(fixed_threshold)
    elif quantile is not None:
        mode, threshold = "quantile", truncation_threshold(d, quantile)
    else:
        mode, threshold = "none", None
    kept = int(d.size if threshold is None else np.count_nonzero(truncation_mask(d, threshold)))
    return {"mode": mode, "quantile": quantile, "threshold": threshold, "kept": kept,
            "dropped": int(d.size) - kept, "rule": "keep distance <= threshold"}


def distance_stats(d: np.ndarray, bins: int) -> dict[str, Any]:
    """Summary of the per-sample distances for the manifest and the report."""
    pct = (1, 5, 10, 25, 50, 75, 90, 95, 99)
    counts, edges = np.histogram(d, bins=bins)
    return {
        "mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()), "max": float(d.max()),
        "percentiles": {str(p): float(v) for p, v in zip(pct, np.percentile(d, pct))},
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }


def encode_keep_mask(keep: np.ndarray) -> dict[str, Any]:
    """The manifest entry for per-coupling keep flags (sample-id order): one bit per coupling.

    Inside the manifest rather than in a file beside it, so that it is written atomically with the
    threshold it derives from and covered by whatever records the manifest's checksum; 1.28M
    couplings take ~210 kB of base64."""
    keep = np.asarray(keep, dtype=bool)
    packed = np.packbits(keep, bitorder="little").tobytes()
    return {"encoding": KEEP_MASK_ENCODING, "count": int(keep.size), "kept": int(np.count_nonzero(keep)),
            "sha256": hashlib.sha256(packed).hexdigest(), "data": base64.b64encode(packed).decode("ascii")}


def decode_keep_mask(manifest: dict[str, Any], manifest_path) -> np.ndarray:
    """The bool keep flags of every coupling stored in `manifest` (read from `manifest_path`),
    checked against the entry's sha256 and against the manifest's total and truncation counts."""
    entry = manifest.get("keep_mask")
    redo = "rerun the couplings_merge rule (coupling_set.merge_shards) to rewrite the manifest"

    def bad(why: str) -> CouplingStoreError:
        return CouplingStoreError(f"{manifest_path}: key 'keep_mask' {why}; {redo}")

    if not isinstance(entry, dict):
        raise bad(f"is missing or not an object (format {manifest.get('format')!r} stores the keep flags there)")
    if entry.get("encoding") != KEEP_MASK_ENCODING:
        raise bad(f"has encoding {entry.get('encoding')!r}, expected {KEEP_MASK_ENCODING!r}")
    try:
        packed = base64.b64decode(entry["data"], validate=True)
    except (KeyError, TypeError, binascii.Error) as e:
        raise bad(f"has no readable 'data' ({type(e).__name__}: {e})") from e
    if hashlib.sha256(packed).hexdigest() != entry.get("sha256"):
        raise bad("does not match its sha256 (the mask was changed after the merge)")
    total, kept = int(manifest["total"]), manifest["truncation"]["kept"]
    if entry.get("count") != total or len(packed) != -(-total // 8):
        raise bad(f"holds {entry.get('count')!r} flags in {len(packed)} bytes for {total} couplings")
    keep = np.unpackbits(np.frombuffer(packed, np.uint8), count=total, bitorder="little").astype(bool)
    if int(np.count_nonzero(keep)) != kept or entry.get("kept") != kept:
        raise bad(f"keeps {int(np.count_nonzero(keep))} couplings but 'truncation' says {kept}")
    return keep


# ----------------------------------------------------------------------------------------------
# Reading for training


@dataclass(frozen=True)
class ChunkRef:
    """One generation chunk of the merged set: its shard and its local/global sample ranges."""

    shard: int
    path: Path
    chunk: int
    lo: int  # local range inside the shard store
    hi: int
    start: int  # global range (= sample ids)
    stop: int


class CouplingReader:
    """Whole-chunk access to a merged coupling set described by a manifest.

    verify (default True): check every chunk read against the digests recorded when it was
    written (`couplings.read_checked_chunk`); False only to measure what the check costs."""

    def __init__(self, manifest_path, *, verify: bool = True):
        self.manifest_path = Path(manifest_path)
        self.verify = bool(verify)
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CouplingStoreError(f"{manifest_path}: cannot read coupling manifest: {e}") from e
        fmt = self.manifest.get("format")
        if fmt != MANIFEST_FORMAT and fmt not in _MANIFEST_FORMATS_WITHOUT_MASK:
            raise CouplingStoreError(f"{manifest_path}: format {fmt!r}, expected {MANIFEST_FORMAT!r}")
        base = self.manifest_path.parent
        self.shard_paths = [base / s["path"] for s in self.manifest["shards"]]
        opened = [self._open_checked(k) for k in range(len(self.shard_paths))]
        self._arrays = [chunk_arrays(p, g) for p, (g, _) in zip(self.shard_paths, opened)]
        self._attrs = [attrs for _, attrs in opened]
        # [num_chunks, len(DATA_ARRAYS)] per shard: a few bytes per chunk, read once
        self._digests = [read_digests(p, a["digest"]) if self.verify else None
                         for p, a in zip(self.shard_paths, self._arrays)]
        self.chunks = [ref for k in range(len(self.shard_paths)) for ref in self._shard_chunks(k)]
        self.threshold: float | None = self.manifest["truncation"]["threshold"]
        # Keep flags of every coupling by sample id; None: recomputed from each chunk read.
        self.keep: np.ndarray | None = None
        if fmt == MANIFEST_FORMAT:
            self.keep = decode_keep_mask(self.manifest, self.manifest_path)
        else:
            log.warning("%s: manifest format %r stores no keep mask, so every chunk read recomputes its couplings' "
                        "distances (same result, more CPU); rerun the couplings_merge rule to store the mask",
                        self.manifest_path, fmt)

    def _open_checked(self, k: int) -> tuple[zarr.Group, dict[str, Any]]:
        """Open shard k and check it is the one the manifest lists at that place (cheap: attributes
        only): same fingerprint and index, and shard k of the set with the range the merge recorded
        -- the ranges of the manifest's entries tile the set in order -- so a shard moved to another
        entry's path (paths swapped) is refused, naming both paths."""
        path, entries, manifest = self.shard_paths[k], self.manifest["shards"], self.manifest_path
        group, attrs = open_shard(path)
        if attrs["fingerprint_hash"] != self.manifest["fingerprint_hash"] or attrs["index_hash"] != self.manifest["index_hash"]:
            raise FingerprintMismatchError(f"{path}: fingerprint/index differ from manifest {manifest}")
        start = entries[k - 1]["range"][1] if k else 0
        if entries[k]["range"][0] != start or (k == len(entries) - 1 and entries[k]["range"][1] != self.total):
            raise CouplingStoreError(f"{manifest}: shard entries do not tile samples 0..{self.total - 1} in order "
                                     f"(entry {k}, {path}, has range {entries[k]['range']}); {_remerge(manifest)}")
        where = (attrs["shard"], attrs["num_shards"], attrs["range"], attrs["count"])
        if where == (k, len(entries), entries[k]["range"], entries[k]["count"]):
            return group, attrs
        owner = next((self.shard_paths[m] for m, e in enumerate(entries) if e["range"] == attrs["range"]), None)
        if owner is not None:
            raise CouplingStoreError(
                f"{manifest}: shard paths swapped: {path} holds shard {attrs['shard']} (samples {attrs['range']}), "
                f"which the manifest lists at {owner}, but the manifest lists {path} for samples "
                f"{entries[k]['range']}. Put the shard stores back where the merge found them, or {_remerge(manifest)}"
            )
        raise CouplingStoreError(f"{path}: shard {attrs['shard']} of {attrs['num_shards']}, range {attrs['range']}, "
                                 f"but manifest {manifest} lists it as shard {k} of {len(entries)}, range "
                                 f"{entries[k]['range']}; {_remerge(manifest)}")

    def _shard_chunks(self, k: int) -> list[ChunkRef]:
        entry, chunk = self.manifest["shards"][k], self.manifest["chunk"]
        start = entry["range"][0]
        bounds = [(lo, min(lo + chunk, entry["count"])) for lo in range(0, entry["count"], chunk)]
        return [ChunkRef(k, self.shard_paths[k], i, lo, hi, start + lo, start + hi) for i, (lo, hi) in enumerate(bounds)]

    def __len__(self) -> int:
        """Number of chunks."""
        return len(self.chunks)

    @property
    def total(self) -> int:
        return int(self.manifest["total"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    def read_chunk(self, i: int, *, distance: bool = True) -> dict[str, np.ndarray]:
        """Chunk i as numpy: noise, endpoint, label, sample_id, keep (truncation) and, with
        `distance`, each coupling's distance. distance=False (training) takes keep from the
        manifest's stored mask, skipping the float64 pass over the data (recomputed only for a
        manifest without a mask).

        With `verify`, CorruptChunkError if the chunk no longer matches the digests recorded when
        it was written (changed bytes, a missing or unreadable chunk file)."""
        ref = self.chunks[i]
        arrays = self._arrays[ref.shard]
        if self.verify:
            out = read_checked_chunk(ref.path, arrays, self._attrs[ref.shard], ref.chunk,
                                     self._digests[ref.shard][ref.chunk])
        else:
            out = {name: read_array(ref.path, arrays[name], ref.lo, ref.hi) for name in DATA_ARRAYS}
        if not distance and self.keep is not None:
            out["keep"] = self.keep[ref.start : ref.stop].copy()
            return out
        d = coupling_distance(out["noise"], out["endpoint"])
        out["keep"] = np.ones(len(out["label"]), bool) if self.threshold is None else d <= self.threshold
        if distance:
            out["distance"] = d
        return out

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        """Raise FingerprintMismatchError unless `expected` equals the fingerprint the set was made with."""
        if fingerprint_hash(expected) != self.manifest["fingerprint_hash"]:
            raise FingerprintMismatchError(
                f"{self.manifest_path}: couplings were made with a different fingerprint "
                f"(keys differ: {diff_keys(json.loads(json.dumps(expected)), self.fingerprint)})"
            )

    def verify_checksums(self) -> None:
        """Recompute every shard's store checksum (reads all data) and compare with the manifest."""
        for path, entry in zip(self.shard_paths, self.manifest["shards"]):
            if store_checksum(path) != entry["checksum"]:
                raise CouplingStoreError(f"{path}: checksum differs from manifest {self.manifest_path}: store modified")


def _remerge(manifest_path) -> str:
    """The end of every error about a manifest that does not describe its shards."""
    return f"rerun the couplings_merge rule (`--forcerun {manifest_path}`) to rewrite the manifest"


def open_couplings(manifest_path, *, verify: bool = True) -> CouplingReader:
    """Open a merged coupling set for reading (see CouplingReader)."""
    return CouplingReader(manifest_path, verify=verify)
