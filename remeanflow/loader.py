"""Deterministic, resumable per-process batches of rectified couplings for MeanFlow training.

Couplings are i.i.d., so the order only has to look random at the scale of a batch; what matters
is reading the Zarr stores in whole chunks (per-sample random reads are ~30x slower,
docs/architecture.md)
and never letting DDP processes disagree on their batch size. `CouplingStream` therefore shuffles
in two levels, each a pure function of its position:

1. epoch e: the list of chunks is permuted by a generator keyed by (seed, e); rank r of a world
   of W processes takes the permuted chunks r, r + W, r + 2W, ... (all ranks of one epoch
   together read every chunk exactly once);
2. consecutive groups of `window_chunks` of a rank's chunks form *windows*; the KEPT samples of a
   window (the manifest's global distance truncation, Re-MeanFlow section 4; docs/method.md,
   "MeanFlow loss" step 1) are shuffled by a generator keyed by (seed, e, r, window) -- a shuffle
   buffer whose content and order depend on nothing but its position.

Batches are the next `batch_size` samples of this per-rank sequence, crossing window and epoch
boundaries, so every batch holds exactly `batch_size` samples however many couplings truncation
dropped from a window (with the official per-batch threshold the batch size varies and DDP
processes can desync). The stream position is (epoch, window, offset into the window);
`state_dict()` returns it and `CouplingStream(..., state=...)` resumes there by recomputing that
window and skipping `offset` samples -- no RNG state is stored.

Another layout. A position means other data once the number of ranks (or the per-rank batch)
changes: rank r of W reads other chunks than rank r of W'. `CouplingStream(..., relayout=states)`
takes the saved states of *all* ranks of the old layout and starts at the first window of
`first_unstarted_epoch(states)`, the first epoch none of them drew a sample from. Within every
epoch each kept coupling is still drawn exactly once across ranks; the price is that the
couplings the old ranks had not yet drawn from their epochs in progress are skipped: the rest of
each old rank's epoch, plus any epoch it lagged behind the furthest rank (ranks keep different
numbers of couplings per epoch, so they drift apart slowly) -- usually less than one epoch.

`open_stream` opens the stream of one training process: fresh, at its saved position, or under
another layout (with a warning, since the run then stops being bit-identical to an uninterrupted
one).

Prefetch. A window is a pure function of its position (epoch, window), and the position that follows
it is known in advance, so with `prefetch=True` (what `open_stream` gives training) a background
thread reads the next window while the batches of the current one are drawn: reading the Zarr
chunks, checking their digests and the numpy copies release the GIL, so the step loop no longer
stalls for a whole window read at every window boundary (benchmarks/stream_prefetch.py). At most one
window is read ahead (memory: the current window plus one), and the batches are exactly those of
the synchronous stream -- same windows, same shuffles, same positions and `state_dict()`. An error
of the background read (e.g. `couplings.CorruptChunkError`) is raised by the `next()` that needs
that window, the same exception with the same message, after the batches before it; an error of a
window never needed is never raised. `close()` (or leaving a `with` block) waits for the read in
flight and stops prefetching; without it the thread ends by itself once its one window is read.

The keep flags come from the mask the merge stored in the manifest (`coupling_set`), not from
recomputing every coupling's distance; a manifest written before the mask still works, recomputing
them (`coupling_set.CouplingReader`, with a warning).

Every chunk a window reads is checked against the digests recorded when it was written, which bind
its position (shard, chunk index, sample ids) as well as its bytes, and its sample ids against the
ones the reflow index assigns to that position (`coupling_set.CouplingReader.read_chunk`): a
changed, missing or unreadable chunk file, or a chunk replayed, swapped or moved from another
position, raises `couplings.CorruptChunkError` (naming the shard, the chunk and how to regenerate
it) before any of its samples reaches a batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .coupling_set import CouplingReader, open_couplings
from .couplings import FingerprintMismatchError
from .misc import require_int

log = logging.getLogger(__name__)

STATE_FORMAT = "remeanflow.coupling-stream/1"
# Purposes of the keyed generators, so that e.g. (seed, e) for chunk order and the window keys
# can never coincide.
_CHUNK_ORDER, _WINDOW_SHUFFLE = 1, 2
# Stream settings that must agree when a state is resumed (the data order depends on them).
_STATE_KEYS = (
    "seed", "rank", "world_size", "batch_size", "window_chunks", "truncate", "num_chunks", "total", "threshold",
    "fingerprint_hash",
)
# What only fixes a rank's place in a layout; the other keys must agree even across layouts.
_LAYOUT_KEYS = ("rank", "world_size", "batch_size")


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the integer `keys` (blake2b of their uint64 bytes).

    Every random draw of training is keyed like this (e.g. by (seed, step, rank)), so a resumed run
    needs no generator state: it recomputes the generator of the position it resumes at.
    """
    data = np.asarray(keys, dtype=np.uint64).astype("<u8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def check_fingerprint_subset(reader: CouplingReader, expected: dict[str, Any]) -> None:
    """Raise FingerprintMismatchError unless the manifest's fingerprint agrees on every key of
    `expected` (only those keys are compared; tuples and lists compare equal, as in JSON)."""
    actual = reader.fingerprint
    for key, want in json.loads(json.dumps(expected)).items():
        have = actual.get(key, "<missing>")
        if have != want:
            raise FingerprintMismatchError(
                f"{reader.manifest_path}: fingerprint key {key!r} is {have!r} in the couplings but {want!r} was "
                "expected; these couplings were made with a different teacher or configuration"
            )


def _check_state_format(state: Any) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a CouplingStream state (format {STATE_FORMAT!r} expected): {state!r:.200}")
    for k in ("epoch", "window", "offset"):
        require_int(f"state[{k!r}]", state.get(k), 0)


@dataclass(frozen=True)
class _Window:
    """The kept samples of one window, shuffled, and its kept / total coupling counts."""

    samples: dict[str, np.ndarray]
    kept: int
    total: int


class _WindowRead:
    """One window being read by a background thread; `result()` returns it or raises its error."""

    def __init__(self, key: tuple[int, int], read: Callable[[int, int], _Window]):
        self.key = key
        self._window: _Window | None = None
        self._error: BaseException | None = None
        # Not a daemon: a read in flight at interpreter exit finishes instead of being frozen mid-call
        # inside zarr/numpy; it lasts one window read at most.
        self._thread = threading.Thread(target=self._run, args=(read,), name=f"coupling-window-{key[0]}-{key[1]}")
        self._thread.start()

    def _run(self, read: Callable[[int, int], _Window]) -> None:
        try:
            self._window = read(*self.key)
        except BaseException as e:  # handed to the step loop, which raises it; nothing is lost here
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> _Window:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._window is not None
        return self._window


def first_unstarted_epoch(states: list[dict[str, Any]]) -> int:
    """The first epoch from which none of the saved rank positions `states` has drawn a sample.

    A rank at (epoch e, window 0, offset 0) has drawn nothing from e (a finished epoch moves the
    position to the start of the next one); any other position has started its epoch.
    """
    if not states:
        raise ValueError("no saved stream states")
    for state in states:
        _check_state_format(state)
    return max(int(s["epoch"]) + int(s["window"] > 0 or s["offset"] > 0) for s in states)


class CouplingStream(Iterator[dict[str, Any]]):
    """Infinite per-process batches {x, noise, label, sample_id, kept_fraction} (see module docstring).

    x (the teacher endpoint) and noise are float32 CPU tensors [batch_size, C, H, W] (stored
    float16 is widened); label and sample_id are int64 [batch_size]. kept_fraction is the fraction
    of couplings kept by truncation in the windows this batch drew samples from.

    manifest: path of a coupling manifest, or an open `CouplingReader`. truncate=False ignores the
    manifest's truncation (every coupling is used). expected_fingerprint: a subset of the
    fingerprint the couplings must have been made with. state: a `state_dict()` of a stream with
    the same settings, to resume. relayout: instead, the states of every rank of a layout with
    another world size or per-rank batch (module docstring, "Another layout"). prefetch: read the
    next window in a background thread (module docstring, "Prefetch"); the batches are the same.
    """

    def __init__(
        self,
        manifest,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        window_chunks: int = 4,
        truncate: bool = True,
        state: dict[str, Any] | None = None,
        relayout: list[dict[str, Any]] | None = None,
        expected_fingerprint: dict[str, Any] | None = None,
        prefetch: bool = False,
    ):
        require_int("batch_size", batch_size, 1)
        require_int("world_size", world_size, 1)
        require_int("rank", rank, 0, world_size)
        require_int("seed", seed, 0)
        require_int("window_chunks", window_chunks, 1)
        self.reader = manifest if isinstance(manifest, CouplingReader) else open_couplings(manifest)
        if expected_fingerprint is not None:
            check_fingerprint_subset(self.reader, expected_fingerprint)
        if truncate and self.reader.manifest["truncation"]["kept"] == 0:
            raise ValueError(f"{self.reader.manifest_path}: truncation keeps none of the {self.reader.total} couplings")
        if world_size > len(self.reader):
            raise ValueError(
                f"{self.reader.manifest_path}: {len(self.reader)} chunk(s) for {world_size} processes: rank "
                f"{rank} would get no chunks; use fewer processes or couplings made with a smaller chunk"
            )
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.window_chunks, self.truncate = int(seed), int(window_chunks), bool(truncate)
        self.epoch, self.window, self.offset = 0, 0, 0
        if state is not None and relayout is not None:
            raise ValueError("pass either state (same layout) or relayout (another layout), not both")
        if state is not None:
            self._check_state(state)
            self.epoch, self.window, self.offset = int(state["epoch"]), int(state["window"]), int(state["offset"])
        if relayout is not None:
            self._check_relayout(relayout)
            self.epoch = first_unstarted_epoch(relayout)
        self._samples: dict[str, np.ndarray] | None = None  # the current window, shuffled
        self._window_kept = self._window_total = 0
        # {epoch: this rank's chunks}, replaced whole (never mutated) so that the prefetch thread and
        # the step loop can both use it without a lock; at most two epochs.
        self._chunk_cache: dict[int, np.ndarray] = {}
        # True while every window read in this epoch, from its first, had no kept sample.
        self._epoch_empty = self.window == 0 and self.offset == 0
        self.prefetch = bool(prefetch)
        self._pending: _WindowRead | None = None
        if self.prefetch:  # the first window is read while the caller sets up the rest of training
            self._pending = _WindowRead((self.epoch, self.window), self._read_window)

    # -- position ------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
            "window_chunks": self.window_chunks, "truncate": self.truncate, "num_chunks": len(self.reader),
            "total": self.reader.total, "threshold": self.reader.threshold,
            "fingerprint_hash": self.reader.manifest["fingerprint_hash"],
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned, plus the settings it is only valid for."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "window": self.window, "offset": self.offset,
                **self._settings()}

    def _check_state(self, state: dict[str, Any], keys: tuple[str, ...] = _STATE_KEYS) -> None:
        """Refuse a state saved by a stream with other settings (its position would mean other data)."""
        _check_state_format(state)
        mine = self._settings()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"cannot resume the coupling stream of {self.reader.manifest_path}: " + "; ".join(diff))

    def _check_relayout(self, states: list[dict[str, Any]]) -> None:
        """The states must be one whole layout (ranks 0..W-1 of one world size and batch) of a
        stream that differs from this one only in layout: otherwise the epoch they reached
        would not say which couplings are still unseen."""
        if not isinstance(states, (list, tuple)) or not states:
            raise ValueError(f"relayout needs the saved states of every rank, got {states!r:.200}")
        for state in states:
            self._check_state(state, tuple(k for k in _STATE_KEYS if k not in _LAYOUT_KEYS))
        world = len(states)
        ranks = [s.get("rank") for s in states]
        if ranks != list(range(world)) or any(s.get("world_size") != world for s in states):
            raise ValueError(f"relayout needs the states of ranks 0..{world - 1} of one layout, got ranks {ranks} "
                             f"with world sizes {[s.get('world_size') for s in states]}")
        batches = [s.get("batch_size") for s in states]
        if len(set(batches)) != 1:
            raise ValueError(f"relayout: the saved ranks have different batch sizes {batches}")

    def epoch_chunks(self, epoch: int) -> np.ndarray:
        """This rank's chunk indices for `epoch`: every world_size-th entry of the permuted list."""
        cache = self._chunk_cache
        chunks = cache.get(epoch)
        if chunks is None:  # cached: a permutation of all chunks is not free for big sets
            order = np.random.default_rng(keyed_seed(_CHUNK_ORDER, self.seed, epoch)).permutation(len(self.reader))
            chunks = order[self.rank :: self.world_size]
            # the step loop's epoch and the prefetched one
            self._chunk_cache = {**dict(list(cache.items())[-1:]), epoch: chunks}
        return chunks

    def num_windows(self, epoch: int) -> int:
        return -(-len(self.epoch_chunks(epoch)) // self.window_chunks)

    # -- data ----------------------------------------------------------------------------------

    def _read_window(self, epoch: int, window: int) -> _Window:
        """Read the whole chunks of window (epoch, window), keep the kept samples, shuffle them.

        A pure function of the position (the prefetch thread runs it): it changes no state."""
        lo = window * self.window_chunks
        chunks = self.epoch_chunks(epoch)[lo : lo + self.window_chunks]
        parts = [self.reader.read_chunk(int(i), distance=False) for i in chunks]
        keep = np.concatenate([p["keep"] if self.truncate else np.ones_like(p["keep"]) for p in parts])
        key = keyed_seed(_WINDOW_SHUFFLE, self.seed, epoch, self.rank, window)
        order = np.flatnonzero(keep)[np.random.default_rng(key).permutation(int(keep.sum()))]
        names = ("endpoint", "noise", "label", "sample_id")
        return _Window({name: np.concatenate([p[name] for p in parts])[order] for name in names}, len(order), len(keep))

    def _next_position(self, epoch: int, window: int) -> tuple[int, int]:
        """The window read after (epoch, window), as `_advance_window` moves."""
        return (epoch, window + 1) if window + 1 < self.num_windows(epoch) else (epoch + 1, 0)

    def _load_window(self) -> None:
        """Make window (epoch, window) current: the prefetched one if it is that window, else read
        now; then start reading the one after it."""
        key = (self.epoch, self.window)
        pending, self._pending = self._pending, None
        if pending is not None and pending.key == key:
            window = pending.result()  # raises the background read's error here, in the step loop
        else:
            if pending is not None:  # only if the position was moved by hand: the read is of no use
                pending.join()
            window = self._read_window(*key)
        self._samples, self._window_kept, self._window_total = window.samples, window.kept, window.total
        self._epoch_empty &= self._window_kept == 0
        if self.prefetch:
            self._pending = _WindowRead(self._next_position(*key), self._read_window)

    def close(self) -> None:
        """Stop prefetching: wait for the background read in flight (dropping it and any error it
        met). The stream stays usable and reads synchronously from here on."""
        self.prefetch = False
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()

    def __enter__(self) -> CouplingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance_window(self) -> None:
        """Move to the next window, or to the first window of the next epoch.

        A rank whose chunks of a whole epoch were all dropped by truncation would loop forever
        looking for a sample: that is an error (seen only when the epoch was read from its start).
        """
        self.window, self.offset, self._samples = self.window + 1, 0, None
        if self.window < self.num_windows(self.epoch):
            return
        if self._epoch_empty:
            raise ValueError(
                f"{self.reader.manifest_path}: rank {self.rank} of {self.world_size} got no kept couplings in "
                f"epoch {self.epoch} (truncation dropped all of its chunks); use fewer processes or more data"
            )
        self.epoch, self.window, self._epoch_empty = self.epoch + 1, 0, True

    def __next__(self) -> dict[str, Any]:
        """The next `batch_size` samples of this rank's sequence."""
        pieces: list[dict[str, np.ndarray]] = []
        need, kept, total = self.batch_size, 0, 0
        while need:
            if self._samples is None:
                self._load_window()
            take = min(need, self._window_kept - self.offset)
            if take > 0:
                pieces.append({k: v[self.offset : self.offset + take] for k, v in self._samples.items()})
                kept, total = kept + self._window_kept, total + self._window_total
                self.offset += take
                need -= take
            if self.offset >= self._window_kept:
                self._advance_window()
        return self._to_batch(pieces, kept / total)

    @staticmethod
    def _to_batch(pieces: list[dict[str, np.ndarray]], kept_fraction: float) -> dict[str, Any]:
        def cat(name: str) -> np.ndarray:
            return np.concatenate([p[name] for p in pieces])

        return {
            "x": torch.from_numpy(cat("endpoint").astype(np.float32)),
            "noise": torch.from_numpy(cat("noise").astype(np.float32)),
            "label": torch.from_numpy(cat("label").astype(np.int64)),
            "sample_id": torch.from_numpy(cat("sample_id").astype(np.int64)),
            "kept_fraction": float(kept_fraction),
        }



def open_stream(
    reader: CouplingReader,
    *,
    batch_size: int,
    seed: int,
    window_chunks: int,
    rank: int,
    world: int,
    saved_streams: list[dict[str, Any]] | None = None,
    ckpt_path=None,
    step: int | None = None,
    prefetch: bool = True,
) -> CouplingStream:
    """The coupling stream of training process `rank` of `world`: fresh, at its saved position, or
    -- when the saved positions were written by another number of processes -- at the start of the
    first epoch no saved rank had started (module docstring, "Another layout").

    batch_size: the GLOBAL batch (each process draws batch_size / world). saved_streams: the
    `state_dict()` of every rank of the checkpoint resumed (None: a fresh stream); ckpt_path and
    step only name that checkpoint in the warning that rank 0 logs when the layout changed.
    prefetch: read the next window in the background (`CouplingStream`; the batches are the same).
    """
    kw = dict(batch_size=batch_size // world, rank=rank, world_size=world, seed=seed, window_chunks=window_chunks,
              prefetch=prefetch)
    if saved_streams is None:
        return CouplingStream(reader, **kw)
    saved = saved_streams
    if len(saved) == world:
        return CouplingStream(reader, **kw, state=saved[rank])
    stream = CouplingStream(reader, **kw, relayout=saved)
    if rank == 0:
        log.warning(
            "%s: saved by %d process(es), resumed by %d. Model, EMA, optimiser and step %d carry over exactly and the "
            "global batch stays %d (%d per process); the coupling stream cannot continue bit-exactly under another "
            "layout, so every process starts at epoch %d (saved ranks were at epochs %s): the couplings not yet drawn "
            "from the epochs in progress are skipped and the run is no longer bit-identical to an uninterrupted one.",
            ckpt_path, len(saved), world, step, batch_size, batch_size // world,
            first_unstarted_epoch(saved), [s["epoch"] for s in saved],
        )
    return stream
