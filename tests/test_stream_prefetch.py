"""The keep mask stored at merge and the background prefetch of the training stream.

Stored mask: the flags in the manifest are the ones recomputed from the data; a stream over a
manifest without them (format /1) yields the very same batches, with a warning; a damaged mask is
refused naming the file, the key and what to rerun. Prefetch: bit-identical batches and positions
with prefetch on and off (fresh, resumed mid-window, two ranks, heavy truncation), reads off the
step loop's thread and never more than one window ahead, a corrupt chunk raising the same error in
the step loop, and no thread left behind."""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from remeanflow import coupling_set as CS
from remeanflow import couplings as C
from remeanflow.loader import CouplingStream, open_stream

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import make_couplings  # noqa: E402

N, CHUNK = 96, 8  # 12 chunks
KEYS = ("x", "noise", "label", "sample_id")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    return {"normal": make_couplings(root / "q90", num_samples=N, chunk=CHUNK, quantile=0.9),
            "heavy": make_couplings(root / "q30", num_samples=N, chunk=CHUNK, quantile=0.3)}


def as_format_1(manifest: Path, name: str = "manifest-v1.json") -> Path:
    """The manifest as written before the mask was stored (beside it: shard paths are relative)."""
    m = json.loads(manifest.read_text())
    del m["keep_mask"]
    m["format"] = "remeanflow.couplings.manifest/1"
    out = manifest.with_name(name)
    out.write_text(json.dumps(m, indent=1))
    return out


def assert_same_batches(a: CouplingStream, b: CouplingStream, n: int) -> None:
    for k in range(n):
        x, y = next(a), next(b)
        assert all(torch.equal(x[key], y[key]) for key in KEYS), f"batch {k} differs"
        assert x["kept_fraction"] == y["kept_fraction"]
        assert a.state_dict() == b.state_dict()


def window_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("coupling-window-")]


# ----------------------------------------------------------------------------------------------
# The stored keep mask


@pytest.mark.parametrize("truncation", [dict(quantile=0.9), dict(quantile=0.3), dict(quantile=None),
                                        dict(quantile=None, fixed_threshold=0.3)])
def test_stored_mask_is_the_recomputed_one(tmp_path, truncation):
    manifest = make_couplings(tmp_path / "c", num_samples=40, chunk=8, **truncation)
    reader = CS.open_couplings(manifest)
    parts = [reader.read_chunk(i) for i in range(len(reader))]
    recomputed = np.concatenate([p["keep"] for p in parts])
    d = np.concatenate([p["distance"] for p in parts])
    if reader.threshold is not None:
        np.testing.assert_array_equal(recomputed, d <= reader.threshold)
    np.testing.assert_array_equal(reader.keep, recomputed)
    assert reader.keep.dtype == bool and reader.keep.sum() == reader.manifest["truncation"]["kept"]
    entry = reader.manifest["keep_mask"]
    assert reader.manifest["format"] == CS.MANIFEST_FORMAT and entry["count"] == 40
    for i, p in enumerate(parts):
        fast = reader.read_chunk(i, distance=False)
        assert "distance" not in fast
        np.testing.assert_array_equal(fast["keep"], p["keep"])
        assert all(np.array_equal(fast[k], p[k]) for k in ("noise", "endpoint", "label", "sample_id"))


@pytest.mark.parametrize("which, batch, world", [("normal", 7, 1), ("heavy", 5, 2)])
def test_stream_is_bit_identical_with_the_stored_mask_and_with_recomputation(sets, caplog, which, batch, world):
    """Several epochs; the format-/1 manifest makes the reader recompute every distance."""
    old_manifest = as_format_1(sets[which])
    with caplog.at_level(logging.WARNING, logger="remeanflow.coupling_set"):
        old_reader = CS.open_couplings(old_manifest)
    assert old_reader.keep is None
    (record,) = caplog.records
    assert record.getMessage().startswith(f"{old_manifest}: manifest format 'remeanflow.couplings.manifest/1' "
                                          "stores no keep mask")
    assert "rerun the couplings_merge rule" in record.getMessage()
    for rank in range(world):
        kw = dict(batch_size=batch, rank=rank, world_size=world, seed=3, window_chunks=2)
        assert_same_batches(CouplingStream(sets[which], **kw), CouplingStream(old_reader, **kw), 40)


def _rewrite(manifest: Path, change) -> Path:
    m = json.loads(manifest.read_text())
    change(m)
    out = manifest.with_name("manifest-bad.json")
    out.write_text(json.dumps(m))
    return out


def _flip_first_kept_bit(m):
    keep = CS.decode_keep_mask(m, "x")
    keep[np.flatnonzero(keep)[0]] = False
    keep[np.flatnonzero(~keep)[-1]] = True  # same count: only the sha256 can tell
    m["keep_mask"]["data"] = CS.encode_keep_mask(keep)["data"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("keep_mask"), "is missing or not an object"),
    (_flip_first_kept_bit, "does not match its sha256"),
    (lambda m: m["keep_mask"].update(data="not base64!"), "has no readable 'data'"),
    (lambda m: m["keep_mask"].update(encoding="npy"), "has encoding 'npy'"),
    (lambda m: m["truncation"].update(kept=m["truncation"]["kept"] - 1), "but 'truncation' says"),
    (lambda m: m.update(keep_mask=CS.encode_keep_mask(np.ones(m["total"] - 8, bool))), "flags in"),
])
def test_a_damaged_mask_is_refused_naming_file_key_and_remedy(sets, change, message):
    bad = _rewrite(sets["normal"], change)
    with pytest.raises(C.CouplingStoreError) as err:
        CS.open_couplings(bad)
    text = str(err.value)
    assert text.startswith(f"{bad}: key 'keep_mask' ") and message in text
    assert text.endswith("rerun the couplings_merge rule (coupling_set.merge_shards) to rewrite the manifest")


# ----------------------------------------------------------------------------------------------
# Prefetch


@pytest.mark.parametrize("which, batch, window_chunks, world", [
    ("normal", 7, 2, 1), ("normal", 40, 1, 1), ("heavy", 5, 2, 2), ("heavy", 3, 3, 1)])
def test_prefetch_yields_the_synchronous_batches(sets, which, batch, window_chunks, world):
    for rank in range(world):
        kw = dict(batch_size=batch, rank=rank, world_size=world, seed=11, window_chunks=window_chunks)
        with CouplingStream(sets[which], prefetch=True, **kw) as on:
            assert_same_batches(CouplingStream(sets[which], **kw), on, 45)  # several epochs


@pytest.mark.parametrize("stop", [1, 4, 9, 17])
def test_prefetch_resumes_where_the_synchronous_stream_would(sets, stop):
    """A state saved mid-window (by either mode) resumes to the same batches in both modes."""
    kw = dict(batch_size=5, rank=1, world_size=2, seed=8, window_chunks=2)
    with CouplingStream(sets["heavy"], prefetch=True, **kw) as first:
        [next(first) for _ in range(stop)]
        state = first.state_dict()
        sync = CouplingStream(sets["heavy"], **kw)
        [next(sync) for _ in range(stop)]
        assert sync.state_dict() == state
        # resumed with prefetch = the uninterrupted synchronous stream
        with CouplingStream(sets["heavy"], state=state, prefetch=True, **kw) as resumed:
            assert_same_batches(sync, resumed, 20)
        # resumed without = the uninterrupted prefetching stream
        assert_same_batches(first, CouplingStream(sets["heavy"], state=state, **kw), 20)


def test_open_stream_prefetches_by_default(sets):
    reader = CS.open_couplings(sets["normal"])
    kw = dict(batch_size=6, seed=8, window_chunks=2, rank=0, world=1)
    with open_stream(reader, **kw) as on:
        off = open_stream(reader, prefetch=False, **kw)
        assert on.prefetch and not off.prefetch
        assert_same_batches(off, on, 20)


class RecordingReader:
    """A real reader whose read_chunk also records (thread name, chunk) of every call."""

    def __init__(self, manifest):
        self.reader = CS.open_couplings(manifest)
        self.calls: list[tuple[str, int]] = []
        inner = self.reader.read_chunk

        def recorded(i, **kw):
            self.calls.append((threading.current_thread().name, i))
            return inner(i, **kw)

        self.reader.read_chunk = recorded


def test_reads_happen_off_the_step_loop_and_at_most_one_window_ahead(sets):
    rec = RecordingReader(sets["normal"])
    stream = CouplingStream(rec.reader, batch_size=4, seed=2, window_chunks=2, prefetch=True)
    where = {}  # chunk -> (epoch, window) over the first epochs
    for epoch in range(6):
        for k, chunk in enumerate(stream.epoch_chunks(epoch)):
            where.setdefault(epoch, {})[int(chunk)] = (epoch, k // 2)
    for _ in range(60):
        next(stream)
        stream._pending.join()  # the read ahead has done all it will do before the next step
        current = (stream.epoch, stream.window)  # the window the next batch starts in
        ahead = stream._next_position(*current) if stream._samples is not None else current
        # replay: the calls so far, attributed to windows in order of the stream's sequence
        windows, pos = [], (0, 0)
        for _, chunk in rec.calls:
            while where[pos[0]].get(int(chunk)) != pos:
                pos = stream._next_position(*pos)
            windows.append(pos)
        assert max(windows) <= ahead, f"read window {max(windows)} while the stream is at {current}"
        assert max(windows) == ahead, "the next window is read ahead"
    stream.close()
    assert all(name.startswith("coupling-window-") for name, _ in rec.calls), "a read on the step loop's thread"
    assert not window_threads()


def test_a_corrupt_chunk_raises_the_same_error_in_the_step_loop(tmp_path):
    manifest = make_couplings(tmp_path / "c", num_samples=32, chunk=8, num_shards=2)
    path = manifest.parent.joinpath("shard-00001.zarr", "endpoint", "c", "1", "0", "0", "0")  # ids 24..31
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))

    def drain(stream):
        batches = []
        for _ in range(20):
            try:
                batches.append(next(stream))
            except C.CorruptChunkError as e:
                return batches, e
        raise AssertionError("the stream never reached the corrupt chunk")

    kw = dict(batch_size=8, seed=2, window_chunks=1)
    sync_batches, sync_err = drain(CouplingStream(manifest, **kw))
    outcome = {}
    stream = CouplingStream(manifest, prefetch=True, **kw)
    # In a thread with a deadline: a swallowed background error would hang the step loop.
    worker = threading.Thread(target=lambda: outcome.update(result=drain(stream)))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the step loop hangs on a failed background read"
    batches, err = outcome["result"]
    assert type(err) is type(sync_err) and str(err) == str(sync_err)
    assert str(err).startswith(f"{manifest.parent / 'shard-00001.zarr'}: corrupt coupling chunk(s) [1]")
    assert len(batches) == len(sync_batches)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, sync_batches) for k in KEYS)
    with pytest.raises(C.CorruptChunkError):  # and again on the next call, as the synchronous stream does
        next(stream)
    stream.close()
    assert not window_threads()


def test_no_thread_is_left_behind(sets):
    # closed by a with block left on an exception, mid-window
    with pytest.raises(RuntimeError, match="step failed"):
        with CouplingStream(sets["normal"], batch_size=3, seed=1, window_chunks=2, prefetch=True) as stream:
            next(stream)
            raise RuntimeError("step failed")
    assert not window_threads() and stream._pending is None
    # after close() the stream goes on synchronously, with the same batches
    kw = dict(batch_size=3, seed=1, window_chunks=2)
    ref = CouplingStream(sets["normal"], **kw)
    stream = CouplingStream(sets["normal"], prefetch=True, **kw)
    assert_same_batches(ref, stream, 5)
    stream.close()
    assert_same_batches(ref, stream, 30)
    assert not window_threads()
    # never closed (training drops the stream): the one read in flight ends by itself
    stream = CouplingStream(sets["normal"], prefetch=True, **kw)
    next(stream)
    del stream
    for t in window_threads():
        t.join(timeout=60)
    assert not window_threads()


def test_prefetch_benchmark_runs_and_reports(tmp_path):
    """benchmarks/stream_prefetch.py in its smallest configuration (no timing is asserted)."""
    from conftest import load_benchmark

    bench = load_benchmark("stream_prefetch")
    out = tmp_path / "bench.json"
    assert bench.main(["--num-samples", "64", "--chunk", "8", "--shape", "2", "8", "8", "--batch", "8",
                       "--window-chunks", "2", "--repeats", "1", "--epochs", "1", "--step-ms", "1",
                       "--workdir", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["format"] == "remeanflow.stream-prefetch-bench/1"
    assert set(result["modes"]) == {"recompute", "stored", "prefetch"}
    assert all(m["median"]["stall_s"] >= 0 for m in result["modes"].values())
    assert result["identical_batches"] is True
    assert not list(tmp_path.glob("stream-prefetch-*")), "the store is made in a temporary folder and removed"
