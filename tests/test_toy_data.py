"""The toy archive: reproducible bytes, ImageNet train layout, a real image distribution."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from remeanflow import fileio
from remeanflow.data import toy
from remeanflow.data.imagenet_tar import iter_images, list_synsets

SMALL = dict(num_classes=4, images_per_class=6, size=16)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.tar"
    return path, toy.write_toy_archive(path, **SMALL)


def test_same_arguments_give_identical_bytes(archive, tmp_path):
    path, summary = archive
    again = toy.write_toy_archive(tmp_path / "again.tar", **SMALL)
    assert again["sha256"] == summary["sha256"] == fileio.sha256_file(path)
    other_seed = toy.write_toy_archive(tmp_path / "seed1.tar", **SMALL, seed=1)
    assert other_seed["sha256"] != summary["sha256"]


def test_summary_describes_the_archive(archive):
    path, summary = archive
    assert summary["num_images"] == 24
    assert summary["bytes"] == path.stat().st_size
    assert summary["synsets"] == ["n01000000", "n01000001", "n01000002", "n01000003"]
    assert summary["class_names"][:2] == ["red circle", "red square"]


def test_layout_is_a_tar_of_class_tars_of_jpegs(archive):
    path, summary = archive
    with tarfile.open(path) as outer:
        outer_members = outer.getmembers()
        assert [m.name for m in outer_members] == [f"{s}.tar" for s in summary["synsets"]]
        for m in outer_members:
            assert (m.mtime, m.uid, m.gid, m.uname) == (toy._MTIME, 0, 0, "")
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                names = inner.getnames()
            synset = m.name[: -len(".tar")]
            assert names == [f"{synset}_{i}.JPEG" for i in range(6)]


def test_images_are_rgb_jpegs_with_varied_aspect(archive):
    path, _ = archive
    sizes = set()
    for _, _, data in iter_images(path):
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
    assert all(min(s) == 16 and 16 <= max(s) <= 20 for s in sizes)
    assert any(w != h for w, h in sizes), "some images must be non-square so cropping matters"
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_classes_differ_and_images_within_a_class_vary(archive):
    path, _ = archive
    by_class: dict[str, list[np.ndarray]] = {}
    for synset, _, data in iter_images(path):
        arr = np.asarray(Image.open(io.BytesIO(data)).resize((16, 16)), dtype=np.float64)
        by_class.setdefault(synset, []).append(arr)
    red = np.array(toy.COLOURS["red"], dtype=np.float64)
    for synset, images in by_class.items():
        stack = np.stack(images)
        assert stack.std(axis=0).mean() > 10, f"{synset}: images are near-identical"
        # Classes 0-4 are red shapes: every image has some pixel close to red.
        assert all(np.abs(im - red).sum(-1).min() < 80 for im in images)
    assert list_synsets(path) == sorted(by_class)


@pytest.mark.parametrize(
    "kwargs", [dict(num_classes=0), dict(num_classes=1001), dict(images_per_class=0), dict(size=4)]
)
def test_bad_arguments_are_rejected_without_output(tmp_path, kwargs):
    with pytest.raises(ValueError):
        toy.write_toy_archive(tmp_path / "x.tar", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_classes_beyond_the_40_looks_repeat_a_look_under_their_own_synset():
    assert toy.class_name(3) == "red cross" and toy.class_name(43) == "red cross #1"
    assert toy.synset_name(43) != toy.synset_name(3)
    # the same look, different images (each class draws its own jitter)
    a, b = (toy.render_image(k, 0, size=24, seed=0) for k in (3, 43))
    assert a.size != b.size or np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean() > 1
