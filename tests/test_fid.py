"""Tests of remeanflow.fid: Gaussian statistics, the Fréchet distance and the statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from conftest import PYTORCH_FID_PYTHON, pytorch_fid_python

from remeanflow import fid
from remeanflow.fileio import sha256_file


def random_spd(rng: np.random.Generator, d: int, cond: float = 10.0) -> np.ndarray:
    """A symmetric positive-definite matrix with eigenvalues spread over [1, cond]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, cond, d)) @ q.T


def direct_fd(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric PSD
    matrix whose root is taken through its eigenvalues."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_gaussian_stats_match_numpy():
    x = np.random.default_rng(0).standard_normal((50, 6)) * 3 + 100  # large mean: no cancellation
    mu, sigma = fid.gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_running_stats_in_batches_equal_whole():
    x = np.random.default_rng(1).standard_normal((37, 5)) + 5
    running = fid.RunningStats()
    for lo in range(0, 37, 8):
        running.update(x[lo : lo + 8])
    assert running.count == 37
    mu, sigma = running.finalize()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dimension changed"):
        running.update(np.zeros((2, 4)))


@pytest.mark.parametrize("bad", [np.zeros((1, 3)), np.zeros(3), np.full((4, 2), np.nan)])
def test_gaussian_stats_reject_bad_features(bad):
    with pytest.raises(ValueError):
        fid.gaussian_stats(bad)


def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=30)
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    assert value == pytest.approx(direct_fd(mu1, s1, mu2, s2), rel=1e-8)
    # Symmetric in its two arguments.
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(value, rel=1e-8)
    # Commuting covariances (both diagonal) have the closed form sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = np.random.default_rng(3).standard_normal((400, 8))
    mu, sigma = fid.gaussian_stats(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    direction = np.ones(8) / np.sqrt(8)
    values = [fid.frechet_distance(*fid.gaussian_stats(x + k * direction), mu, sigma) for k in (0.1, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # A pure shift leaves the covariance unchanged: the distance is the squared shift.
    assert values[-1] == pytest.approx(4.0, rel=1e-8)


def test_frechet_distance_with_singular_covariances():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 30)), rng.standard_normal((12, 30)) * 1.5 + 0.2  # N < D: rank-deficient
    s1, s2 = fid.gaussian_stats(a), fid.gaussian_stats(b)
    value = fid.frechet_distance(*s1, *s2)
    assert np.isfinite(value)
    assert value == pytest.approx(direct_fd(*s1, *s2), rel=1e-3)
    # Constant features: an all-zero covariance block.
    zero = np.zeros((30, 30))
    assert fid.frechet_distance(s1[0], zero, s1[0], zero) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_schur_square_root_formula():
    """pytorch-fid's route (scipy's Schur square root of S1 S2) on regular statistics."""
    rng = np.random.default_rng(6)
    for d in (5, 40):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d, cond=50), random_spd(rng, d, cond=5) * 3
        schur = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(schur, rel=1e-9)


def test_frechet_distance_matches_pytorch_fid(pytorch_fid):
    rng = np.random.default_rng(7)
    dims = (8, 64, 256)
    stats = {}
    for d in dims:
        x, y = rng.standard_normal((4 * d, d)), rng.standard_normal((3 * d, d)) @ rng.standard_normal((d, d)) * 0.3 + 1
        stats[f"mu1_{d}"], stats[f"s1_{d}"] = fid.gaussian_stats(x)
        stats[f"mu2_{d}"], stats[f"s2_{d}"] = fid.gaussian_stats(y)
    theirs = pytorch_fid("""
        for d in inputs["dims"]:
            args = [inputs[f"{key}_{d}"] for key in ("mu1", "s1", "mu2", "s2")]
            outputs[f"fd_{d}"] = np.array(fid_score.calculate_frechet_distance(*args))
    """, dims=np.array(dims), **stats)
    for d in dims:
        got = fid.frechet_distance(stats[f"mu1_{d}"], stats[f"s1_{d}"], stats[f"mu2_{d}"], stats[f"s2_{d}"])
        assert got == pytest.approx(float(theirs[f"fd_{d}"]), rel=1e-7), d


def test_the_pytorch_fid_comparison_fails_in_ci_without_its_environment(monkeypatch, tmp_path):
    """Skipping it there would let CI pass without the one check that ties our FID to the paper's."""
    monkeypatch.delenv(PYTORCH_FID_PYTHON, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{PYTORCH_FID_PYTHON} is not set.*pytorch_fid_env.sh"):
        pytorch_fid_python()
    monkeypatch.setenv(PYTORCH_FID_PYTHON, str(tmp_path / "missing" / "python"))
    with pytest.raises(pytest.fail.Exception, match="is not an executable"):
        pytorch_fid_python()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="is not an executable"):
        pytorch_fid_python()


def test_frechet_distance_rejects_invalid_covariances_and_bad_shapes():
    eye = np.eye(3)
    with pytest.raises(ValueError, match=r"second statistics.* not positive semi-definite \(smallest eigenvalue -1"):
        fid.frechet_distance(np.zeros(3), eye, np.zeros(3), -eye)
    with pytest.raises(ValueError, match=r"first statistics: sigma is not positive semi-definite"):
        fid.frechet_distance(np.zeros(3), np.diag([1.0, -0.5, 1.0]), np.zeros(3), eye)
    with pytest.raises(ValueError, match=r"first statistics: sigma is not symmetric"):
        fid.frechet_distance(np.zeros(3), eye + np.triu(np.ones((3, 3)), 1) * 0.1, np.zeros(3), eye)
    with pytest.raises(ValueError, match="different dimension"):
        fid.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma must be"):
        fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.array([0, np.nan, 0]), eye, np.zeros(3), eye)


def test_stats_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(4), random_spd(rng, 4)
    path = tmp_path / "ref.npz"
    fid.save_stats(path, mu, sigma)
    assert sorted(np.load(path).files) == ["mu", "sigma"]  # pytorch-fid keys, nothing else
    mu2, sigma2 = fid.load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporaries left

    with pytest.raises(ValueError, match="sigma must be"):
        fid.save_stats(tmp_path / "bad.npz", mu, sigma[:3])
    assert not (tmp_path / "bad.npz").exists()

    cases = {
        "shape.npz": dict(mu=mu, sigma=np.ones((4, 3))),
        "mu2d.npz": dict(mu=np.ones((2, 2)), sigma=np.eye(2)),
        "nan.npz": dict(mu=mu, sigma=np.full((4, 4), np.nan)),
        "nokey.npz": dict(mu=mu),
    }
    messages = {"shape.npz": "sigma must be", "mu2d.npz": "mu must be", "nan.npz": "sigma contains NaN",
                "nokey.npz": r"missing key\(s\) \['sigma'\]"}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=messages[name]) as err:
            fid.load_stats(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable"):
        fid.load_stats(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_stats(tmp_path / "missing.npz")


def test_check_and_fetch_reference_stats(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = rng.standard_normal(6), random_spd(rng, 6)
    good = tmp_path / "good.npz"
    fid.save_stats(good, mu, sigma)
    got = fid.check_reference_stats(good, 6)
    assert np.array_equal(got[0], mu) and np.allclose(got[1], sigma, rtol=0, atol=1e-15)

    bad = {
        "dim.npz": (dict(mu=mu[:5], sigma=sigma[:5, :5]), r"mu has shape \(5,\), expected \(6,\)"),
        "asym.npz": (dict(mu=mu, sigma=sigma + np.triu(np.ones((6, 6)), 1)), "sigma is not symmetric"),
        "neg.npz": (dict(mu=mu, sigma=sigma - 20 * np.eye(6)), "not positive semi-definite"),
        "nan.npz": (dict(mu=mu * np.nan, sigma=sigma), "mu contains NaN"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message) as err:
            fid.check_reference_stats(tmp_path / name, 6)
        assert name in str(err.value)

    # Fetched through the real download path (file:// URL), checksum included.
    dest = tmp_path / "fid" / "ref_stats.npz"
    digest = fid.fetch_reference_stats(good.as_uri(), dest, 6, sha256=sha256_file(good), progress=False)
    assert digest == sha256_file(dest) == sha256_file(good)
    with pytest.raises(ValueError, match=r"asym\.npz \(fetched to .*ref2\.npz\) failed its check: .*not symmetric"):
        fid.fetch_reference_stats(tmp_path / "asym.npz", tmp_path / "fid" / "ref2.npz", 6, progress=False)
    with pytest.raises(ValueError, match="dim"):
        fid.fetch_reference_stats(tmp_path / "dim.npz", tmp_path / "fid" / "ref2.npz", 6, progress=False)
    assert sorted(p.name for p in (tmp_path / "fid").iterdir()) == ["ref_stats.npz", "ref_stats.npz.sha256"]
