"""Sharded coupling stores: geometry, shard/rank invariance, kill-and-resume, merge checks, reader,
chunk digests (corrupt or missing chunk files, stores without digests, repair); the coupling job's
precision and fast path (`coupling_job`)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from remeanflow import coupling_set as CS
from remeanflow import couplings as C
from remeanflow import reflow_index as R

sys.path.insert(0, str(Path(__file__).parent))
from couplings_worker import SHARD_KW, toy_generate  # noqa: E402

ARRAYS = ("noise", "endpoint", "label", "sample_id", "digest", "done")


@pytest.fixture
def index(tmp_path):
    """60 samples, 4 classes (the tiny net's): 15 chunks of SHARD_KW's 4."""
    R.build_index(tmp_path / "index.zarr", mode="random", num_samples=60, num_classes=4, seed=0)
    return tmp_path / "index.zarr"


def make_shards(root: Path, index: Path, num_shards: int, generate=toy_generate, world_size: int = 1, **overrides):
    """Create and fully generate every shard (ranks run one after another); returns their paths."""
    kw = dict(SHARD_KW, **overrides)
    paths = [root / f"shard-{k:05d}.zarr" for k in range(num_shards)]
    for k, p in enumerate(paths):
        C.create_shard_store(p, index_store=index, shard=k, num_shards=num_shards, **kw)
        for rank in range(world_size):
            C.generate_shard(p, generate, rank=rank, world_size=world_size, progress=False)
    return paths


def read_arrays(path: Path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][...] for name in ARRAYS}


def assert_stores_equal(a: Path, b: Path):
    x, y = read_arrays(a), read_arrays(b)
    for name in ARRAYS:
        assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name


def read_all(manifest: Path) -> dict:
    """Every coupling of a merged set, concatenated in chunk order."""
    reader = CS.open_couplings(manifest)
    chunks = [reader.read_chunk(i) for i in range(len(reader))]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class Counting:
    """generate_fn wrapper that counts calls (and can fail on demand)."""

    def __init__(self, fn=toy_generate):
        self.fn, self.calls = fn, 0

    def __call__(self, noise, labels):
        self.calls += 1
        return self.fn(noise, labels)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, shards, chunk", [(60, 3, 4), (61, 4, 4), (10, 1, 16), (1000, 7, 32), (33, 9, 3)])
def test_shard_ranges_tile_with_chunk_alignment(n, shards, chunk):
    ranges = [C.shard_range(n, s, shards, chunk) for s in range(shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % chunk == 0 for start, _ in ranges)
    assert all(start < stop for start, stop in ranges)
    sizes = [-(-(stop - start) // chunk) for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1  # balanced in whole chunks


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one chunk"):
        C.shard_range(8, 0, 3, 4)
    with pytest.raises(ValueError, match="shard must be"):
        C.shard_range(8, 2, 2, 4)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        C.shard_range(8, 0, 1, 0)


def test_store_layout_one_chunk_per_batch(tmp_path, index):
    (path,) = make_shards(tmp_path, index, 1)
    group = zarr.open_group(str(path), mode="r")
    assert group["noise"].chunks == (4, 2, 4, 4) and group["endpoint"].chunks == (4, 2, 4, 4)
    assert group["label"].chunks == (4,) and group["sample_id"].chunks == (4,) and group["done"].chunks == (1,)
    assert group["digest"].chunks == (1, 4) and group["digest"].shape == (15, 4) and group["digest"].dtype == np.uint64
    assert all(group[n].shards is None for n in ARRAYS), "no sharding codec: one object per batch"
    assert group["noise"].dtype == np.float16 and group["label"].dtype == np.int32
    attrs = dict(group.attrs)
    assert attrs["fingerprint"] == SHARD_KW["fingerprint"]
    assert attrs["fingerprint_hash"] == C.fingerprint_hash(SHARD_KW["fingerprint"])
    assert attrs["range"] == [0, 60] and attrs["index_hash"] == R.load_index(index).index_hash
    # stored noise is the standard normal n (rounded to float16), not n * sigma_max
    ids = group["sample_id"][:4]
    from remeanflow.sampling import per_sample_noise

    np.testing.assert_array_equal(group["noise"][:4], per_sample_noise(7, ids, (2, 4, 4)).half().numpy())
    report = C.verify_shard(path, index_store=index, check_noise=True)
    assert report["count"] == 60 and sum(report["class_counts"]) == 60
    # digest[i] is the digest (default: XXH3) of chunk i of each data array as stored, after the
    # sha256 of its position: the store's identity, the chunk index and its sample ids
    import xxhash

    assert C.DEFAULT_DIGEST == "xxh3_64" and C.DEFAULT_DIGEST in C.DIGEST_ALGORITHMS
    assert attrs["digest"] == {"algorithm": C.DEFAULT_DIGEST, "of": C.DIGEST_OF,
                               "arrays": ["noise", "endpoint", "label", "sample_id"]}
    assert attrs["format"] == "remeanflow.couplings.shard/3"
    for i in (0, 14):
        position = {"fingerprint_hash": attrs["fingerprint_hash"], "index_hash": attrs["index_hash"], "seed": 7,
                    "shard": 0, "num_shards": 1, "chunk": i, "sample_ids": [4 * i, 4 * i + 4]}
        assert C.chunk_position(attrs, i) == position
        for k, name in enumerate(C.DATA_ARRAYS):
            header = hashlib.sha256(json.dumps({**position, "array": name}, sort_keys=True,
                                               separators=(",", ":")).encode()).digest()
            data = np.ascontiguousarray(group[name][4 * i : 4 * i + 4]).tobytes()
            assert group["digest"][i, k] == xxhash.xxh3_64_intdigest(header + data), (i, name)
    raw = (path / "endpoint" / "c" / "3" / "0" / "0" / "0").read_bytes()  # uncompressed: the file's own bytes
    assert group["digest"][3, 1] == xxhash.xxh3_64_intdigest(C.position_header(attrs, 3, "endpoint") + raw)
    crc = C.digest_fn("zlib.crc32")  # the stdlib alternative: CRC-32 of the same header + bytes
    assert crc(b"head", raw) == __import__("zlib").crc32(b"head" + raw)


def test_create_is_idempotent_and_never_overwrites(tmp_path, index):
    path = tmp_path / "s.zarr"
    C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **SHARD_KW)
    C.generate_shard(path, toy_generate, rank=0, world_size=3, progress=False)  # a third of the chunks
    before = read_arrays(path)
    kw = dict(SHARD_KW, fingerprint=dict(SHARD_KW["fingerprint"]))  # equal content, new object
    C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **kw)  # resume: reuse
    assert_equal = [np.array_equal(before[n], a) for n, a in read_arrays(path).items()]
    assert all(assert_equal) and before["done"].sum() == 5
    for change, key in ((dict(fingerprint={"teacher_sha256": "other"}), "fingerprint"), (dict(seed=8), "seed"),
                        (dict(chunk=5), "chunk")):
        with pytest.raises(C.FingerprintMismatchError, match=key):
            C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **dict(SHARD_KW, **change))
    assert np.array_equal(read_arrays(path)["done"], before["done"])
    (tmp_path / "junk").mkdir()
    with pytest.raises(C.CouplingStoreError, match="not a readable"):
        C.create_shard_store(tmp_path / "junk", index_store=index, shard=0, num_shards=1, **SHARD_KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.zarr", "junk", "s.zarr"], "temporary left behind"


def tiny_teacher_generate():
    """A real (tiny, random) EDM2 net through the real Heun sampler, 2 steps."""
    from remeanflow import networks, sampling

    torch.manual_seed(0)
    net = networks.build("tiny").eval()  # 2 x 8 x 8, 4 classes
    return lambda noise, labels: sampling.edm_heun(net, noise, labels, num_steps=2)


@pytest.fixture
def one_thread():
    """Tiny batches run far faster single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["toy", "tiny_net"])
def test_couplings_identical_for_any_sharding_and_ranks(tmp_path, index, which, one_thread):
    # layout name: shards x ranks per shard; the real net is slow on CPU, so it gets fewer, bigger chunks
    if which == "toy":
        generate, kw = toy_generate, {}
        layouts = {"1x1": (1, 1), "3x1": (3, 1), "1x2": (1, 2), "2x3": (2, 3)}
    else:
        generate, kw = tiny_teacher_generate(), dict(shape=(2, 8, 8), chunk=12)
        layouts = {"1x1": (1, 1), "2x3": (2, 3)}
    merged, digests = {}, {}
    for name, (shards, world) in layouts.items():
        (tmp_path / name).mkdir()
        paths = make_shards(tmp_path / name, index, shards, generate, world_size=world, **kw)
        manifest = CS.merge_shards(paths, tmp_path / name / "manifest.json", index_store=index, progress=False)
        merged[name] = (read_all(tmp_path / name / "manifest.json"), manifest)
        digests[name] = np.concatenate([read_arrays(p)["digest"] for p in paths])
    # the chunk digests depend on the chunks and their positions (shard of num_shards, chunk index):
    # the same for any number of writer ranks, other under another sharding
    assert digests["1x1"].shape[1] == 4 and digests["1x1"].all()
    for name, d in digests.items():
        same_sharding = layouts[name][0] == 1
        assert np.array_equal(d, digests["1x1"]) == same_sharding, name
    ref, ref_manifest = merged["1x1"]
    np.testing.assert_array_equal(ref["sample_id"], np.arange(60))
    assert np.isfinite(ref["endpoint"]).all() and not np.allclose(ref["endpoint"], 0)
    for name, (data, manifest) in merged.items():
        for key in ("noise", "endpoint", "label", "sample_id", "distance", "keep"):
            assert np.array_equal(data[key], ref[key]), (name, key)
        assert manifest["truncation"] == ref_manifest["truncation"]
        assert manifest["distance_stats"] == ref_manifest["distance_stats"]


def reference_store(tmp_path: Path, index: Path) -> Path:
    """The single shard generated in-process without interruption."""
    reference = tmp_path / "reference.zarr"
    C.create_shard_store(reference, index_store=index, shard=0, num_shards=1, **SHARD_KW)
    C.generate_shard(reference, toy_generate, progress=False)
    return reference


def start_worker(store: Path, index: Path, *args: str) -> subprocess.Popen:
    worker = Path(__file__).with_name("couplings_worker.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(worker), str(store), str(index), *args], env=env)


def test_two_rank_processes_fill_one_shard_concurrently(tmp_path, index):
    reference = reference_store(tmp_path, index)
    store = tmp_path / "two_ranks.zarr"
    # both ranks also race to create the store, as accelerate-launched ranks would
    procs = [start_worker(store, index, "--sleep", "0.02", "--rank", str(r), "--world-size", "2") for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    C.verify_shard(store, index_store=index)
    assert C.store_checksum(store) == C.store_checksum(reference)
    assert not list(tmp_path.glob(".two_ranks.zarr.tmp*")), "losing creator must clean up"


def test_kill_and_resume_regenerates_only_missing_chunks(tmp_path, index):
    reference = reference_store(tmp_path, index)
    store = tmp_path / "killed.zarr"
    proc = start_worker(store, index, "--sleep", "0.25")
    try:
        deadline = time.monotonic() + 60
        while not (store.exists() and C.completion_mask(store).sum() >= 3):
            assert proc.poll() is None, "worker exited before it was killed"
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    missing = np.flatnonzero(~C.completion_mask(store))
    assert 0 < missing.size < 15
    with pytest.raises(C.IncompleteShardError) as err:
        C.verify_shard(store)
    assert err.value.missing == missing.tolist()

    counting, finished = Counting(), []
    C.create_shard_store(store, index_store=index, shard=0, num_shards=1, **SHARD_KW)  # as a rerun would
    stats = C.generate_shard(store, counting, progress=False, on_chunk_done=finished.append)
    assert counting.calls == missing.size == stats["chunks_generated"]
    assert finished == missing.tolist()
    C.verify_shard(store, index_store=index, check_noise=True)
    assert_stores_equal(store, reference)
    assert C.store_checksum(store) == C.store_checksum(reference)  # bit for bit, metadata included


def test_torn_chunk_is_regenerated(tmp_path, index):
    (path,) = make_shards(tmp_path, index, 1)
    reference = read_arrays(path)
    group = zarr.open_group(str(path), mode="r+")
    group["endpoint"][8:12] = 123.0  # data of chunk 2 written (wrongly) ...
    group["done"][2] = False  # ... but the process died before marking it
    with pytest.raises(C.IncompleteShardError, match=r"\[2\]"):
        C.verify_shard(path)
    counting = Counting()
    C.generate_shard(path, counting, progress=False)
    assert counting.calls == 1
    for name, arr in read_arrays(path).items():
        assert np.array_equal(arr, reference[name]), name


def test_nonfinite_endpoint_is_an_error_and_chunk_stays_unmarked(tmp_path, index):
    path = tmp_path / "s.zarr"
    C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **SHARD_KW)
    poison = C.chunk_noise(7, np.array([9]), (2, 4, 4), "float16")  # sample 9 lives in chunk 2

    def nan_for_sample_9(noise, labels):
        out = toy_generate(noise, labels)
        out[(noise == torch.from_numpy(poison.astype(np.float32))).flatten(1).all(1)] = float("nan")
        return out

    with pytest.raises(C.NonFiniteEndpointError, match=r"chunk 2: .*sample ids \[9\]"):
        C.generate_shard(path, nan_for_sample_9, progress=False)
    group = zarr.open_group(str(path), mode="r")
    assert group["done"][...].tolist() == [True, True] + [False] * 13
    assert not group["endpoint"][8:12].any(), "rejected chunk must not be written"


def test_crash_between_data_writes_leaves_chunk_unmarked(tmp_path, index, monkeypatch):
    path = tmp_path / "s.zarr"
    C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **SHARD_KW)
    real_setitem = zarr.Array.__setitem__

    def die_on_endpoint(self, key, value):
        if self.basename == "endpoint":
            raise KeyboardInterrupt("killed mid-chunk")  # after noise was written, before endpoint
        real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", die_on_endpoint)
    with pytest.raises(KeyboardInterrupt):
        C.generate_shard(path, toy_generate, progress=False)
    monkeypatch.undo()
    group = zarr.open_group(str(path), mode="r")
    assert group["noise"][0:4].any() and not C.completion_mask(path).any()


def test_float16_overflow_counts_as_nonfinite(tmp_path, index):
    path = tmp_path / "s.zarr"
    C.create_shard_store(path, index_store=index, shard=0, num_shards=1, **dict(SHARD_KW, endpoint_dtype="float16"))
    with pytest.raises(C.NonFiniteEndpointError, match="chunk 0"):
        C.generate_shard(path, lambda n, l: n * 1e5, progress=False)
    assert not C.completion_mask(path).any()


def test_merge_refuses_mismatched_or_overlapping_shards(tmp_path, index):
    (tmp_path / "good").mkdir(), (tmp_path / "other").mkdir()
    good = make_shards(tmp_path / "good", index, 3)
    other_fp = make_shards(tmp_path / "other", index, 3, fingerprint={"teacher_sha256": "x"})
    R.build_index(tmp_path / "index2.zarr", mode="random", num_samples=60, num_classes=4, seed=1)
    out = tmp_path / "m.json"
    with pytest.raises(C.FingerprintMismatchError, match=f"{other_fp[1]}.*teacher_sha256"):
        CS.merge_shards([good[0], other_fp[1], good[2]], out, index_store=index, progress=False)
    with pytest.raises(C.FingerprintMismatchError, match="cut from index"):
        CS.merge_shards(good, out, index_store=tmp_path / "index2.zarr", progress=False)
    shutil.copytree(good[1], tmp_path / "copy.zarr")
    with pytest.raises(C.CouplingStoreError, match="overlaps"):
        CS.merge_shards([*good, tmp_path / "copy.zarr"], out, index_store=index, progress=False)
    with pytest.raises(C.CouplingStoreError, match=r"gap before it: samples \[20, 40\)"):
        CS.merge_shards([good[0], good[2]], out, index_store=index, progress=False)
    with pytest.raises(C.CouplingStoreError, match="index has 60"):
        CS.merge_shards(good[:2], out, index_store=index, progress=False)
    zarr.open_group(str(good[2]), mode="r+")["done"][1] = False
    with pytest.raises(C.IncompleteShardError, match="shard-00002"):
        CS.merge_shards(good, out, index_store=index, progress=False)
    assert not out.exists(), "no manifest for a refused merge"


def test_truncation_drops_exactly_the_top_decile():
    d = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))
    t = CS.truncation(d, quantile=0.9, fixed_threshold=None)
    assert (t["kept"], t["dropped"], t["mode"]) == (90, 10, "quantile")
    assert set(d[d > t["threshold"]]) == set(np.arange(91.0, 101.0))
    fixed = CS.truncation(d, quantile=0.9, fixed_threshold=0.87 * 100)
    assert (fixed["mode"], fixed["kept"], fixed["quantile"]) == ("fixed", 87, None)
    none = CS.truncation(d, quantile=None, fixed_threshold=None)
    assert (none["kept"], none["threshold"]) == (100, None)


def test_merge_manifest_truncation_and_reader(tmp_path, index):
    paths = make_shards(tmp_path, index, 3)
    manifest = CS.merge_shards(paths, tmp_path / "m.json", index_store=index, histogram_bins=7, progress=False)
    data = read_all(tmp_path / "m.json")
    assert manifest["total"] == 60 and [s["count"] for s in manifest["shards"]] == [20, 20, 20]
    assert [s["path"] for s in manifest["shards"]] == [p.name for p in paths]  # relative to the manifest
    trunc = manifest["truncation"]
    assert (trunc["kept"], trunc["dropped"]) == (54, 6) and data["keep"].sum() == 54
    top = np.argsort(data["distance"])[-6:]
    assert set(np.flatnonzero(~data["keep"])) == set(top)
    expected = np.square(data["noise"].astype(np.float64) - data["endpoint"]).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(data["distance"], expected, rtol=1e-12)
    stats = manifest["distance_stats"]
    assert sum(stats["histogram"]["counts"]) == 60 and len(stats["histogram"]["edges"]) == 8
    assert stats["max"] == data["distance"].max() and stats["min"] == data["distance"].min()
    np.testing.assert_array_equal(data["label"], R.load_index(index).labels)

    reader = CS.open_couplings(tmp_path / "m.json")
    assert len(reader) == 15 and reader.chunks[5].path == paths[1] and reader.chunks[5].start == 20
    reader.check_fingerprint(dict(reversed(list(SHARD_KW["fingerprint"].items()))))  # order-insensitive
    with pytest.raises(C.FingerprintMismatchError, match="sampler"):
        reader.check_fingerprint(dict(SHARD_KW["fingerprint"], sampler={"steps": 32}))
    fixed = CS.merge_shards(paths, tmp_path / "f.json", index_store=index, fixed_threshold=0.3, progress=False)
    assert fixed["truncation"]["kept"] == int((data["distance"] <= 0.3).sum())


def test_checksum_changes_when_a_shard_is_modified(tmp_path, index):
    paths = make_shards(tmp_path, index, 3)
    before = CS.merge_shards(paths, tmp_path / "m.json", index_store=index, progress=False)
    assert [s["checksum"] for s in before["shards"]] == [C.store_checksum(p) for p in paths]
    reader = CS.open_couplings(tmp_path / "m.json")
    reader.verify_checksums()
    group = zarr.open_group(str(paths[1]), mode="r+")
    endpoint = group["endpoint"]
    endpoint[1, 0, 0, 0] = endpoint[1, 0, 0, 0] + 0.5  # sample id 21
    with pytest.raises(C.CouplingStoreError, match="shard-00001.*modified"):
        reader.verify_checksums()
    # the chunk digests catch the change too: the merge refuses the shard
    with pytest.raises(C.CorruptChunkError, match=r"shard-00001.zarr: corrupt coupling chunk\(s\) \[0\]"):
        CS.merge_shards(paths, tmp_path / "m.json", index_store=index, progress=False)
    # a change with a matching digest (as a buggy generator would make) changes only the tree checksum
    data = {n: group[n][0:4] for n in C.DATA_ARRAYS}
    group["digest"][0] = C.chunk_digest(data, dict(group.attrs), 0)
    after = CS.merge_shards(paths, tmp_path / "m.json", index_store=index, progress=False)
    changed = [a["checksum"] != b["checksum"] for a, b in zip(before["shards"], after["shards"])]
    assert changed == [False, True, False]


def _redigest(group, i: int) -> None:
    """Record chunk i's current data as its digest: a change the digests cannot see (a wrong write)."""
    data = {n: group[n][4 * i : 4 * i + 4] for n in C.DATA_ARRAYS}
    group["digest"][i] = C.chunk_digest(data, dict(group.attrs), i)


def test_verify_detects_tampered_labels_and_noise(tmp_path, index):
    (path,) = make_shards(tmp_path, index, 1)
    group = zarr.open_group(str(path), mode="r+")
    group["noise"][0, 0, 0, 0] = 0.5
    with pytest.raises(C.CorruptChunkError, match="chunk 0: noise data"):
        C.verify_shard(path)
    _redigest(group, 0)  # the other checks, behind a digest that matches
    C.verify_shard(path)
    with pytest.raises(C.CouplingStoreError, match="chunk 0: stored noise differs"):
        C.verify_shard(path, check_noise=True)
    group["label"][3] = (group["label"][3] + 1) % 4
    with pytest.raises(C.CorruptChunkError, match="chunk 0: label data"):
        C.verify_shard(path)
    _redigest(group, 0)
    with pytest.raises(C.CouplingStoreError, match="labels changed"):
        C.verify_shard(path)


def test_check_noise_on_a_shard_that_does_not_start_at_sample_zero(tmp_path, index):
    """The noise of chunk i is regenerated from its global sample ids (range[0] + local offset)."""
    paths = make_shards(tmp_path, index, 3)
    report = C.verify_shard(paths[1], index_store=index, check_noise=True)
    assert report["range"] == [20, 40] and report["count"] == 20
    group = zarr.open_group(str(paths[1]), mode="r+")
    noise = group["noise"][4:8]  # chunk 1: sample ids 24..27
    group["noise"][4:8] = C.chunk_noise(7, np.arange(4, 8), (2, 4, 4), "float16")  # the local ids' noise
    _redigest(group, 1)
    with pytest.raises(C.CouplingStoreError, match="chunk 1: stored noise differs from the noise of its sample ids"):
        C.verify_shard(paths[1], check_noise=True)
    group["noise"][4:8] = noise
    _redigest(group, 1)
    C.verify_shard(paths[1], check_noise=True)


def test_a_shard_whose_last_chunk_is_partial(tmp_path):
    """62 couplings in chunks of 4, 2 shards: shard 1 holds ids 32..61, its chunk 7 only 60 and 61."""
    R.build_index(tmp_path / "index.zarr", mode="random", num_samples=62, num_classes=4, seed=0)
    index = tmp_path / "index.zarr"
    paths = make_shards(tmp_path, index, 2)
    report = C.verify_shard(paths[1], index_store=index, check_noise=True)
    assert (report["range"], report["count"], report["num_chunks"]) == ([32, 62], 30, 8)
    assert sum(report["class_counts"]) == 30
    assert C.chunk_position(C.read_shard_attrs(paths[1]), 7)["sample_ids"] == [60, 62]
    CS.merge_shards(paths, tmp_path / "m.json", index_store=index, progress=False)
    reader = CS.open_couplings(tmp_path / "m.json")
    last = reader.chunks[-1]
    assert (len(reader), last.shard, last.chunk, last.lo, last.hi, last.start, last.stop) == (16, 1, 7, 28, 30, 60, 62)
    chunk = reader.read_chunk(len(reader) - 1)
    assert chunk["sample_id"].tolist() == [60, 61] and chunk["noise"].shape == (2, 2, 4, 4)
    assert reader.total == 62 and sum(ref.stop - ref.start for ref in reader.chunks) == 62
    # a full chunk replayed over the partial one (Zarr stores edge chunks whole) is refused
    for name in ("noise", "endpoint", "label", "sample_id", "digest"):
        chunk_path(paths[1], name, 7).write_bytes(chunk_path(paths[1], name, 0).read_bytes())
    with pytest.raises(C.CorruptChunkError, match=r"chunk 7: sample_id holds sample ids 32..33 \(those of chunk 0\) "
                                                  r"where the reflow index assigns 60..61"):
        CS.open_couplings(tmp_path / "m.json").read_chunk(len(reader) - 1)


@pytest.mark.parametrize("num_shards, refused", [(8, False), (9, True)])
def test_random_mode_refuses_more_shards_than_chunks(num_shards, refused):
    """60 couplings in chunks of 8 are 8 chunks: 8 shards fit, chunks + 1 are refused at validation,
    naming the key (before any job runs; `shard_range` would refuse it too)."""
    from remeanflow.settings import CouplingSettings

    kw = dict(index_mode="random", num_samples=60, batch=8, num_shards=num_shards)
    if not refused:
        CouplingSettings(**kw)
        assert C.shard_range(60, num_shards - 1, num_shards, 8) == (56, 60)
        return
    with pytest.raises(ValueError, match=r"couplings.num_shards = 9: more shards than the 8 generation chunks of 8 "
                                         r"\(60 couplings\)"):
        CouplingSettings(**kw)
    with pytest.raises(ValueError, match="every shard needs at least one chunk"):
        C.shard_range(60, 0, num_shards, 8)


# ----------------------------------------------------------------------------------------------
# Chunk digests: a changed, missing or unreadable chunk file is an error on every read that feeds
# training or the merge, never data; a store without digests is refused; repair regenerates only
# the bad chunks.


def chunk_path(store: Path, array: str, i: int) -> Path:
    """The file of Zarr chunk i of `array` in a shard store (data arrays are chunked along N only)."""
    nd = {"noise": 4, "endpoint": 4, "label": 1, "sample_id": 1, "digest": 2, "done": 1}[array]
    return store.joinpath(array, "c", str(i), *["0"] * (nd - 1))


def flip_bytes(path: Path, offsets=(100, 1000, 1500)) -> None:
    """Flip three bytes of a file in place (what the attack test did)."""
    raw = bytearray(path.read_bytes())
    for k in offsets:
        raw[k % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def merged(tmp_path, index):
    """3 shards of 5 chunks, merged: (shard paths, manifest path)."""
    paths = make_shards(tmp_path, index, 3)
    CS.merge_shards(paths, tmp_path / "m.json", index_store=index, progress=False)
    return paths, tmp_path / "m.json"


def test_good_store_reads_the_same_with_and_without_verification(merged):
    _, manifest = merged
    on, off = CS.open_couplings(manifest), CS.open_couplings(manifest, verify=False)
    assert on.verify and not off.verify
    for i in range(len(on)):
        a, b = on.read_chunk(i), off.read_chunk(i)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_flipped_bytes_in_a_chunk_file_are_an_error_naming_shard_and_chunk(merged, index):
    paths, manifest = merged
    reader = CS.open_couplings(manifest)
    flip_bytes(chunk_path(paths[1], "endpoint", 1))
    bad = next(k for k, ref in enumerate(reader.chunks) if ref.shard == 1 and ref.chunk == 1)
    with pytest.raises(C.CorruptChunkError) as err:
        reader.read_chunk(bad)
    msg = str(err.value)
    assert msg.startswith(f"{paths[1]}: corrupt coupling chunk(s) [1]")
    assert "endpoint data (file endpoint/c/1/0/0/0) differ from the digest" in msg
    assert "`couplings.unmark_corrupt_chunks` on it, then `couplings.generate_shard`" in msg  # not a workflow path
    assert err.value.path == str(paths[1]) and err.value.chunks == [1] and list(err.value.problems[1]) == ["endpoint"]
    for k in range(len(reader)):  # every other chunk still reads
        if k != bad:
            reader.read_chunk(k)
    # the merge (all distances) and verify_shard refuse the shard the same way
    with pytest.raises(C.CorruptChunkError, match=r"shard-00001.zarr: corrupt coupling chunk\(s\) \[1\] .*chunk 1: endpoint"):
        CS.merge_shards(paths, manifest.with_name("again.json"), index_store=index, progress=False)
    assert not manifest.with_name("again.json").exists()
    with pytest.raises(C.CorruptChunkError, match="chunk 1: endpoint"):
        C.verify_shard(paths[1])
    # without verification (the benchmark's baseline) the bad values come through: what the digests prevent
    assert not np.array_equal(CS.open_couplings(manifest, verify=False).read_chunk(bad)["endpoint"],
                              CS.open_couplings(manifest, verify=False).read_chunk(0)["endpoint"])


@pytest.mark.parametrize("array", ["noise", "endpoint", "label", "sample_id", "digest"])
def test_a_deleted_chunk_file_is_an_error_not_fill_values(merged, index, array):
    paths, manifest = merged
    reader = CS.open_couplings(manifest) if array != "digest" else None
    chunk_path(paths[2], array, 3).unlink()
    if reader is None:  # digests are read when the reader opens
        reader = CS.open_couplings(manifest)
    bad = next(k for k, ref in enumerate(reader.chunks) if ref.shard == 2 and ref.chunk == 3)
    with pytest.raises(C.CorruptChunkError) as err:
        reader.read_chunk(bad)
    assert err.value.path == str(paths[2]) and err.value.chunks == [3]
    if array == "digest":
        assert set(err.value.problems[3]) == set(C.DATA_ARRAYS)
        assert "has no recorded digest (file digest/c/3/0 is missing)" in str(err.value)
    else:
        assert list(err.value.problems[3]) == [array]
        assert f"{array} chunk file {chunk_path(Path(''), array, 3).as_posix()} is missing" in str(err.value)
    with pytest.raises(C.CorruptChunkError, match=r"shard-00002.zarr: corrupt coupling chunk\(s\) \[3\]"):
        CS.merge_shards(paths, manifest.with_name("again.json"), index_store=index, progress=False)


def test_unreadable_and_several_bad_chunks_are_all_listed(merged, index):
    paths, _ = merged
    chunk_path(paths[0], "noise", 0).write_bytes(b"short")  # not a chunk any more: decoding fails
    flip_bytes(chunk_path(paths[0], "label", 4), offsets=(0,))  # compressed: bad zstd frame
    with pytest.raises(C.CorruptChunkError) as err:
        C.verify_shard(paths[0])
    assert err.value.chunks == [0, 4]
    assert err.value.problems[0]["noise"].startswith("cannot be read")
    assert "label" in err.value.problems[4]


@pytest.mark.parametrize("fmt, why", [("remeanflow.couplings.shard/1", "written before chunk digests"),
                                      ("remeanflow.couplings.shard/2", "written with position-free chunk digests")])
def test_store_in_an_older_format_is_refused_with_a_clear_error(merged, index, fmt, why):
    paths, manifest = merged
    group = zarr.open_group(str(paths[0]), mode="r+")
    attrs = dict(group.attrs)
    if fmt.endswith("/1"):  # as written before chunk digests: no digest array, no digest attribute
        del attrs["digest"]
        shutil.rmtree(paths[0] / "digest")
    else:  # as written before the digests bound the chunk's position
        attrs["digest"] = dict(attrs["digest"], of="little-endian bytes of chunk i")
    group.attrs.put({**attrs, "format": fmt})
    for call in (lambda: CS.open_couplings(manifest), lambda: C.verify_shard(paths[0]),
                 lambda: CS.merge_shards(paths, manifest, index_store=index, progress=False),
                 lambda: C.create_shard_store(paths[0], index_store=index, shard=0, num_shards=3, **SHARD_KW)):
        with pytest.raises(C.OutdatedShardError, match=rf"{paths[0]}: .*{why}.*cannot be verified.*Delete {paths[0]}"):
            call()


def test_advice_names_the_workflow_commands():
    shard = Path("results/toy/reflow/couplings/shard-00003.zarr")
    assert C.work_store_for(shard) == Path("results/toy/reflow/work/shard-00003.zarr")
    assert C.work_store_for(Path("results/toy/reflow/work/shard-00003.zarr")) is None
    advice = str(C.CorruptChunkError(shard, {2: {"endpoint": "changed"}}))
    assert advice.startswith(f"{shard}: corrupt coupling chunk(s) [2] (1 total): chunk 2: endpoint changed. ")
    assert f"rerun the workflow with `--forcerun {shard}`" in advice
    assert f"first move {shard} to results/toy/reflow/work/shard-00003.zarr" in advice
    assert f"`--forcerun {shard}`" in str(C.OutdatedShardError(shard, "remeanflow.couplings.shard/2"))


def test_unmark_corrupt_chunks_regenerates_only_the_bad_ones(tmp_path, index):
    reference = reference_store(tmp_path, index)
    store = tmp_path / "damaged.zarr"
    shutil.copytree(reference, store)
    flip_bytes(chunk_path(store, "endpoint", 1))
    chunk_path(store, "noise", 3).unlink()
    chunk_path(store, "label", 5).write_bytes(b"garbage")
    chunk_path(store, "digest", 7).unlink()
    chunk_path(store, "sample_id", 14).unlink()  # the last chunk
    counting, finished = Counting(), []
    assert C.unmark_corrupt_chunks(store, index_store=index) == [1, 3, 5, 7, 14]
    assert np.flatnonzero(~C.completion_mask(store)).tolist() == [1, 3, 5, 7, 14]
    C.generate_shard(store, counting, progress=False, on_chunk_done=finished.append)
    assert counting.calls == 5 and finished == [1, 3, 5, 7, 14]
    C.verify_shard(store, index_store=index, check_noise=True)
    assert_stores_equal(store, reference)
    assert C.store_checksum(store) == C.store_checksum(reference)  # bit for bit, digests included
    assert C.unmark_corrupt_chunks(store, index_store=index) == []  # a sound store is left alone


def test_unmark_rewrites_creation_arrays_of_unfinished_chunks(tmp_path, index):
    reference = reference_store(tmp_path, index)
    store = tmp_path / "partial.zarr"
    C.create_shard_store(store, index_store=index, shard=0, num_shards=1, **SHARD_KW)
    C.generate_shard(store, toy_generate, rank=0, world_size=2, progress=False)  # even chunks only
    chunk_path(store, "label", 3).unlink()  # not generated yet: generation would read fill values
    assert C.unmark_corrupt_chunks(store, index_store=index) == []
    C.generate_shard(store, toy_generate, progress=False)
    assert C.store_checksum(store) == C.store_checksum(reference)


def test_digest_algorithm_is_recorded_and_checked(tmp_path, index):
    with pytest.raises(ValueError, match="digest must be one of"):
        C.create_shard_store(tmp_path / "x.zarr", index_store=index, shard=0, num_shards=1, digest="md5", **SHARD_KW)
    try:
        import xxhash  # noqa: F401
    except ImportError:
        with pytest.raises(C.CouplingStoreError, match="needs the xxhash package"):
            C.create_shard_store(tmp_path / "x.zarr", index_store=index, shard=0, num_shards=1, digest="xxh3_64",
                                 **SHARD_KW)
        assert not (tmp_path / "x.zarr").exists()
        return
    (path,) = make_shards(tmp_path, index, 1, digest="zlib.crc32")  # the non-default algorithm
    attrs = C.read_shard_attrs(path)
    assert attrs["digest"]["algorithm"] == "zlib.crc32"
    assert read_arrays(path)["digest"][0, 0] == __import__("zlib").crc32(
        C.position_header(attrs, 0, "noise") + read_arrays(path)["noise"][:4].tobytes())
    flip_bytes(chunk_path(path, "noise", 2))
    with pytest.raises(C.CorruptChunkError, match="chunk 2: noise"):
        C.verify_shard(path)


# ----------------------------------------------------------------------------------------------
# The coupling job's precision and fast path (`coupling_job.make_generate_fn`, `fingerprint`).

JOB_CFG = dict(heun_steps=3, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.7)


def job(**options):
    """The couplings settings of these tests: JOB_CFG's sampler, fp32 (the embedded default's; the
    class default is the official fp16) plus `options`."""
    from remeanflow.settings import CouplingSettings

    return CouplingSettings(**{**JOB_CFG, "precision": "fp32", **options})


def _job_net(seed: int):
    """The tiny net (2 x 8 x 8, 4 classes, attention at 4 x 4) with EDM2's zero-initialised gains
    set non-zero: at zero gains D(x) = c_skip x and any fast path would trivially agree."""
    from remeanflow import networks

    torch.manual_seed(seed)
    net = networks.build("tiny").eval().requires_grad_(False)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, networks.Block):
                module.emb_gain.fill_(0.5)
        net.unet.out_gain.fill_(1.0)
    return net


@pytest.fixture
def job_batch():
    noise = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    return _job_net(0), _job_net(1), noise, torch.tensor([0, 3, -1, 2, 1])


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().flatten(1), ref.double().flatten(1)
    return float(((a - ref).norm(dim=1) / ref.norm(dim=1)).max())


def test_job_eager_path_is_bit_identical_to_the_plain_sampler(job_batch, one_thread):
    from remeanflow import coupling_job, sampling

    net, guide, noise, labels = job_batch
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):  # the job's path before accel
        ref = sampling.edm_heun(net, noise, labels, num_steps=3, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                                guide=guide, guidance=1.7)
    cpu = torch.device("cpu")
    for cfg in (job(), job(precision="fp32", fast_path=False)):
        out = coupling_job.make_generate_fn(net, guide, cfg, cpu)(noise, labels)
        assert out.dtype == torch.float32 and torch.equal(out, ref), cfg


def test_job_fast_path_matches_eager_path(job_batch, one_thread):
    import copy

    from remeanflow import coupling_job, networks

    net, guide, noise, labels = job_batch
    cpu = torch.device("cpu")
    ref = coupling_job.make_generate_fn(net, guide, job(precision="fp32"), cpu)(noise, labels)
    fast_net, fast_guide = copy.deepcopy(net), copy.deepcopy(guide)
    generate = coupling_job.make_generate_fn(fast_net, fast_guide, job(precision="fp32", fast_path=True), cpu)
    out = generate(noise, labels)
    # the fast denoiser really is in use: SDPA attention and channels-last weights on the job's nets
    blocks = [m for m in fast_net.modules() if isinstance(m, networks.Block) and m.num_heads]
    assert blocks and all("_attention" in vars(b) for b in blocks)
    assert fast_net.unet.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # fp32 rounding of SDPA and NHWC kernels, amplified over the Heun steps: ~5e-6 measured (bf16: ~1e-2)
    assert _rel_err(out, ref) < 2e-5
    # guidance is inside the fast denoiser: with guidance 1 (no guide) the endpoints differ
    unguided = coupling_job.make_generate_fn(copy.deepcopy(net), None, job(guidance=1.0, fast_path=True), cpu)
    assert _rel_err(unguided(noise, labels), ref) > 1e-3


def test_job_fingerprint_records_the_precision_and_fast_path(tmp_path):
    from remeanflow import coupling_job
    from remeanflow.checkpoints import net_sha256

    teacher, guide = tmp_path / "net.pt", tmp_path / "guide.pt"
    teacher.write_bytes(b"teacher")
    guide.write_bytes(b"guide")

    def fp(device="cpu", **options):
        return coupling_job.fingerprint(teacher, guide, job(**options), 7, device)

    default = fp()
    # the format the job wrote before the options existed, unchanged for the default CPU run
    assert default == {
        "teacher_sha256": net_sha256(teacher), "guide_sha256": net_sha256(guide),
        "sampler": JOB_CFG, "seed": 7, "precision": "fp32",
        "noise": {"generator": "numpy Philox(key=[sample_id, seed]) stream 0", "numpy": np.__version__},
    }
    assert fp(precision="fp32") == fp(fast_path=False) == default
    # the named precision runs on every device: no device-dependent choice any more
    assert fp("cuda") == default and fp("cuda", precision="fp16")["precision"] == "fp16"
    for name in ("bf16", "fp16"):
        assert fp(precision=name) == dict(default, precision=name)
    from remeanflow.settings import CouplingSettings
    assert CouplingSettings(**JOB_CFG).precision == "fp16"  # the class default: the official precision
    assert fp(fast_path=True) == dict(default, fast_path=True)
    hashes = {C.fingerprint_hash(f) for f in (default, fp(precision="bf16"), fp(precision="fp16"), fp(fast_path=True))}
    assert len(hashes) == 4
    # a typed settings object with the same attribute names works too

    from remeanflow.coupling_job import speed_options
    assert speed_options(job(precision="bf16", fast_path=True), "cpu") == ("bf16", True)
    assert speed_options(job(), "cuda") == ("fp32", False)


def test_job_rejects_bad_precision_and_fast_path(job_batch, tmp_path):
    from remeanflow import accel, coupling_job

    net, guide, _, _ = job_batch
    cpu = torch.device("cpu")
    # the settings refuse an unknown precision where it enters; accel's own check guards direct callers
    with pytest.raises(ValueError, match=r"CouplingSettings.precision = 'fp64': must be one of \['fp16', 'bf16'"):
        job(precision="fp64")
    with pytest.raises(ValueError, match=r"couplings.precision = 'auto' is no longer accepted .* one of \['fp16'"):
        job(precision="auto")
    with pytest.raises(ValueError, match=r"\['bf16', 'fp16', 'fp32'\], got 'fp64'"):
        accel.resolve_precision("fp64", "cuda")
    # a device type whose autocast this torch lacks: refused naming the key, not silently fp32
    with pytest.raises(ValueError, match=r"config key couplings.precision = 'fp16': this torch .* no torch.float16 "
                                         r"autocast on meta"):
        coupling_job.speed_options(job(precision="fp16"), "meta")
    assert coupling_job.speed_options(job(), "meta") == ("fp32", False)
    with pytest.raises(ValueError, match="fast_path must be true or false"):
        coupling_job.make_generate_fn(net, guide, job(fast_path="yes"), cpu)


def test_job_bf16_autocast_on_cpu(job_batch, tmp_path, one_thread):
    import copy

    from remeanflow import coupling_job

    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    net, guide, noise, labels = job_batch
    cpu = torch.device("cpu")
    ref = coupling_job.make_generate_fn(net, guide, job(), cpu)(noise, labels)
    out = coupling_job.make_generate_fn(net, guide, job(precision="bf16"), cpu)(noise, labels)
    # really reduced precision (not the fp32 numbers), and still the same ODE up to bf16 rounding
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and not torch.equal(out, ref)
    assert _rel_err(out, ref) < 5e-2
    fast = coupling_job.make_generate_fn(copy.deepcopy(net), copy.deepcopy(guide),
                                         job(precision="bf16", fast_path=True), cpu)(noise, labels)
    assert _rel_err(fast, ref) < 5e-2
    teacher = tmp_path / "net.pt"
    teacher.write_bytes(b"teacher")
    assert coupling_job.fingerprint(teacher, teacher, job(precision="bf16"), 7, cpu)["precision"] == "bf16"


def test_job_fp16_autocast_on_cpu(job_batch, one_thread):
    from remeanflow import accel, coupling_job

    if not accel.autocast_supported("cpu", torch.float16):
        pytest.skip("this torch has no float16 CPU autocast")
    net, guide, noise, labels = job_batch
    cpu = torch.device("cpu")
    ref = coupling_job.make_generate_fn(net, guide, job(), cpu)(noise, labels)
    out = coupling_job.make_generate_fn(net, guide, job(precision="fp16"), cpu)(noise, labels)
    bf16 = coupling_job.make_generate_fn(net, guide, job(precision="bf16"), cpu)(noise, labels)
    # really fp16 (neither the fp32 nor the bf16 numbers), the same ODE up to rounding; fp16 keeps
    # 3 more mantissa bits than bf16, so it lands closer to fp32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref) and not torch.equal(out, bf16)
    assert _rel_err(out, ref) < 1e-2 and _rel_err(out, ref) < _rel_err(bf16, ref)


def test_a_shard_resumed_under_another_precision_is_refused(index, tmp_path, one_thread):
    """The precision is part of the fingerprint in the shard's attributes: a killed shard is not
    finished in another precision (its chunks would mix two arithmetics); with the precision it
    was started in, it resumes and regenerates only the missing chunk."""
    from remeanflow import checkpoints, coupling_job

    teacher, guide = tmp_path / "net.pt", tmp_path / "guide.pt"
    checkpoints.save_net(teacher, _job_net(0))
    checkpoints.save_net(guide, _job_net(1))
    work, output = tmp_path / "work" / "shard-00000.zarr", tmp_path / "shard-00000.zarr"

    def spec(precision):
        c = job(precision=precision, index_mode="random", num_samples=60, num_shards=1, batch=16)
        return {"index": str(index), "teacher": str(teacher), "guide": str(guide), "work": str(work),
                "output": str(output), "shard": 0, "shape": [2, 8, 8], "couplings": c.to_dict(), "seed": 7,
                "progress": False}

    coupling_job.run_shard(spec("fp32"))
    first = read_arrays(output)
    fp32_hash = C.read_shard_attrs(output)["fingerprint_hash"]
    assert C.read_shard_attrs(output)["fingerprint"]["precision"] == "fp32"
    # as a killed job leaves it: the work store with its last chunk not yet marked done
    shutil.move(output, work)
    zarr.open_group(str(work), mode="r+")["done"][3] = False

    with pytest.raises(C.FingerprintMismatchError, match=r"differs in \['fingerprint', 'fingerprint_hash'\]"):
        coupling_job.run_shard(spec("fp16"))
    assert not output.exists() and C.read_shard_attrs(work)["fingerprint_hash"] == fp32_hash  # left as it was
    fp16 = coupling_job.fingerprint(str(teacher), str(guide), job(precision="fp16"), 7, "cpu")
    assert fp16["precision"] == "fp16" and C.fingerprint_hash(fp16) != fp32_hash

    stats = coupling_job.run_shard(spec("fp32"))
    assert stats["chunks_generated"] == 1 and stats["chunks_done_before"] == 3
    again = read_arrays(output)
    for name in ARRAYS:
        assert np.array_equal(again[name], first[name]), name
