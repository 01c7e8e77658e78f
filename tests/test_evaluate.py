"""Tests of the evaluation modules on tiny nets: held-out couplings (`heldout`), pixel statistics
(`reference_stats`), metrics and sharded FID sampling (`evaluate`), the sample grid (`figures`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from remeanflow import (
    checkpoints,
    evaluate,
    fid,
    figures,
    heldout,
    inception,
    networks,
    reference_stats,
    sampling,
)
from remeanflow.data import preprocess
from remeanflow.fileio import sha256_file
from remeanflow.misc import uint8_to_float

CLASSES = 4
HELDOUT = dict(num_samples=24, seed=7, num_classes=CLASSES, heun_steps=3, guidance=1.5, batch=10, progress=False)


def tiny_net(seed: int) -> networks.Precond:
    """A 3-channel tiny EDM2 net; the zero-initialised gains are set so that every path matters."""
    torch.manual_seed(seed)
    net = networks.build("tiny", img_channels=3)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net.eval()


def write_image_store(path, images: np.ndarray, labels: np.ndarray) -> None:
    """An image store in the `data.preprocess` format, written directly."""
    group = zarr.open_group(str(path), mode="w")
    n, _, res, _ = images.shape
    group.create_array("images", shape=images.shape, dtype="uint8", chunks=(5, 3, res, res))[:] = images
    group.create_array("labels", shape=(n,), dtype="int32", chunks=(n,))[:] = labels
    group.create_array("members", shape=(n,), dtype=str, chunks=(n,))[:] = np.array([f"{i}.JPEG" for i in range(n)])
    synsets = [f"n{c:08d}" for c in range(CLASSES)]
    counts = {s: int((labels == c).sum()) for c, s in enumerate(synsets)}
    group.attrs.update(dict(
        format=preprocess.FORMAT, resolution=res, synsets=synsets, class_range=[0, CLASSES], num_images=n,
        num_seen=n, num_bad=0, bad_members=[], class_counts=counts, archive_bytes=0,
    ))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher, guide and an 'initial' net as checkpoints, a held-out set and a tiny image store."""
    root = tmp_path_factory.mktemp("evaluate")
    paths = {name: root / f"{name}.pt" for name in ("teacher", "guide", "initial")}
    for seed, (name, path) in enumerate(paths.items()):
        checkpoints.save_net(path, tiny_net(seed))
    paths["heldout"] = root / "heldout.npz"
    heldout.make_heldout(paths["teacher"], paths["guide"], paths["heldout"], **HELDOUT)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), 5).astype(np.int32)
    images = rng.integers(0, 256, size=(len(labels), 3, 8, 8), dtype=np.uint8)
    paths["images"] = root / "images.zarr"
    write_image_store(paths["images"], images, labels)
    return paths, images


def test_make_heldout_is_deterministic_and_matches_the_samplers(setup, tmp_path):
    paths, _ = setup
    h = heldout.load_heldout(paths["heldout"])
    ids = np.arange(HELDOUT["num_samples"])
    noise = sampling.per_sample_noise(HELDOUT["seed"], ids, (3, 8, 8))
    labels = sampling.per_sample_labels(HELDOUT["seed"], ids, CLASSES)
    assert np.array_equal(h.noise, noise.numpy()) and np.array_equal(h.labels, labels.numpy())
    assert h.attrs["nfe"] == {"teacher_endpoint": 5, "teacher_1step": 1} and h.attrs["guided"]
    assert h.attrs["teacher_sha256"] == sha256_file(paths["teacher"])

    teacher = checkpoints.load_net(paths["teacher"])["net"]
    guide = checkpoints.load_net(paths["guide"])["net"]
    with torch.inference_mode():
        one = sampling.edm_heun(teacher, noise, labels, num_steps=1, guide=guide, guidance=1.5)
        multi = sampling.edm_heun(teacher, noise, labels, num_steps=3, guide=guide, guidance=1.5)
    # Batches of 10 versus one batch of 24: equal up to batch-size-dependent kernel roundoff.
    np.testing.assert_allclose(h.teacher_1step, one.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(h.teacher_endpoint, multi.numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(h.teacher_1step, h.teacher_endpoint, atol=1e-2)  # really different solvers

    again = tmp_path / "again.npz"
    heldout.make_heldout(paths["teacher"], paths["guide"], again, **HELDOUT)
    h2 = heldout.load_heldout(again)
    for key in heldout.HELDOUT_ARRAYS:
        assert np.array_equal(getattr(h, key), getattr(h2, key)), key
    other = tmp_path / "other.npz"
    heldout.make_heldout(paths["teacher"], paths["guide"], other, **dict(HELDOUT, seed=8, num_samples=4))
    assert not np.allclose(heldout.load_heldout(other).noise, h.noise[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "other.npz"]  # no temporaries


def test_make_heldout_rejects_bad_arguments(setup, tmp_path):
    paths, _ = setup
    out = tmp_path / "h.npz"
    with pytest.raises(ValueError, match="num_classes=9"):
        heldout.make_heldout(paths["teacher"], None, out, **dict(HELDOUT, num_classes=9, guidance=1))
    with pytest.raises(ValueError, match="needs a guide"):
        heldout.make_heldout(paths["teacher"], None, out, **HELDOUT)
    assert not out.exists()


def test_load_heldout_errors_name_file_and_key(setup, tmp_path):
    paths, _ = setup
    with np.load(paths["heldout"]) as data:
        arrays = {k: data[k] for k in data.files}
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "teacher_1step"})
    with pytest.raises(ValueError, match=r"bad\.npz: missing key\(s\) \['teacher_1step'\]"):
        heldout.load_heldout(bad)
    np.savez(bad, **dict(arrays, teacher_endpoint=arrays["teacher_endpoint"][:, :2]))
    with pytest.raises(ValueError, match=r"bad\.npz: 'teacher_endpoint' must be"):
        heldout.load_heldout(bad)
    np.savez(bad, **dict(arrays, attrs=np.array(json.dumps({"format": "other"}))))
    with pytest.raises(ValueError, match="attrs format is 'other'"):
        heldout.load_heldout(bad)
    nan = arrays["teacher_1step"].copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(bad, **dict(arrays, teacher_1step=nan))
    with pytest.raises(ValueError, match="'teacher_1step' contains NaN"):
        heldout.load_heldout(bad)


def test_pixel_stats_of_uint8_and_float_images_agree(setup):
    _, images = setup
    mu, sigma = reference_stats.pixel_stats(images)
    mu_f, sigma_f = reference_stats.pixel_stats(uint8_to_float(images))  # exact round trip through the uint8 grid
    assert np.array_equal(mu, mu_f) and np.array_equal(sigma, sigma_f)
    assert mu.shape == (3 * 8 * 8,)
    np.testing.assert_allclose(mu, uint8_to_float(images).reshape(len(images), -1).double().mean(0).numpy())
    mu_small, sigma_small = reference_stats.pixel_stats(images, resolution=4)
    assert mu_small.shape == (3 * 4 * 4,) and sigma_small.shape == (48, 48)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        reference_stats.pixel_stats(images[0])


def test_reference_pixel_stats_read_the_store_in_chunks(setup):
    paths, images = setup
    for got, want in [
        (reference_stats.reference_pixel_stats(paths["images"], progress=False), reference_stats.pixel_stats(images)),
        # 8 of 20 rows, evenly spaced, across chunks of 5: 0, 2, 5, 7, 10, 12, 15, 17.
        (reference_stats.reference_pixel_stats(paths["images"], 8, progress=False),
         reference_stats.pixel_stats(images[[0, 2, 5, 7, 10, 12, 15, 17]])),
    ]:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-12)
    assert reference_stats.reference_rows(20, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]


def test_perfect_generator_has_zero_error_and_lower_distance_than_noise(setup, tmp_path):
    paths, _ = setup
    h = heldout.load_heldout(paths["heldout"])
    # Reference: the teacher's own distribution, from a held-out set under another seed.
    ref_path = tmp_path / "ref.npz"
    heldout.make_heldout(paths["teacher"], paths["guide"], ref_path, **dict(HELDOUT, seed=99, num_samples=64))
    ref = reference_stats.pixel_stats(heldout.load_heldout(ref_path).teacher_endpoint)
    perfect = evaluate.evaluate_generator("perfect", h.teacher_endpoint, h, ref, nfe=5)
    assert perfect == dict(name="perfect", fd_pixels=perfect["fd_pixels"], mse_vs_teacher=0.0, nfe=5, num_samples=24)
    noisy = evaluate.evaluate_generator("noise", h.noise, paths["heldout"], ref, nfe=0)
    assert noisy["mse_vs_teacher"] == pytest.approx(np.mean((h.noise.astype(float) - h.teacher_endpoint) ** 2))
    assert 0 <= perfect["fd_pixels"] < noisy["fd_pixels"]
    assert evaluate.evaluate_generator("no ref", h.noise, h, None, nfe=1)["fd_pixels"] is None
    with pytest.raises(ValueError, match="wrong: samples have shape"):
        evaluate.evaluate_generator("wrong", h.noise[:3], h, ref, nfe=1)


def test_save_grid_layout(tmp_path):
    images = torch.full((5, 3, 2, 2), -1.0)
    images[4] = 1.0  # last image white: row 1, column 1 of a 4-wide grid
    size = figures.save_grid(images, tmp_path / "g.png", nrow=4, scale=3, pad=1, pad_value=128)
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    # 4 columns and 2 rows of 6 px tiles, 1 px separators and frame.
    assert size == (4 * 6 + 5, 2 * 6 + 3) and pixels.shape == (15, 29, 3)
    assert (pixels[1:7, 1:7] == 0).all() and (pixels[8:14, 1:7] == 255).all()
    assert (pixels[0] == 128).all() and (pixels[:, 7] == 128).all()
    assert (pixels[8:14, 8:14] == 128).all()  # an empty cell stays separator-coloured
    with pytest.raises(ValueError, match="1 or 3"):
        figures.save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png", nrow=2)
    assert not (tmp_path / "bad.png").exists()


def test_evaluate_checkpoint_writes_metrics_and_grid(setup, tmp_path):
    paths, _ = setup
    out_json, out_png = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "grid.png"
    returned = evaluate.evaluate_checkpoint(
        paths["teacher"], paths["heldout"], paths["images"], out_json, out_png, batch=7,
        teacher_path=paths["teacher"], initial_path=paths["initial"], device="cpu", progress=False,
    )
    metrics = json.loads(out_json.read_text())
    assert metrics == returned
    rows = {r["name"]: r for r in metrics["rows"]}
    assert list(rows) == ["one_step", "initial_one_step", "teacher_1step", "teacher_endpoint"]
    assert rows["teacher_endpoint"]["mse_vs_teacher"] == 0.0
    assert [rows[k]["nfe"] for k in rows] == [1, 1, 1, 5]
    assert all(np.isfinite(r["fd_pixels"]) and r["fd_pixels"] >= 0 for r in rows.values())

    h = heldout.load_heldout(paths["heldout"])
    teacher = checkpoints.load_net(paths["teacher"])["net"]
    with torch.inference_mode():
        one_step = sampling.one_step(teacher, torch.from_numpy(h.noise), torch.from_numpy(h.labels)).numpy()
    ref = reference_stats.reference_pixel_stats(paths["images"], progress=False)
    want = evaluate.evaluate_generator("one_step", one_step, h, ref, nfe=1)
    assert rows["one_step"]["mse_vs_teacher"] == pytest.approx(want["mse_vs_teacher"], rel=1e-5)
    assert rows["one_step"]["fd_pixels"] == pytest.approx(want["fd_pixels"], rel=1e-3)
    assert rows["teacher_1step"]["mse_vs_teacher"] == pytest.approx(
        np.mean((h.teacher_1step.astype(float) - h.teacher_endpoint) ** 2), rel=1e-12)
    assert rows["initial_one_step"]["mse_vs_teacher"] != pytest.approx(rows["one_step"]["mse_vs_teacher"])

    assert metrics["num_samples"] == 24 and metrics["seed"] == HELDOUT["seed"] and metrics["fid"] is None
    assert evaluate.FID_SKIPPED in metrics["notes"]
    assert metrics["checkpoints"]["net"] == sha256_file(paths["teacher"])
    assert metrics["checkpoints"]["initial"] == sha256_file(paths["initial"])
    assert metrics["checkpoints"]["guide"] == sha256_file(paths["guide"])
    assert metrics["reference"]["num_images"] == 20

    grid = metrics["grid"]
    assert grid["panels"] == list(rows)
    k = len(grid["sample_index"])  # 2 per class present among the 24 held-out labels
    assert k == 2 * len(np.unique(h.labels)) and grid["labels"] == h.labels[grid["sample_index"]].tolist()
    # 4 panels of (classes x 2) cells, 8 px images upscaled 8x to 64 px, 1 px apart, 12 px between
    # panels, a title line above and class names ("class N": 7 characters of 6 px) on the left
    cell, classes = 64 + 1, k // 2
    with Image.open(out_png) as image:
        assert image.size == tuple(grid["size"]) == (7 * 6 + 12 + 4 * (2 * cell + 1) + 3 * 12,
                                                     figures.LABEL_PX + classes * cell + 1)
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["grid.png", "metrics.json"]


def test_evaluate_checkpoint_refuses_a_heldout_set_of_another_teacher(setup, tmp_path):
    paths, _ = setup
    with pytest.raises(ValueError, match="was made by teacher sha256"):
        evaluate.evaluate_checkpoint(
            paths["teacher"], paths["heldout"], paths["images"], tmp_path / "m.json", tmp_path / "g.png",
            teacher_path=paths["initial"], device="cpu", progress=False,
        )
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Sampled evaluation in shards.


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from test_inception import random_inception

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(random_inception(0).state_dict(), path)
    return path


SHARDED = dict(num_samples=6, seed=11, num_classes=CLASSES, batch=4, device="cpu", progress=False)


def _shards(setup, out_dir, num_shards, **extra) -> list:
    paths, _ = setup
    parts = [out_dir / f"shard-{k:05d}.npz" for k in range(num_shards)]
    for k, part in enumerate(parts):
        evaluate.sample_shard(paths["teacher"], part, shard=k, num_shards=num_shards, **SHARDED, **extra)
    return parts


def test_shard_ranges_partition_the_sample_ids():
    for n, k in [(10, 1), (10, 3), (7, 7), (50_000, 8)]:
        ranges = [evaluate.shard_range(n, i, k) for i in range(k)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="exceeds num_samples"):
        evaluate.shard_range(3, 0, 4)
    with pytest.raises(ValueError, match=r"shard must be an integer in \[0, 2\)"):
        evaluate.shard_range(3, 2, 2)


def test_one_and_four_shards_give_the_same_samples_features_and_distances(setup, inception_weights, tmp_path):
    """Inception features per sample id do not depend on the sharding, so neither does FID (the
    FID itself, 1 shard vs Snakemake's shards, is compared in test_eval_workflow.py: a 2048-d
    Fréchet distance costs seconds). The pixel distance is compared here."""
    paths, _ = setup
    pix = tmp_path / "pix.npz"
    fid.save_stats(pix, *reference_stats.reference_pixel_stats(paths["images"], progress=False))
    for d in ("one", "four"):
        (tmp_path / d).mkdir()
    one = _shards(setup, tmp_path / "one", 1, inception_weights=inception_weights)
    four = _shards(setup, tmp_path / "four", 4, inception_weights=inception_weights)
    assert [evaluate.load_shard(p).sample_ids.tolist() for p in four] == [[0], [1, 2], [3], [4, 5]]
    a, b = evaluate.merge_shards(one, 6), evaluate.merge_shards(four[::-1], 6)  # any order
    assert a.attrs["features"] == {"pixels": 192, "inception": 2048} and b.attrs["num_shards"] == 4
    assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.labels, b.labels)
    for name in ("pixels", "inception"):
        np.testing.assert_allclose(a.features[name], b.features[name], rtol=1e-5, atol=1e-5)

    # The samples are the net's one-step samples for per-sample noise and classes of seed 11.
    ids = np.arange(6)
    labels = sampling.per_sample_labels(11, ids, CLASSES)
    teacher = checkpoints.load_net(paths["teacher"])["net"]
    with torch.inference_mode():
        x = sampling.one_step(teacher, sampling.per_sample_noise(11, ids, (3, 8, 8)), labels)
    assert np.array_equal(a.labels, labels.numpy())
    model = inception.load_inception(inception_weights, device="cpu")
    np.testing.assert_allclose(a.features["inception"], inception.extract_features(model, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.features["pixels"], reference_stats.pixel_features(x), atol=1e-6)

    # Pixel-only shards (no Inception weights): the same distance for 1 and 4 shards, FID skipped.
    for d in ("p1", "p4"):
        (tmp_path / d).mkdir()
    m1, m4 = (evaluate.sampled_metrics(_shards(setup, tmp_path / d, k), num_samples=6, pixel_ref=pix)
              for d, k in (("p1", 1), ("p4", 4)))
    assert m1["fd_pixels"] > 0 and m4["fd_pixels"] == pytest.approx(m1["fd_pixels"], rel=1e-6)
    assert m1["fid"] is None and evaluate.FID_SKIPPED in m1["notes"] and sum(m1["class_counts"]) == 6
    assert m1["pixel_reference"]["sha256"] == sha256_file(pix) and m4["num_shards"] == 4

    # The merged metrics land in metrics.json next to the held-out ones.
    metrics = evaluate.evaluate_checkpoint(
        paths["teacher"], paths["heldout"], paths["images"], tmp_path / "m.json", tmp_path / "g.png",
        teacher_path=paths["teacher"], pixel_ref_stats=pix, sampled=m4, device="cpu", progress=False,
    )
    assert metrics["sampled"] == m4 and metrics["fid"] is None and evaluate.FID_SKIPPED in metrics["notes"]
    assert metrics["reference"]["stats"] == str(pix)
    rows = {r["name"]: r for r in metrics["rows"]}
    h = heldout.load_heldout(paths["heldout"])
    want = evaluate.evaluate_generator("x", h.teacher_endpoint, h, fid.load_stats(pix), nfe=5)
    assert rows["teacher_endpoint"]["fd_pixels"] == pytest.approx(want["fd_pixels"], rel=1e-9)
    with pytest.raises(ValueError, match="sampled metrics are of net sha256"):
        evaluate.evaluate_checkpoint(
            paths["initial"], paths["heldout"], paths["images"], tmp_path / "m2.json", tmp_path / "g2.png",
            pixel_ref_stats=pix, sampled=m4, device="cpu", progress=False,
        )
    assert not (tmp_path / "m2.json").exists()


def test_reference_inception_stats_stream_the_store(setup, inception_weights):
    paths, images = setup
    model = inception.load_inception(inception_weights, device="cpu")
    rows = reference_stats.reference_rows(len(images), 4)  # evenly spaced, across chunks of 5
    got = reference_stats.reference_inception_stats(paths["images"], model, 4, batch=3, progress=False)
    want = fid.gaussian_stats(inception.extract_features(model, images[rows]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_merge_shards_demands_exactly_the_configured_samples(setup, tmp_path):
    paths, _ = setup
    for d in ("two", "three"):
        (tmp_path / d).mkdir()
    two = _shards(setup, tmp_path / "two", 2)
    three = _shards(setup, tmp_path / "three", 3)
    # Without Inception weights: pixel features only, FID None and the reason in the notes.
    metrics = evaluate.sampled_metrics(two, num_samples=6)
    assert metrics["fid"] is None and evaluate.FID_SKIPPED in metrics["notes"] and metrics["fd_pixels"] is None
    with pytest.raises(ValueError, match="shard-00001.npz: num_shards is 3, but .*shard-00000.npz has 2"):
        evaluate.merge_shards([two[0], three[1]], 6)
    with pytest.raises(ValueError, match=r"overlap: 3 sample id\(s\) appear twice, e.g. 0 in .*shard-00000.npz and"):
        evaluate.merge_shards([two[0], two[0]], 6)
    with pytest.raises(ValueError, match=r"3 missing \(e.g. \[3, 4, 5\]\)"):
        evaluate.merge_shards(two[:1], 6)
    with pytest.raises(ValueError, match="made for 6 samples, expected exactly 7"):
        evaluate.merge_shards(two, 7)
    other = tmp_path / "other.npz"
    evaluate.sample_shard(paths["initial"], other, shard=1, num_shards=2, **SHARDED)
    with pytest.raises(ValueError, match="other.npz: net_sha256 is"):
        evaluate.merge_shards([two[0], other], 6)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        evaluate.sampled_metrics(two, num_samples=6, pixel_ref=tmp_path / "missing.npz")
    with np.load(two[0]) as data:
        arrays = {k: data[k] for k in data.files}
    # A shard with Inception features needs FID reference statistics.
    attrs = json.loads(str(arrays["attrs"]))
    attrs.update(num_shards=1, sample_ids=[0, 3], num_samples=3, features={"pixels": 192, "inception": 2048})
    np.savez(tmp_path / "inc.npz", **dict(arrays, f_inception=np.ones((3, 2048), np.float32),
                                          attrs=np.array(json.dumps(attrs))))
    with pytest.raises(ValueError, match="Inception features but no FID reference statistics"):
        evaluate.sampled_metrics([tmp_path / "inc.npz"], num_samples=3)
    np.savez(tmp_path / "bad.npz", **dict(arrays, f_pixels=arrays["f_pixels"][:, :5]))
    with pytest.raises(ValueError, match=r"bad\.npz: 'f_pixels' must be finite \[3, 192\]"):
        evaluate.load_shard(tmp_path / "bad.npz")


def test_evaluation_precision_is_applied_and_recorded_honestly(setup, inception_weights, tmp_path):
    """evaluate.precision runs the one-step net under autocast and says so; Inception stays fp32;
    the held-out teacher takes the couplings' precision."""
    paths, _ = setup
    fp32, bf16 = (tmp_path / f"{p}.npz" for p in ("fp32", "bf16"))
    for precision, out in (("fp32", fp32), ("bf16", bf16)):
        evaluate.sample_shard(paths["teacher"], out, shard=0, num_shards=1, **SHARDED, precision=precision,
                              inception_weights=inception_weights)
    a, b = evaluate.load_shard(fp32), evaluate.load_shard(bf16)
    assert a.attrs["precision"] == {"sampling": "fp32", "inception": "fp32"}
    assert b.attrs["precision"] == {"sampling": "bf16 autocast", "inception": "fp32"}
    pa, pb = a.features["pixels"], b.features["pixels"]
    assert not np.array_equal(pa, pb) and np.abs(pa - pb).max() < 0.1 * np.abs(pa).max()  # ran in bf16, close
    with pytest.raises(ValueError, match="evaluate.precision"):
        evaluate.sample_shard(paths["teacher"], tmp_path / "x.npz", shard=0, num_shards=1, **SHARDED, precision="fp8")
    # the held-out teacher in bf16: other endpoints, recorded
    out = tmp_path / "heldout_bf16.npz"
    attrs = heldout.make_heldout(paths["teacher"], paths["guide"], out, **HELDOUT, precision="bf16")
    assert attrs["precision"] == "bf16 autocast" and heldout.load_heldout(paths["heldout"]).attrs["precision"] == "fp32"
    assert not np.array_equal(heldout.load_heldout(out).teacher_endpoint,
                              heldout.load_heldout(paths["heldout"]).teacher_endpoint)


def test_precision_record_names_tf32_on_cuda():
    from remeanflow import accel

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert accel.precision_record("cuda", "fp32") == "fp32 (cuda; TF32 convolutions)"
        torch.backends.cudnn.allow_tf32 = False
        assert accel.precision_record("cuda", "fp32") == "fp32 (cuda, TF32 off)"
        assert accel.precision_record("cuda:0", "bf16") == "bf16 autocast (cuda)"
        assert accel.precision_record("cpu", "fp32") == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
