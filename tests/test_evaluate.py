"""Tests of remeanflow.evaluate on tiny nets: held-out couplings, pixel statistics, metrics, grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from remeanflow import checkpoints, evaluate, networks, sampling
from remeanflow.data import preprocess
from remeanflow.teacher import uint8_to_float

CLASSES = 4
HELDOUT = dict(num_samples=24, seed=7, num_classes=CLASSES, heun_steps=3, guidance=1.5, batch=10, progress=False)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny nets gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    evaluate.make_heldout(paths["teacher"], paths["guide"], paths["heldout"], **HELDOUT)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), 5).astype(np.int32)
    images = rng.integers(0, 256, size=(len(labels), 3, 8, 8), dtype=np.uint8)
    paths["images"] = root / "images.zarr"
    write_image_store(paths["images"], images, labels)
    return paths, images


def test_make_heldout_is_deterministic_and_matches_the_samplers(setup, tmp_path):
    paths, _ = setup
    h = evaluate.load_heldout(paths["heldout"])
    ids = np.arange(HELDOUT["num_samples"])
    noise = sampling.per_sample_noise(HELDOUT["seed"], ids, (3, 8, 8))
    labels = sampling.per_sample_labels(HELDOUT["seed"], ids, CLASSES)
    assert np.array_equal(h.noise, noise.numpy()) and np.array_equal(h.labels, labels.numpy())
    assert h.attrs["nfe"] == {"teacher_endpoint": 5, "teacher_1step": 1} and h.attrs["guided"]
    assert h.attrs["teacher_sha256"] == checkpoints.sha256_file(paths["teacher"])

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
    evaluate.make_heldout(paths["teacher"], paths["guide"], again, **HELDOUT)
    h2 = evaluate.load_heldout(again)
    for key in evaluate.HELDOUT_ARRAYS:
        assert np.array_equal(getattr(h, key), getattr(h2, key)), key
    other = tmp_path / "other.npz"
    evaluate.make_heldout(paths["teacher"], paths["guide"], other, **dict(HELDOUT, seed=8, num_samples=4))
    assert not np.allclose(evaluate.load_heldout(other).noise, h.noise[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "other.npz"]  # no temporaries


def test_make_heldout_rejects_bad_arguments(setup, tmp_path):
    paths, _ = setup
    out = tmp_path / "h.npz"
    with pytest.raises(ValueError, match="num_classes=9"):
        evaluate.make_heldout(paths["teacher"], None, out, **dict(HELDOUT, num_classes=9, guidance=1))
    with pytest.raises(ValueError, match="needs a guide"):
        evaluate.make_heldout(paths["teacher"], None, out, **HELDOUT)
    assert not out.exists()


def test_load_heldout_errors_name_file_and_key(setup, tmp_path):
    paths, _ = setup
    with np.load(paths["heldout"]) as data:
        arrays = {k: data[k] for k in data.files}
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "teacher_1step"})
    with pytest.raises(ValueError, match=r"bad\.npz: missing key\(s\) \['teacher_1step'\]"):
        evaluate.load_heldout(bad)
    np.savez(bad, **dict(arrays, teacher_endpoint=arrays["teacher_endpoint"][:, :2]))
    with pytest.raises(ValueError, match=r"bad\.npz: 'teacher_endpoint' must be"):
        evaluate.load_heldout(bad)
    np.savez(bad, **dict(arrays, attrs=np.array(json.dumps({"format": "other"}))))
    with pytest.raises(ValueError, match="attrs format is 'other'"):
        evaluate.load_heldout(bad)
    nan = arrays["teacher_1step"].copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(bad, **dict(arrays, teacher_1step=nan))
    with pytest.raises(ValueError, match="'teacher_1step' contains NaN"):
        evaluate.load_heldout(bad)


def test_pixel_stats_of_uint8_and_float_images_agree(setup):
    _, images = setup
    mu, sigma = evaluate.pixel_stats(images)
    mu_f, sigma_f = evaluate.pixel_stats(uint8_to_float(images))  # exact round trip through the uint8 grid
    assert np.array_equal(mu, mu_f) and np.array_equal(sigma, sigma_f)
    assert mu.shape == (3 * 8 * 8,)
    np.testing.assert_allclose(mu, uint8_to_float(images).reshape(len(images), -1).double().mean(0).numpy())
    mu_small, sigma_small = evaluate.pixel_stats(images, resolution=4)
    assert mu_small.shape == (3 * 4 * 4,) and sigma_small.shape == (48, 48)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        evaluate.pixel_stats(images[0])


def test_reference_pixel_stats_read_the_store_in_chunks(setup):
    paths, images = setup
    for got, want in [
        (evaluate.reference_pixel_stats(paths["images"], progress=False), evaluate.pixel_stats(images)),
        # 8 of 20 rows, evenly spaced, across chunks of 5: 0, 2, 5, 7, 10, 12, 15, 17.
        (evaluate.reference_pixel_stats(paths["images"], 8, progress=False),
         evaluate.pixel_stats(images[[0, 2, 5, 7, 10, 12, 15, 17]])),
    ]:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-12)
    assert evaluate.reference_rows(20, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]


def test_perfect_generator_has_zero_error_and_lower_distance_than_noise(setup, tmp_path):
    paths, _ = setup
    h = evaluate.load_heldout(paths["heldout"])
    # Reference: the teacher's own distribution, from a held-out set under another seed.
    ref_path = tmp_path / "ref.npz"
    evaluate.make_heldout(paths["teacher"], paths["guide"], ref_path, **dict(HELDOUT, seed=99, num_samples=64))
    ref = evaluate.pixel_stats(evaluate.load_heldout(ref_path).teacher_endpoint)
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
    size = evaluate.save_grid(images, tmp_path / "g.png", nrow=4, scale=3, pad=1, pad_value=128)
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    # 4 columns and 2 rows of 6 px tiles, 1 px separators and frame.
    assert size == (4 * 6 + 5, 2 * 6 + 3) and pixels.shape == (15, 29, 3)
    assert (pixels[1:7, 1:7] == 0).all() and (pixels[8:14, 1:7] == 255).all()
    assert (pixels[0] == 128).all() and (pixels[:, 7] == 128).all()
    assert (pixels[8:14, 8:14] == 128).all()  # an empty cell stays separator-coloured
    with pytest.raises(ValueError, match="1 or 3"):
        evaluate.save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png", nrow=2)
    assert not (tmp_path / "bad.png").exists()


def test_evaluate_checkpoint_writes_metrics_and_grid(setup, tmp_path):
    paths, _ = setup
    out_json, out_png = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "grid.png"
    returned = evaluate.evaluate_checkpoint(
        paths["teacher"], paths["heldout"], paths["images"], out_json, out_png, batch=7,
        teacher_path=paths["teacher"], initial_path=paths["initial"], grid_scale=4, device="cpu", progress=False,
    )
    metrics = json.loads(out_json.read_text())
    assert metrics == returned
    rows = {r["name"]: r for r in metrics["rows"]}
    assert list(rows) == ["one_step", "initial_one_step", "teacher_1step", "teacher_endpoint"]
    assert rows["teacher_endpoint"]["mse_vs_teacher"] == 0.0
    assert [rows[k]["nfe"] for k in rows] == [1, 1, 1, 5]
    assert all(np.isfinite(r["fd_pixels"]) and r["fd_pixels"] >= 0 for r in rows.values())

    h = evaluate.load_heldout(paths["heldout"])
    teacher = checkpoints.load_net(paths["teacher"])["net"]
    with torch.inference_mode():
        one_step = sampling.one_step(teacher, torch.from_numpy(h.noise), torch.from_numpy(h.labels)).numpy()
    ref = evaluate.reference_pixel_stats(paths["images"], progress=False)
    want = evaluate.evaluate_generator("one_step", one_step, h, ref, nfe=1)
    assert rows["one_step"]["mse_vs_teacher"] == pytest.approx(want["mse_vs_teacher"], rel=1e-5)
    assert rows["one_step"]["fd_pixels"] == pytest.approx(want["fd_pixels"], rel=1e-3)
    assert rows["teacher_1step"]["mse_vs_teacher"] == pytest.approx(
        np.mean((h.teacher_1step.astype(float) - h.teacher_endpoint) ** 2), rel=1e-12)
    assert rows["initial_one_step"]["mse_vs_teacher"] != pytest.approx(rows["one_step"]["mse_vs_teacher"])

    assert metrics["num_samples"] == 24 and metrics["seed"] == HELDOUT["seed"] and metrics["fid"] is None
    assert evaluate.FID_SKIPPED in metrics["notes"]
    assert metrics["checkpoints"]["net"] == checkpoints.sha256_file(paths["teacher"])
    assert metrics["checkpoints"]["initial"] == checkpoints.sha256_file(paths["initial"])
    assert metrics["checkpoints"]["guide"] == checkpoints.sha256_file(paths["guide"])
    assert metrics["reference"]["num_images"] == 20

    grid = metrics["grid"]
    assert grid["columns"] == list(rows)
    k = len(grid["sample_index"])  # 2 per class present among the 24 held-out labels
    assert k == 2 * len(np.unique(h.labels)) and grid["labels"] == h.labels[grid["sample_index"]].tolist()
    with Image.open(out_png) as image:
        assert image.size == tuple(grid["size"]) == (4 * 32 + 5, k * 32 + k + 1)
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["grid.png", "metrics.json"]


def test_evaluate_checkpoint_refuses_a_heldout_set_of_another_teacher(setup, tmp_path):
    paths, _ = setup
    with pytest.raises(ValueError, match="was made by teacher sha256"):
        evaluate.evaluate_checkpoint(
            paths["teacher"], paths["heldout"], paths["images"], tmp_path / "m.json", tmp_path / "g.png",
            teacher_path=paths["initial"], device="cpu", progress=False,
        )
    assert not any(tmp_path.iterdir())
