"""Fréchet distance between Gaussians fitted to feature sets, and the statistics files it reads.

The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is

    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),

which is FID when the features are InceptionV3 pool activations (Heusel et al. 2017). The
statistics follow pytorch-fid: mean and unbiased covariance (``np.cov(rowvar=False)``, ddof = 1)
in float64, stored as an ``.npz`` with keys ``mu`` [D] and ``sigma`` [D, D], so the published
reference statistics (e.g. the ImageNet 64/512 files) load unchanged.

The InceptionV3 feature extractor itself is not part of this module yet.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg

from .fileio import atomic_path

# pytorch-fid accepts a complex square root whose diagonal is real up to this much (the imaginary
# part comes from roundoff on near-singular products); anything larger means the statistics are bad.
IMAG_ATOL = 1e-3

# Relative residual ||X X - A||_F / ||A||_F above which a square root counts as failed, so that the
# eps-regularised retry is used (the Schur method can lose accuracy on singular products).
SQRTM_RTOL = 1e-3

# ----------------------------------------------------------------------------------------------
# Gaussian statistics.


class RunningStats:
    """Streaming mean and unbiased covariance of feature rows, in float64.

    Sums are taken around a fixed shift (the first batch's mean) rather than around zero, so that
    sum(x x^T) - n mu mu^T does not cancel catastrophically when |mu| is large against the spread.
    With one batch the result equals ``np.mean`` / ``np.cov(rowvar=False)`` up to roundoff.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> RunningStats:
        """Add a batch of feature rows [B, D]; returns self so that calls can be chained."""
        x = _as_features(features)
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {x.shape[1]}")
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) of everything added so far; needs at least two rows."""
        if self.count < 2:
            raise ValueError(f"Gaussian statistics need at least 2 feature rows, got {self.count}")
        mean_centred = self._sum / self.count
        mu = self._shift + mean_centred
        sigma = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return mu, sigma


def _as_features(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of feature rows [N, D] (N >= 2), float64, ddof = 1 as pytorch-fid."""
    return RunningStats().update(features).finalize()


# ----------------------------------------------------------------------------------------------
# Fréchet distance.


def _check_pair(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of one (mu, sigma) pair after checking shapes and finiteness."""
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"{what}: mu must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: sigma must be [D, D] = {(mu.shape[0],) * 2} to match mu, got shape {sigma.shape}")
    for key, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            raise ValueError(f"{what}: {key} contains NaN or infinite values")
    return mu, sigma


def _sqrtm_ok(root: np.ndarray, product: np.ndarray) -> bool:
    """Whether `root` is a finite, accurate square root of `product`."""
    if not np.isfinite(root).all():
        return False
    scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
    return np.linalg.norm(root @ root - product) / scale <= SQRTM_RTOL


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's Schur square root, and whether scipy found `a` singular (it warns, not raises)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


def _real_trace(root: np.ndarray) -> float:
    """Trace of a square root that should be real; a complex one is accepted only up to IMAG_ATOL."""
    if np.iscomplexobj(root):
        max_imag = float(np.max(np.abs(np.diagonal(root).imag)))
        if max_imag > IMAG_ATOL:
            raise ValueError(
                f"the square root of sigma1 @ sigma2 has imaginary components up to {max_imag:.3g} on its "
                f"diagonal (> {IMAG_ATOL}); the covariances are not valid (positive semi-definite) statistics"
            )
        root = root.real
    return float(np.trace(root))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (float64).

    If S1 S2 is singular (scipy warns) or its square root is not finite and accurate, `eps`·I is
    added to both covariances (pytorch-fid's safeguard) and the distance is that of the regularised
    Gaussians: unlike pytorch-fid the traces include the ridge too, so identical statistics still
    give 0 rather than -2·D·eps. Raises ValueError on mismatched shapes, non-finite inputs or a
    square root with a non-negligible imaginary part (naming its largest value).
    """
    mu1, sigma1 = _check_pair(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_pair(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    product = sigma1 @ sigma2
    root, singular = _sqrtm(product)
    if singular or not _sqrtm_ok(root, product):
        # Fewer samples than dimensions or constant features leave no reliable Schur square root;
        # a small ridge makes both covariances positive definite.
        ridge = np.eye(sigma1.shape[0]) * eps
        sigma1, sigma2 = sigma1 + ridge, sigma2 + ridge
        root, _ = _sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            raise ValueError(f"the matrix square root of sigma1 @ sigma2 is not finite, even with eps={eps}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _real_trace(root))


# ----------------------------------------------------------------------------------------------
# Statistics files (pytorch-fid format).


def save_stats(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` and ``sigma`` (float64) to an ``.npz`` atomically, after checking them."""
    mu, sigma = _check_pair(mu, sigma, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)  # a file object: np.savez would append ".npz" to a path


def read_npz(path, keys: tuple[str, ...], what: str = ".npz file") -> dict[str, np.ndarray]:
    """The arrays `keys` of an ``.npz`` (never unpickling); errors name the file and missing keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"a single array of shape {np.shape(data)}, not an archive of named arrays")
        with data:
            missing = [k for k in keys if k not in data.files]
            found = list(data.files)
            arrays = {k: data[k] for k in keys if k in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not an npz, truncated, or pickled objects
        raise ValueError(f"{path}: not a readable {what} ({e})") from e
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} in {what} (found {found})")
    return arrays


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid style ``.npz``; errors name the file and the bad key."""
    arrays = read_npz(path, ("mu", "sigma"), "statistics file (pytorch-fid keys mu, sigma)")
    return _check_pair(arrays["mu"], arrays["sigma"], str(path))
