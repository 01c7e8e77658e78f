"""CouplingStream: exact batch sizes, whole-chunk reads, epoch coverage across ranks, truncation,
determinism, resume from state, fingerprint and geometry errors, corrupt or missing chunk files;
`open_stream` (a training process's stream: fresh, resumed, relaid out)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from remeanflow import coupling_set as CS
from remeanflow import couplings as C
from remeanflow.loader import CouplingStream, first_unstarted_epoch, keyed_seed, open_stream

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import FINGERPRINT, make_couplings  # noqa: E402

N, CHUNK = 96, 8  # 12 chunks


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same couplings under three truncations: 90% kept, 30% kept (heavy), none."""
    root = tmp_path_factory.mktemp("loader")
    normal = make_couplings(root / "q90", num_samples=N, chunk=CHUNK, quantile=0.9)
    heavy = make_couplings(root / "q30", num_samples=N, chunk=CHUNK, quantile=0.3)
    return {"normal": normal, "heavy": heavy}


def kept_ids(manifest) -> np.ndarray:
    reader = CS.open_couplings(manifest)
    parts = [reader.read_chunk(i) for i in range(len(reader))]
    return np.concatenate([p["sample_id"][p["keep"]] for p in parts])


def samples_per_epoch(stream: CouplingStream, epoch: int) -> int:
    """Kept samples this rank sees in `epoch` (from the keep masks of its chunks)."""
    return sum(int(stream.reader.read_chunk(int(i))["keep"].sum()) for i in stream.epoch_chunks(epoch))


def take_ids(stream: CouplingStream, n_batches: int) -> list[np.ndarray]:
    return [next(stream)["sample_id"].numpy() for _ in range(n_batches)]


class CountingReader:
    """Wraps a CouplingReader's read_chunk to count calls and record which chunks were read."""

    def __init__(self, manifest):
        self.reader = CS.open_couplings(manifest)
        self.calls: list[int] = []
        inner = self.reader.read_chunk

        def counted(i, **kw):
            self.calls.append(i)
            return inner(i, **kw)

        self.reader.read_chunk = counted


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, batch", [("normal", 7), ("heavy", 5), ("heavy", 40)])
def test_batches_always_exactly_batch_size(sets, which, batch):
    stream = CouplingStream(sets[which], batch_size=batch, seed=1, window_chunks=2)
    for _ in range(30):
        b = next(stream)
        assert b["x"].shape == (batch, 2, 8, 8) and b["noise"].shape == (batch, 2, 8, 8)
        assert b["x"].dtype == torch.float32 and b["noise"].dtype == torch.float32  # noise stored as float16
        assert b["label"].shape == (batch,) and b["label"].dtype == torch.int64
        assert b["sample_id"].dtype == torch.int64
        assert 0 < b["kept_fraction"] <= 1


def test_batch_content_matches_store(sets):
    """x/noise/label of a batch are the stored endpoint/noise/label of its sample ids."""
    reader = CS.open_couplings(sets["normal"])
    parts = [reader.read_chunk(i) for i in range(len(reader))]
    by_id = {name: np.concatenate([p[name] for p in parts]) for name in ("endpoint", "noise", "label", "sample_id")}
    assert np.array_equal(by_id["sample_id"], np.arange(N))
    b = next(CouplingStream(sets["normal"], batch_size=16, seed=2))
    ids = b["sample_id"].numpy()
    np.testing.assert_array_equal(b["x"].numpy(), by_id["endpoint"][ids])
    np.testing.assert_array_equal(b["noise"].numpy(), by_id["noise"][ids].astype(np.float32))
    np.testing.assert_array_equal(b["label"].numpy(), by_id["label"][ids])


def test_reads_whole_chunks_once_per_epoch(sets):
    counting = CountingReader(sets["normal"])
    stream = CouplingStream(counting.reader, batch_size=4, seed=0, window_chunks=3)
    per_epoch = samples_per_epoch(stream, 0)
    counting.calls.clear()
    consumed = 0
    while consumed + 4 <= per_epoch:  # stay inside epoch 0
        next(stream)
        consumed += 4
    # Every chunk read exactly once (whole-chunk reads only: the reader has no other access).
    assert sorted(counting.calls) == list(range(N // CHUNK))
    assert counting.calls == [int(i) for i in stream.epoch_chunks(0)]  # in the permuted order


@pytest.mark.parametrize("which", ["normal", "heavy"])
def test_two_ranks_partition_the_kept_samples_each_epoch(sets, which):
    """Ranks 0 and 1 of a world of 2 read disjoint chunks whose kept samples together are
    all kept samples, each exactly once per epoch; truncated samples never appear."""
    expected = np.sort(kept_ids(sets[which]))
    all_ids = set(range(N))
    for epoch in range(2):
        seen = []
        for rank in range(2):
            stream = CouplingStream(sets[which], batch_size=1, rank=rank, world_size=2, seed=4, window_chunks=2)
            skip = sum(samples_per_epoch(stream, e) for e in range(epoch))
            n = samples_per_epoch(stream, epoch)
            ids = np.concatenate(take_ids(stream, skip + n))[skip:]
            assert len(set(ids.tolist())) == n, "a sample repeated within an epoch"
            seen.append(ids)
        assert not set(seen[0]) & set(seen[1]), "ranks overlap"
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), expected)
        assert not set(np.concatenate(seen)) & (all_ids - set(expected.tolist())), "a dropped sample appeared"


@pytest.mark.parametrize("world, window_chunks, windows", [(1, 5, 3), (2, 4, 2)])
def test_an_epoch_whose_chunk_count_window_chunks_does_not_divide(sets, world, window_chunks, windows):
    """12 chunks: one rank in windows of 5 (5, 5, 2 chunks), or 6 chunks per rank in windows of 4
    (4, 2): the short last window ends the epoch, and every kept coupling is drawn exactly once."""
    assert (N // CHUNK // world) % window_chunks != 0
    expected = np.sort(kept_ids(sets["normal"]))
    for epoch in range(2):
        seen = []
        for rank in range(world):
            stream = CouplingStream(sets["normal"], batch_size=1, rank=rank, world_size=world, seed=4,
                                    window_chunks=window_chunks)
            assert stream.num_windows(epoch) == windows
            skip = sum(samples_per_epoch(stream, e) for e in range(epoch))
            n = samples_per_epoch(stream, epoch)
            seen.append(np.concatenate(take_ids(stream, skip + n))[skip:])
            state = stream.state_dict()
            assert (state["epoch"], state["window"], state["offset"]) == (epoch + 1, 0, 0)
        ids = np.concatenate(seen)
        assert len(set(ids.tolist())) == len(ids), "a coupling drawn twice in one epoch"
        np.testing.assert_array_equal(np.sort(ids), expected)


def test_heavy_truncation_never_yields_dropped_samples(sets):
    kept = set(kept_ids(sets["heavy"]).tolist())
    assert len(kept) < 0.4 * N
    stream = CouplingStream(sets["heavy"], batch_size=9, seed=0, window_chunks=1)
    ids = np.concatenate(take_ids(stream, 20))  # several epochs
    assert set(ids.tolist()) <= kept
    assert set(ids.tolist()) == kept


def test_truncate_false_uses_every_coupling(sets):
    stream = CouplingStream(sets["heavy"], batch_size=N, seed=0, truncate=False)
    b = next(stream)
    assert sorted(b["sample_id"].tolist()) == list(range(N)) and b["kept_fraction"] == 1.0


def test_kept_fraction_is_that_of_the_windows_read(sets):
    reader = CS.open_couplings(sets["heavy"])
    stream = CouplingStream(reader, batch_size=1, seed=0, window_chunks=2)
    b = next(stream)
    first = [reader.read_chunk(int(i))["keep"] for i in stream.epoch_chunks(0)[:2]]
    assert b["kept_fraction"] == pytest.approx(np.concatenate(first).mean())


def test_deterministic_and_seed_dependent(sets):
    a = take_ids(CouplingStream(sets["normal"], batch_size=6, seed=5, window_chunks=2), 25)
    b = take_ids(CouplingStream(sets["normal"], batch_size=6, seed=5, window_chunks=2), 25)
    c = take_ids(CouplingStream(sets["normal"], batch_size=6, seed=6, window_chunks=2), 25)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # consecutive epochs use different orders
    s = CouplingStream(sets["normal"], batch_size=6, seed=5)
    assert not np.array_equal(s.epoch_chunks(0), s.epoch_chunks(1))


@pytest.mark.parametrize("which, batch, stop", [("normal", 7, 3), ("normal", 7, 13), ("heavy", 5, 4), ("heavy", 5, 9)])
def test_resume_from_state_equals_continuing(sets, which, batch, stop):
    kw = dict(batch_size=batch, rank=1, world_size=2, seed=8, window_chunks=2)
    ref = CouplingStream(sets[which], **kw)
    expected = take_ids(ref, stop + 12)
    first = CouplingStream(sets[which], **kw)
    take_ids(first, stop)
    state = first.state_dict()
    assert set(state) >= {"epoch", "window", "offset", "seed", "rank", "world_size", "batch_size"}
    resumed = CouplingStream(sets[which], state=state, **kw)
    got = take_ids(resumed, 12)
    assert all(np.array_equal(x, y) for x, y in zip(got, expected[stop:]))


def test_first_unstarted_epoch():
    state = {"format": "remeanflow.coupling-stream/1"}  # only the format and position fields matter here

    def at(epoch, window, offset):
        return dict(state, epoch=epoch, window=window, offset=offset)

    assert first_unstarted_epoch([at(3, 0, 0), at(2, 1, 0)]) == 3  # (3, 0, 0) drew nothing from epoch 3
    assert first_unstarted_epoch([at(3, 0, 0), at(3, 0, 2)]) == 4
    assert first_unstarted_epoch([at(0, 2, 0)]) == 1
    with pytest.raises(ValueError, match="no saved stream states"):
        first_unstarted_epoch([])
    with pytest.raises(ValueError, match=r"state\['offset'\] must be an integer >= 0"):
        first_unstarted_epoch([at(1, 0, -1)])


@pytest.mark.parametrize("which", ["normal", "heavy"])
def test_relayout_starts_at_the_first_unstarted_epoch_and_covers_it(sets, which):
    """2 ranks x 3 per batch -> 1 rank x 6: the new stream starts at the first window of the first
    epoch neither old rank had started, and reads every kept coupling of it exactly once."""
    kw = dict(seed=8, window_chunks=2)
    old = [CouplingStream(sets[which], batch_size=3, rank=r, world_size=2, **kw) for r in range(2)]
    for s, n in zip(old, (5, 9)):
        take_ids(s, n)
    states = [s.state_dict() for s in old]
    epoch = max(s["epoch"] + (1 if s["window"] or s["offset"] else 0) for s in states)
    new = CouplingStream(sets[which], batch_size=1, relayout=states, **kw)
    assert (new.epoch, new.window, new.offset) == (epoch, 0, 0) and epoch >= 1
    ids = np.concatenate(take_ids(new, samples_per_epoch(new, epoch)))
    np.testing.assert_array_equal(np.sort(ids), np.sort(kept_ids(sets[which])))
    assert new.epoch == epoch + 1


def test_open_stream_fresh_resumed_and_relaid_out(sets, caplog):
    """A training process's stream: the global batch split over `world`; the saved position of its
    rank under the same layout; under another layout the first unstarted epoch, with a warning
    from rank 0 only."""
    reader = CS.open_couplings(sets["normal"])
    kw = dict(batch_size=6, seed=8, window_chunks=2)
    old = [open_stream(reader, rank=r, world=2, **kw) for r in range(2)]
    assert [(s.batch_size, s.rank, s.world_size) for s in old] == [(3, 0, 2), (3, 1, 2)]
    for s, n in zip(old, (5, 9)):
        take_ids(s, n)
    saved = [s.state_dict() for s in old]
    with caplog.at_level(logging.WARNING, logger="remeanflow.loader"):
        again = open_stream(reader, rank=1, world=2, saved_streams=saved, ckpt_path="ckpt-00000007.pt", step=7, **kw)
        assert again.state_dict() == saved[1] and not caplog.records
        one = open_stream(reader, rank=0, world=1, saved_streams=saved, ckpt_path="ckpt-00000007.pt", step=7, **kw)
    epoch = first_unstarted_epoch(saved)
    assert (one.batch_size, one.epoch, one.window, one.offset) == (6, epoch, 0, 0)
    (record,) = caplog.records
    assert record.getMessage().startswith("ckpt-00000007.pt: saved by 2 process(es), resumed by 1. Model, EMA, "
                                          "optimiser and step 7 carry over exactly and the global batch stays 6 (6 per")
    assert f"every process starts at epoch {epoch} (saved ranks were at epochs" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="remeanflow.loader"):
        three = [open_stream(reader, rank=r, world=3, saved_streams=saved, step=7, **kw) for r in range(3)]
    assert len(caplog.records) == 1 and [s.batch_size for s in three] == [2, 2, 2]


def test_relayout_refuses_what_is_not_one_whole_layout_of_the_same_stream(sets):
    kw = dict(seed=8, window_chunks=2)
    old = [CouplingStream(sets["normal"], batch_size=3, rank=r, world_size=2, **kw) for r in range(2)]
    states = [s.state_dict() for s in old]
    with pytest.raises(ValueError, match=r"ranks 0..0 of one layout, got ranks \[1\]"):
        CouplingStream(sets["normal"], batch_size=6, relayout=states[1:], **kw)
    with pytest.raises(ValueError, match="different batch sizes"):
        CouplingStream(sets["normal"], batch_size=6, relayout=[states[0], dict(states[1], batch_size=4)], **kw)
    with pytest.raises(ValueError, match="seed: saved 8, now 9"):
        CouplingStream(sets["normal"], batch_size=6, relayout=states, **dict(kw, seed=9))
    with pytest.raises(ValueError, match="threshold"):
        CouplingStream(sets["heavy"], batch_size=6, relayout=states, **kw)
    with pytest.raises(ValueError, match="either state .* or relayout"):
        CouplingStream(sets["normal"], batch_size=3, rank=0, world_size=2, state=states[0], relayout=states, **kw)
    with pytest.raises(ValueError, match="every rank"):
        CouplingStream(sets["normal"], batch_size=6, relayout=[], **kw)


def test_resume_refuses_other_settings(sets):
    s = CouplingStream(sets["normal"], batch_size=4, seed=1)
    next(s)
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 4, now 5"):
        CouplingStream(sets["normal"], batch_size=5, seed=1, state=state)
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        CouplingStream(sets["normal"], batch_size=4, seed=1, world_size=2, state=state)
    with pytest.raises(ValueError, match="threshold"):
        CouplingStream(sets["heavy"], batch_size=4, seed=1, state=state)


def test_fingerprint_subset_check(sets):
    CouplingStream(sets["normal"], batch_size=4, expected_fingerprint={"seed": 5, "sampler": {"steps": 3}})
    with pytest.raises(C.FingerprintMismatchError, match=r"'teacher_sha256' is 'a+' in the couplings but 'b+'"):
        CouplingStream(sets["normal"], batch_size=4, expected_fingerprint={"teacher_sha256": "b" * 64})
    with pytest.raises(C.FingerprintMismatchError, match=r"'guidance' is '<missing>'"):
        CouplingStream(sets["normal"], batch_size=4, expected_fingerprint={"guidance": 2.1})
    assert FINGERPRINT["seed"] == 5


def test_more_ranks_than_chunks_is_an_error(sets):
    with pytest.raises(ValueError, match="12 chunk.*13 processes.*rank 3 would get no chunks"):
        CouplingStream(sets["normal"], batch_size=4, rank=3, world_size=13)


def test_bad_arguments(sets):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        CouplingStream(sets["normal"], batch_size=0)
    with pytest.raises(ValueError, match="rank must be an integer in \\[0, 2\\)"):
        CouplingStream(sets["normal"], batch_size=4, rank=2, world_size=2)
    with pytest.raises(C.CouplingStoreError, match="cannot read coupling manifest"):
        CouplingStream(Path(sets["normal"]).with_name("missing.json"), batch_size=4)


def test_rank_with_only_dropped_chunks_is_an_error(tmp_path):
    """A fixed threshold below every distance but one: some rank's epoch is entirely dropped."""
    reader_set = make_couplings(tmp_path / "c", num_samples=32, chunk=8, num_shards=1, quantile=None)
    d = np.concatenate([CS.open_couplings(reader_set).read_chunk(i)["distance"] for i in range(4)])
    manifest = make_couplings(tmp_path / "fixed", num_samples=32, chunk=8, num_shards=1, quantile=None,
                              fixed_threshold=float(d.min()))
    errors = 0
    for rank in range(4):
        stream = CouplingStream(manifest, batch_size=1, rank=rank, world_size=4, seed=0)
        try:
            next(stream)
        except ValueError as e:
            assert f"rank {rank} of 4 got no kept couplings in epoch 0" in str(e)
            errors += 1
    assert errors == 3


def test_keyed_seed_depends_on_every_key():
    assert keyed_seed(1, 2, 3) == keyed_seed(1, 2, 3)
    assert len({keyed_seed(1, 2, 3), keyed_seed(1, 3, 2), keyed_seed(1, 2), keyed_seed(1, 2, 3, 0)}) == 4
    assert 0 <= keyed_seed(2**63, 7) < 2**63


# ----------------------------------------------------------------------------------------------
# Chunk digests on the training path: every chunk the stream reads is verified.


def _chunk_file(manifest: Path, shard: int, array: str, i: int) -> Path:
    return manifest.parent.joinpath(f"shard-{shard:05d}.zarr", array, "c", str(i), "0", "0", "0")


def _drain_until_error(stream: CouplingStream, max_batches: int = 100) -> tuple[Exception, set[int]]:
    """Draw batches until the stream raises; returns the error and every sample id drawn before it."""
    seen: set[int] = set()
    for _ in range(max_batches):
        try:
            seen.update(next(stream)["sample_id"].tolist())
        except C.CouplingStoreError as e:
            return e, seen
    raise AssertionError("the stream never reached the corrupt chunk")


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_stream_refuses_a_corrupt_or_missing_chunk(tmp_path, damage):
    manifest = make_couplings(tmp_path / "c", num_samples=32, chunk=8, num_shards=2)
    path = _chunk_file(manifest, 1, "endpoint", 1)  # sample ids 24..31
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        for k in (100, 1000, 1500):
            raw[k] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    stream = CouplingStream(manifest, batch_size=8, seed=2, window_chunks=1)
    err, seen = _drain_until_error(stream)
    assert isinstance(err, C.CorruptChunkError)
    shard = manifest.parent / "shard-00001.zarr"
    assert str(err).startswith(f"{shard}: corrupt coupling chunk(s) [1]") and "chunk 1: endpoint" in str(err)
    assert ("is missing" in str(err)) == (damage == "delete")
    assert "must be regenerated" in str(err)
    assert not seen & set(range(24, 32)), "no sample of the bad chunk reaches a batch"


def test_stream_batches_do_not_depend_on_verification(sets):
    on = CouplingStream(CS.open_couplings(sets["normal"]), batch_size=7, seed=1, window_chunks=2)
    off = CouplingStream(CS.open_couplings(sets["normal"], verify=False), batch_size=7, seed=1, window_chunks=2)
    for _ in range(20):
        a, b = next(on), next(off)
        assert all(torch.equal(a[k], b[k]) for k in ("x", "noise", "label", "sample_id"))


def test_stream_benchmark_runs_and_reports_both_modes(tmp_path):
    """benchmarks/coupling_stream.py in its smallest configuration (no timing is asserted): the three
    modes (position-bound digests, bytes-only digests as before, no verification)."""
    import json

    from conftest import load_benchmark

    bench = load_benchmark("coupling_stream")
    out = tmp_path / "bench.json"
    assert bench.main(["--num-samples", "64", "--chunk", "8", "--shape", "2", "8", "8", "--batch", "8",
                       "--window-chunks", "2", "--repeats", "1", "--epochs", "1", "--workdir", str(tmp_path),
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["format"] == "remeanflow.coupling-stream-bench/1"
    assert set(result["modes"]) == {"on", "bytes", "off"} and set(result["overhead_percent"]) == {"cpu", "user", "wall"}
    assert set(result["bytes_overhead_percent"]) == {"cpu", "user", "wall"}
    assert {"added_cpu_percent", "added_cpu_percent_bytes", "added_cpu_percent_by_position"} <= result.keys()
    assert result["position_us_per_chunk"] > 0 and result["position_percent_of_stream_cpu"] > 0
    from remeanflow import couplings

    assert couplings.position_header.__name__ == "position_header", "the bytes-only mode's patch was undone"
    assert all(m["wall"]["best_samples_per_s"] > 0 for m in result["modes"].values())
    assert not list(tmp_path.glob("coupling-stream-*")), "the store is made in a temporary folder and removed"
