"""Reflow index: modes, determinism, content hash, atomic writes, clear errors."""

import numpy as np
import pytest
import zarr

from remeanflow import reflow_index as R

DATASET = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3], dtype=np.int64)  # deliberately unbalanced


def test_imagenet_mode_repeats_each_pass_as_a_permutation(tmp_path):
    summary = R.build_index(tmp_path / "i.zarr", mode="imagenet", labels=DATASET, passes=3, seed=5)
    idx = R.load_index(tmp_path / "i.zarr")
    assert len(idx) == 30 and summary["N"] == 30 and summary["num_classes"] == 4
    assert idx.labels.dtype == np.int32 and idx.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(idx.sample_ids, np.arange(30))
    passes = idx.labels.reshape(3, 10)
    for p in passes:  # class balance follows the data, pass by pass
        np.testing.assert_array_equal(np.sort(p), DATASET)
    assert not all(np.array_equal(passes[0], p) for p in passes[1:]), "passes must be shuffled independently"
    assert summary["class_counts"] == [9, 6, 3, 12]
    assert {k: idx.attrs[k] for k in ("mode", "passes", "seed", "N")} == {"mode": "imagenet", "passes": 3, "seed": 5, "N": 30}


def test_random_mode_uniform_classes(tmp_path):
    R.build_index(tmp_path / "r.zarr", mode="random", num_samples=4000, num_classes=8, seed=1)
    idx = R.load_index(tmp_path / "r.zarr")
    counts = np.bincount(idx.labels, minlength=8)
    assert counts.size == 8 and idx.labels.min() >= 0
    assert np.all(np.abs(counts - 500) < 5 * np.sqrt(500)), counts  # ~5 sigma: uniform, not constant
    assert idx.attrs["passes"] == 1 and idx.num_classes == 8


def test_deterministic_and_hash_tracks_content_and_params(tmp_path):
    kw = dict(mode="imagenet", labels=DATASET, passes=2)
    a = R.build_index(tmp_path / "a.zarr", seed=3, **kw)
    b = R.build_index(tmp_path / "b.zarr", seed=3, **kw)
    c = R.build_index(tmp_path / "c.zarr", seed=4, **kw)
    R.build_index(tmp_path / "one.zarr", seed=3, mode="imagenet", labels=DATASET, passes=1)
    more = R.build_index(tmp_path / "k.zarr", seed=3, num_classes=6, **kw)  # same labels, other params
    la, lc = (R.load_index(tmp_path / n).labels for n in ("a.zarr", "c.zarr"))
    np.testing.assert_array_equal(la, R.load_index(tmp_path / "b.zarr").labels)
    assert a["index_hash"] == b["index_hash"]
    assert not np.array_equal(la, lc) and c["index_hash"] != a["index_hash"]
    # each pass has its own stream: adding a pass keeps the first one
    np.testing.assert_array_equal(la[:10], R.load_index(tmp_path / "one.zarr").labels)
    np.testing.assert_array_equal(R.load_index(tmp_path / "k.zarr").labels, la)
    assert more["index_hash"] != a["index_hash"]


def test_load_detects_tampered_labels(tmp_path):
    R.build_index(tmp_path / "i.zarr", mode="random", num_samples=50, num_classes=5, seed=0)
    arr = zarr.open_array(str(tmp_path / "i.zarr" / "label"), mode="r+")
    arr[7] = (arr[7] + 1) % 5
    with pytest.raises(R.ReflowIndexError, match="index_hash mismatch"):
        R.load_index(tmp_path / "i.zarr")
    assert R.load_index(tmp_path / "i.zarr", verify=False).labels[7] == arr[7]


def test_labels_from_npy_file(tmp_path):
    np.save(tmp_path / "labels.npy", DATASET)
    s1 = R.build_index(tmp_path / "f.zarr", mode="imagenet", labels=tmp_path / "labels.npy", seed=2)
    s2 = R.build_index(tmp_path / "m.zarr", mode="imagenet", labels=DATASET, seed=2)
    assert s1["index_hash"] == s2["index_hash"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="bogus"), "unknown reflow index mode"),
        (dict(mode="imagenet"), "needs the dataset labels"),
        (dict(mode="imagenet", labels=DATASET, num_classes=3), r"outside .*first at position 6"),
        (dict(mode="imagenet", labels=np.array([0, -1, 2])), "found 1 outside"),
        (dict(mode="imagenet", labels=np.array([0.0, 1.0])), "integer labels"),
        (dict(mode="imagenet", labels=np.zeros((2, 2), int)), "1-D"),
        (dict(mode="imagenet", labels=DATASET, passes=0), "passes"),
        (dict(mode="random", num_classes=4), "num_samples"),
        (dict(mode="random", num_samples=4), "num_classes"),
        (dict(mode="random", num_samples=4, num_classes=2, labels=DATASET), "do not pass labels"),
        (dict(mode="random", num_samples=4, num_classes=2, seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(tmp_path, kw, match):
    with pytest.raises(R.ReflowIndexError, match=match):
        R.build_index(tmp_path / "x.zarr", **kw)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_labels_file_and_not_an_index(tmp_path):
    with pytest.raises(R.ReflowIndexError, match="does not exist"):
        R.build_index(tmp_path / "x.zarr", mode="imagenet", labels=tmp_path / "nope.npy")
    zarr.create_group(store=str(tmp_path / "g.zarr"), zarr_format=3)
    with pytest.raises(R.ReflowIndexError, match="not a reflow index"):
        R.load_index(tmp_path / "g.zarr")


def test_failed_write_keeps_the_previous_index(tmp_path, monkeypatch):
    out = tmp_path / "i.zarr"
    good = R.build_index(out, mode="random", num_samples=20, num_classes=3, seed=0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zarr.Group, "create_array", boom)
    with pytest.raises(OSError, match="disk full"):
        R.build_index(out, mode="random", num_samples=20, num_classes=3, seed=1)
    monkeypatch.undo()
    assert R.load_index(out).index_hash == good["index_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["i.zarr"], "temporary left behind"
