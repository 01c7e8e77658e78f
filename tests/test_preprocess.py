"""Archive reader and preprocessing: crop, labels, sharding, bad images, unsafe/truncated tars."""

from __future__ import annotations

import csv
import io
import logging
import tarfile

import numpy as np
import pytest
import zarr
from PIL import Image

from remeanflow.data import toy
from remeanflow.data.imagenet_tar import ArchiveError, UnsafeArchiveError, iter_images, list_synsets
from remeanflow.data.preprocess import (
    ShardMismatchError,
    StoreFormatError,
    TooFewImagesError,
    TooManyBadImagesError,
    center_crop_dhariwal,
    load_images,
    merge_shards,
    preprocess_shard,
)

RES = 8
NUM_CLASSES, PER_CLASS = 4, 10


# ----------------------------------------------------------------------------------------------
# Archive builders.


def _jpeg(k: int, i: int) -> bytes:
    buf = io.BytesIO()
    toy.render_image(k, i, size=16, seed=0).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link="") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar_bytes(entries) -> bytes:
    """entries: (name, data) or (name, data, kind, linkname) tuples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for entry in entries:
            _add(tf, *entry)
    return buf.getvalue()


def _classes(num_classes=NUM_CLASSES, per_class=PER_CLASS) -> dict[str, list[tuple[str, bytes]]]:
    return {
        toy.synset_name(k): [
            (f"{toy.synset_name(k)}_{i}.JPEG", _jpeg(k, i)) for i in range(per_class)
        ]
        for k in range(num_classes)
    }


def _write_nested(path, classes, order=None, extra_outer=()):
    """Outer tar of class tars, in ``order`` (default: sorted), plus raw extra outer entries."""
    order = order or sorted(classes)
    entries = [(f"{s}.tar", _tar_bytes(classes[s])) for s in order] + list(extra_outer)
    path.write_bytes(_tar_bytes(entries))
    return path


@pytest.fixture(scope="module")
def classes():
    return _classes()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, classes):
    return _write_nested(tmp_path_factory.mktemp("arch") / "train.tar", classes)


def _no_outputs(directory) -> bool:
    return not any(p.name.endswith(".zarr") or ".tmp" in p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------------------------
# Center crop.


def test_center_crop_matches_the_explicit_pil_steps():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(100, 130, 3), dtype=np.uint8))  # W130 H100
    # Short side 100 >= 2*16 -> BOX halve to 65x50; 50 >= 32 -> 32x25; 25 < 32 stops. BICUBIC by
    # 16/25 -> (round(20.48), 16) = 20x16; crop columns (20-16)//2 = 2 .. 18.
    step = image.resize((65, 50), Image.Resampling.BOX).resize((32, 25), Image.Resampling.BOX)
    step = step.resize((20, 16), Image.Resampling.BICUBIC)
    expected = np.asarray(step)[0:16, 2:18]
    out = center_crop_dhariwal(image, 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, expected)


def test_center_crop_halves_when_short_side_is_exactly_twice_the_resolution():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8))  # W40 H32
    # 32 >= 2*16: BOX halve to 20x16, which is already at the resolution; crop columns 2 .. 18.
    expected = np.asarray(image.resize((20, 16), Image.Resampling.BOX))[:, 2:18]
    np.testing.assert_array_equal(center_crop_dhariwal(image, 16), expected)


def test_center_crop_upscales_small_portrait_images():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(13, 10, 3), dtype=np.uint8))  # W10 H13
    # No halving (10 < 32); BICUBIC by 1.6 -> (16, round(20.8) = 21); crop rows (21-16)//2 = 2.
    expected = np.asarray(image.resize((16, 21), Image.Resampling.BICUBIC))[2:18, 0:16]
    np.testing.assert_array_equal(center_crop_dhariwal(image, 16), expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_center_crop_converts_to_rgb(mode):
    image = Image.new("RGB", (20, 24), (200, 30, 30)).convert(mode)
    out = center_crop_dhariwal(image, RES)
    assert out.shape == (RES, RES, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, center_crop_dhariwal(image.convert("RGB"), RES))


def test_center_crop_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        center_crop_dhariwal(Image.new("RGB", (4, 4)), 0)


# ----------------------------------------------------------------------------------------------
# Reader.


def test_reader_orders_classes_by_sorted_synset(tmp_path, classes):
    shuffled = _write_nested(tmp_path / "shuffled.tar", classes, order=sorted(classes)[::-1])
    assert list_synsets(shuffled) == sorted(classes)
    got = [(s, m, d) for s, m, d in iter_images(shuffled)]
    want = [(s, m, d) for s in sorted(classes) for m, d in classes[s]]
    assert got == want
    only = [s for s, _, _ in iter_images(shuffled, synsets=["n01000002"])]
    assert only == ["n01000002"] * PER_CLASS


def test_reader_rejects_unknown_synsets(archive):
    with pytest.raises(ArchiveError, match="n09999999"):
        list(iter_images(archive, synsets=["n09999999"]))


def test_flat_layout_gives_the_same_images(tmp_path, classes):
    flat = tmp_path / "flat.tar"
    entries = [(s, b"", tarfile.DIRTYPE) for s in classes]
    entries += [(f"{s}/{m}", d) for s in sorted(classes)[::-1] for m, d in classes[s]]
    flat.write_bytes(_tar_bytes(entries))
    got = [(s, m.split("/")[-1], d) for s, m, d in iter_images(flat)]
    assert got == [(s, m, d) for s in sorted(classes) for m, d in classes[s]]


@pytest.mark.parametrize(
    "where, entry, needle",
    [
        ("inner", ("../evil.JPEG", b"x"), "../evil.JPEG"),
        ("inner", ("n01000000_9.JPEG", b"", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        ("inner", ("dev", b"", tarfile.CHRTYPE), "device"),
        ("outer", ("/abs/n09.tar", b"x"), "/abs/n09.tar"),
        ("outer", ("a/../../n09.tar", b"x"), ".."),
        ("outer", ("n09.tar", b"", tarfile.LNKTYPE, "n01000000.tar"), "link"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, classes, where, entry, needle):
    classes = dict(classes)
    extra = ()
    if where == "inner":
        classes["n01000000"] = classes["n01000000"] + [entry]
    else:
        extra = (entry,)
    bad = _write_nested(tmp_path / "bad.tar", classes, extra_outer=extra)
    with pytest.raises(UnsafeArchiveError, match=needle.replace(".", r"\.")):
        list(iter_images(bad))
    out = tmp_path / "out.zarr"
    with pytest.raises(UnsafeArchiveError):
        preprocess_shard(bad, out, shard=0, num_shards=1, resolution=RES, workers=0, progress=False)
    assert _no_outputs(tmp_path)


def _outer_offsets(path) -> list[tuple[int, int]]:
    """(header offset, data end) of each outer member."""
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data + m.size) for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["mid-data", "at-header", "end-marker", "garbled-header"])
def test_truncated_or_corrupt_archive_is_an_error(tmp_path, archive, cut):
    data = bytearray(archive.read_bytes())
    offsets = _outer_offsets(archive)
    last_header = offsets[-1][0]
    if cut == "mid-data":
        data = data[: (last_header + offsets[-1][1]) // 2]
    elif cut == "at-header":  # tarfile alone would read this as a complete 3-class archive
        data = data[:last_header]
    elif cut == "end-marker":
        data = data[: offsets[-1][1] + (-offsets[-1][1]) % 512]
    else:
        data[last_header : last_header + 100] = b"\xff" * 100
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="bad.tar"):
        list_synsets(bad)
    with pytest.raises(ArchiveError, match="bad.tar"):
        preprocess_shard(
            bad,
            tmp_path / "o.zarr",
            shard=0,
            num_shards=1,
            resolution=RES,
            workers=0,
            progress=False,
        )
    assert _no_outputs(tmp_path)


def test_truncated_class_tar_inside_a_valid_archive_is_an_error(tmp_path, classes):
    inner = _tar_bytes(classes["n01000000"])
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        cut = tf.getmembers()[3].offset  # at a header: tarfile alone would just see 3 images
    bad = _write_nested(tmp_path / "bad.tar", classes, extra_outer=[("n01000009.tar", inner[:cut])])
    assert list_synsets(bad)[-1] == "n01000009"  # the outer archive itself is fine
    with pytest.raises(ArchiveError, match=r"bad\.tar:n01000009\.tar.*end-of-archive"):
        list(iter_images(bad))


def test_non_tar_file_is_an_archive_error(tmp_path):
    bad = tmp_path / "page.html"
    bad.write_bytes(b"<html>not found</html>" * 100)
    with pytest.raises(ArchiveError, match="page.html"):
        list_synsets(bad)


# ----------------------------------------------------------------------------------------------
# Preprocessing and merging.


@pytest.fixture(scope="module")
def single(tmp_path_factory, archive):
    out = tmp_path_factory.mktemp("single") / "images.zarr"
    report = preprocess_shard(
        archive, out, shard=0, num_shards=1, resolution=RES, workers=0, progress=False
    )
    return out, report


def test_single_shard_images_and_labels(single, classes):
    out, report = single
    images, labels = load_images(out)
    assert images.shape == (NUM_CLASSES * PER_CLASS, 3, RES, RES) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, np.repeat(np.arange(NUM_CLASSES), PER_CLASS))
    # Row 13 is image 3 of class 1, cropped and stored channel-first.
    want = center_crop_dhariwal(Image.open(io.BytesIO(classes["n01000001"][3][1])), RES)
    np.testing.assert_array_equal(images[13], want.transpose(2, 0, 1))
    assert report["num_images"] == 40 and report["num_bad"] == 0 and report["class_range"] == [0, 4]
    assert report["class_counts"] == {s: PER_CLASS for s in classes}


def test_shards_then_merge_equal_one_shard(tmp_path, archive, single):
    parts = []
    for k in range(3):
        part = tmp_path / f"part{k}.zarr"
        # One shard uses a real process pool; the others decode in-process.
        report = preprocess_shard(
            archive,
            part,
            shard=k,
            num_shards=3,
            resolution=RES,
            workers=2 if k == 1 else 0,
            progress=False,
            chunk_images=3,
        )
        assert report["class_range"] == [[0, 1], [1, 2], [2, 4]][k]
        parts.append(part)
    merged, csv_path = tmp_path / "images.zarr", tmp_path / "labels.csv"
    report = merge_shards(parts, merged, csv_path, progress=False)
    images, labels = load_images(merged)
    ref_images, ref_labels = load_images(single[0])
    np.testing.assert_array_equal(images[:], ref_images[:])
    np.testing.assert_array_equal(labels, ref_labels)
    assert images.chunks[0] == 3
    assert report["num_images"] == 40 and report["class_counts"] == single[1]["class_counts"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", "synset", "member"]
    assert [int(r["index"]) for r in rows] == list(range(40))
    assert rows[13] == {
        "index": "13",
        "label": "1",
        "synset": "n01000001",
        "member": "n01000001_3.JPEG",
    }


def test_merge_refuses_inconsistent_parts(tmp_path, archive, single):
    def part(k, n, res=RES):
        out = tmp_path / f"p{k}of{n}r{res}.zarr"
        if not out.exists():
            preprocess_shard(
                archive, out, shard=k, num_shards=n, resolution=res, workers=0, progress=False
            )
        return out

    cases = {
        "shard order": [part(1, 2), part(0, 2)],
        "a shard is missing": [part(0, 2)],
        "resolution": [part(0, 2), part(1, 2, res=4)],
        "overlap": [part(0, 2), part(0, 4), part(1, 2)],
    }
    for name, parts in cases.items():
        out = tmp_path / "m.zarr"
        with pytest.raises(ShardMismatchError):
            merge_shards(parts, out, tmp_path / "m.csv", progress=False)
        assert not out.exists() and not (tmp_path / "m.csv").exists(), name
    with pytest.raises(StoreFormatError):
        merge_shards([tmp_path], tmp_path / "m.zarr", tmp_path / "m.csv", progress=False)


def _with_bad_images(tmp_path, classes, n_bad):
    classes = {s: list(v) for s, v in classes.items()}
    good = classes["n01000002"][0][1]
    bad_payloads = [good[: len(good) // 2], b"this is not an image"]
    names = []
    for i in range(n_bad):
        name = f"n01000002_bad{i}.JPEG"
        classes["n01000002"].insert(1 + i, (name, bad_payloads[i % 2]))
        names.append(name)
    return _write_nested(tmp_path / "with_bad.tar", classes), names


def test_bad_images_below_threshold_are_skipped_and_reported(tmp_path, classes, single):
    path, names = _with_bad_images(tmp_path, classes, 2)
    out = tmp_path / "out.zarr"
    report = preprocess_shard(
        path,
        out,
        shard=0,
        num_shards=1,
        resolution=RES,
        workers=0,
        max_bad_fraction=0.05,
        progress=False,
    )
    assert report["num_bad"] == 2 and report["num_seen"] == 42 and report["num_images"] == 40
    assert [b["member"] for b in report["bad_members"]] == names
    assert all(b["synset"] == "n01000002" and b["error"] for b in report["bad_members"])
    images, labels = load_images(out)
    np.testing.assert_array_equal(images[:], load_images(single[0])[0][:])
    np.testing.assert_array_equal(labels, load_images(single[0])[1])
    assert zarr.open_group(str(out), mode="r").attrs["num_bad"] == 2


def test_too_many_bad_images_is_an_error_without_output(tmp_path, classes):
    path, names = _with_bad_images(tmp_path, classes, 2)
    with pytest.raises(TooManyBadImagesError) as err:
        preprocess_shard(
            path,
            tmp_path / "out.zarr",
            shard=0,
            num_shards=1,
            resolution=RES,
            workers=0,
            max_bad_fraction=0.01,
            progress=False,
        )
    message = str(err.value)
    assert "with_bad.tar" in message and "2 of 42" in message and names[0] in message
    assert _no_outputs(tmp_path)


def test_bad_fraction_exactly_at_the_threshold_is_accepted_and_just_above_refused(tmp_path, classes):
    # the rule is "more than max_bad_fraction fails": equality passes; the float is the one the
    # code computes (2 / 42), so the boundary is exact, and the next float below it is refused
    path, _ = _with_bad_images(tmp_path, classes, 2)
    kw = dict(shard=0, num_shards=1, resolution=RES, workers=0, progress=False)
    at = 2 / 42
    assert preprocess_shard(path, tmp_path / "at.zarr", max_bad_fraction=at, **kw)["num_bad"] == 2
    with pytest.raises(TooManyBadImagesError, match="2 of 42"):
        preprocess_shard(path, tmp_path / "above.zarr", max_bad_fraction=float(np.nextafter(at, 0)), **kw)
    assert not (tmp_path / "above.zarr").exists()


NOT_UTF8 = "n01000002_\udcff.JPEG"  # tarfile's reading of the bytes b"n01000002_\xff.JPEG"


def _with_non_utf8_name(tmp_path, classes, layout):
    """The four classes, one image of n01000002 (a valid JPEG) renamed to bytes that are not UTF-8."""
    classes = {s: list(v) for s, v in classes.items()}
    classes["n01000002"][3] = (NOT_UTF8, classes["n01000002"][3][1])
    path = tmp_path / f"non_utf8_{layout}.tar"
    if layout == "nested":
        return _write_nested(path, classes)
    path.write_bytes(_tar_bytes([(f"{s}/{m}", d) for s in sorted(classes) for m, d in classes[s]]))
    return path


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_a_member_name_that_is_not_utf8_is_a_bad_member_naming_it_and_the_archive(tmp_path, classes, layout):
    path = _with_non_utf8_name(tmp_path, classes, layout)
    kw = dict(shard=0, num_shards=1, resolution=RES, workers=0, progress=False)
    report = preprocess_shard(path, tmp_path / "out.zarr", max_bad_fraction=0.05, **kw)
    assert report["num_bad"] == 1 and report["num_images"] == 39 and report["num_seen"] == 40
    (bad,) = report["bad_members"]
    assert bad["synset"] == "n01000002" and "\\udcff" in bad["member"]  # its repr: storable text
    assert "n01000002_\\xff.JPEG' is not valid UTF-8" in bad["error"] and str(path) in bad["error"]
    assert NOT_UTF8 not in zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["members"][:].tolist()
    with pytest.raises(TooManyBadImagesError) as err:  # and over the threshold, like an undecodable image
        preprocess_shard(path, tmp_path / "no.zarr", max_bad_fraction=0.0, **kw)
    assert str(path) in str(err.value) and "1 of 40" in str(err.value) and "not valid UTF-8" in str(err.value)
    assert not (tmp_path / "no.zarr").exists()


def test_a_class_name_that_is_not_utf8_is_an_archive_error_naming_it(tmp_path, classes):
    classes = {("n01\udcff" if s == "n01000001" else s): v for s, v in classes.items()}
    path = _write_nested(tmp_path / "bad_class_name.tar", classes)
    with pytest.raises(ArchiveError, match=r"class name b'n01\\xff\.tar' is not valid UTF-8") as err:
        list_synsets(path)
    assert str(path) in str(err.value)


def test_shard_arguments_are_checked(archive, tmp_path):
    with pytest.raises(ValueError, match="shard"):
        preprocess_shard(
            archive,
            tmp_path / "o.zarr",
            shard=3,
            num_shards=3,
            resolution=RES,
            workers=0,
            progress=False,
        )
    assert _no_outputs(tmp_path)


# ----------------------------------------------------------------------------------------------
# Classes without enough images.


def _with_empty_class(tmp_path, classes, name="with_empty.tar"):
    """The four classes plus n01000004, whose class tar holds no image."""
    classes = dict(classes)
    classes["n01000004"] = []
    return _write_nested(tmp_path / name, classes)


def test_empty_class_is_an_error_naming_it(tmp_path, classes):
    path = _with_empty_class(tmp_path, classes)
    with pytest.raises(TooFewImagesError) as err:
        preprocess_shard(path, tmp_path / "out.zarr", shard=0, num_shards=1, resolution=RES, workers=0,
                         progress=False)
    message = str(err.value)
    assert "with_empty.tar" in message and "n01000004 (class 4): 0 images" in message
    assert "min_images_per_class=1" in message
    assert "n01000003" not in message
    assert _no_outputs(tmp_path)


def test_empty_class_is_accepted_with_a_warning_when_allowed(tmp_path, classes, caplog):
    path = _with_empty_class(tmp_path, classes)
    caplog.set_level(logging.WARNING, logger="remeanflow.data.preprocess")
    out = tmp_path / "out.zarr"
    report = preprocess_shard(path, out, shard=0, num_shards=1, resolution=RES, workers=0, progress=False,
                              min_images_per_class=0)
    assert report["class_counts"]["n01000004"] == 0 and report["num_images"] == NUM_CLASSES * PER_CLASS
    assert any("n01000004" in r.getMessage() and "min_images_per_class=0" in r.getMessage()
               for r in caplog.records)
    # the merge checks the counts again: parts accepted with 0 are refused by a merge with 1
    merged, csv_path = tmp_path / "images.zarr", tmp_path / "labels.csv"
    with pytest.raises(TooFewImagesError, match=r"n01000004 \(class 4\): 0 images"):
        merge_shards([out], merged, csv_path, progress=False)
    assert not merged.exists() and not csv_path.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    report = merge_shards([out], merged, csv_path, progress=False, min_images_per_class=0)
    assert report["class_counts"]["n01000004"] == 0 and len(report["synsets"]) == 5


def test_class_whose_images_are_all_undecodable_is_an_error(tmp_path, classes):
    classes = dict(classes)
    classes["n01000001"] = [("n01000001_0.JPEG", b"not an image"), ("n01000001_1.JPEG", b"nor this")]
    path = _write_nested(tmp_path / "bad_class.tar", classes)
    with pytest.raises(TooFewImagesError, match=r"n01000001 \(class 1\): 0 images, 2 undecodable"):
        preprocess_shard(path, tmp_path / "out.zarr", shard=0, num_shards=1, resolution=RES, workers=0,
                         progress=False, max_bad_fraction=1.0)
    assert _no_outputs(tmp_path)


def test_min_images_per_class_above_one(archive, tmp_path):
    kw = dict(shard=1, num_shards=2, resolution=RES, workers=0, progress=False)
    report = preprocess_shard(archive, tmp_path / "ok.zarr", min_images_per_class=PER_CLASS, **kw)
    assert report["class_counts"] == {"n01000002": PER_CLASS, "n01000003": PER_CLASS}
    with pytest.raises(TooFewImagesError) as err:
        preprocess_shard(archive, tmp_path / "no.zarr", min_images_per_class=PER_CLASS + 1, **kw)
    message = str(err.value)
    assert "2 class(es)" in message and "n01000002 (class 2): 10 images" in message
    assert "n01000003 (class 3): 10 images" in message
    assert not (tmp_path / "no.zarr").exists()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_min_images_per_class_is_checked_before_any_work(archive, tmp_path, bad):
    with pytest.raises((ValueError, TypeError), match="min_images_per_class"):
        preprocess_shard(archive, tmp_path / "o.zarr", shard=0, num_shards=1, resolution=RES, workers=0,
                         progress=False, min_images_per_class=bad)
    assert _no_outputs(tmp_path)
