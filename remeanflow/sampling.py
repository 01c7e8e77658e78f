"""Samplers and per-sample deterministic randomness.

* `edm_heun`: the teacher's deterministic probability-flow ODE solver (EDM, Karras et al. 2022,
  Alg. 1 with S_churn = 0) with optional autoguidance (Karras et al. 2024, "Guiding a Diffusion
  Model with a Bad Version of Itself"). It makes the Re-MeanFlow couplings (noise n, endpoint x).
* `one_step` / `meanflow_sample`: sampling with a MeanFlow average-velocity net u(x_t, t, r | c)
  (Re-MeanFlow, arXiv 2511.23342); flow convention x_t = (1-t) x + t n, data at t=0, noise at t=1.
* `per_sample_noise` / `per_sample_labels`: randomness keyed by (seed, sample id) so that a
  coupling store is identical whatever the number of shards, GPUs or restarts (docs/architecture.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import tqdm

from .misc import one_hot

T_MAX = 80 / 81  # flow time of sigma = 80, the EDM sigma_max: sigma = t / (1 - t)

# ----------------------------------------------------------------------------------------------
# EDM Heun sampler with autoguidance.


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7) -> torch.Tensor:
    """Time steps sigma_0 > ... > sigma_{N-1} = sigma_min, plus sigma_N = 0 (EDM Eq. 5).

    Computed in float64 and returned in float32 on the CPU (the nets see float32 sigmas); the end
    points are set exactly, so the first state is exactly `noise * sigma_max`. With N = 1 the grid
    is just [sigma_max, 0].
    """
    _check_schedule(num_steps, sigma_min, sigma_max, rho)
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (a + frac * (b - a)) ** rho
    sigmas[0] = sigma_max
    if num_steps > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def _check_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    _check_num_steps(num_steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")


def _check_batch(noise: torch.Tensor, labels) -> None:
    if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point or noise.ndim < 2:
        raise ValueError("noise must be a floating-point tensor [N, C, H, W] (or [N, ...]) of standard-normal draws")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != noise.shape[:1]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a tensor with one row per sample ({noise.shape[0]}): class indices [N] "
            f"(-1 = null) or one-hot [N, label_dim]; got {shape}"
        )


def _state_dtype(noise: torch.Tensor) -> torch.dtype:
    """ODE state precision: at least float32 (sigma_max · n needs it), float64 kept if given."""
    return torch.promote_types(noise.dtype, torch.float32)


def _per_sample(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar time as a float32 vector with one entry per sample, the form every net accepts."""
    return torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)


def batch_labels(net, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Class indices as one-hot rows, converted once per batch for a net with a `label_dim`.

    A sampler calls the net 2N - 1 times (twice that with a guide) with the same labels;
    `networks.one_hot`'s range check and construction then run here once instead of in every
    call (on a GPU each is a host sync). One-hot rows, None, and the labels of nets without a
    `label_dim` (e.g. test denoisers) are passed through unchanged; the values the net sees are
    the same either way."""
    label_dim = getattr(net, "label_dim", None)
    if labels is None or labels.dtype.is_floating_point or not isinstance(label_dim, int) or label_dim < 1:
        return labels
    return one_hot(labels, label_dim)


def guided_denoiser(net, guide=None, guidance: float = 1.0) -> Callable:
    """D(x; sigma, c) with autoguidance D = D_guide + w (D_main - D_guide) (Karras et al. 2024).
    With no guide or w = 1 the guide would cancel, so only the main net is evaluated."""
    if guide is None and guidance != 1:
        raise ValueError(f"guidance={guidance} needs a guide network; pass guide=... or guidance=1")

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        D = net.denoise(x, sigma, labels).to(x.dtype)  # autocast may hand back reduced precision
        if guide is None or guidance == 1:
            return D
        D_guide = guide.denoise(x, sigma, labels).to(x.dtype)
        return D_guide.lerp(D, guidance)

    return denoise


@torch.no_grad()
def edm_heun(
    net,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guide=None,
    guidance: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Solve the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0
    with EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1, S_churn = 0).

    `noise` is standard normal (the stored coupling noise n); the initial state is n · sigma_max.
    `net` and `guide` need only `.denoise(x, sigma, class_labels)`; labels are passed through
    unchanged (class indices with -1 = null, or one-hot rows). Every step but the last is a Heun
    step; the last (to sigma = 0) is Euler, so `num_steps` = N costs 2N - 1 evaluations per net.
    The state stays in float32 (float64 if the noise is float64) even under `torch.autocast`.
    Returns the endpoints x_N in that dtype.
    """
    _check_batch(noise, labels)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()  # host floats: no device syncs
    denoise = guided_denoiser(net, guide, guidance)
    labels = batch_labels(net, labels)
    x = noise.to(_state_dtype(noise)) * sigmas[0]
    steps = tqdm.tqdm(range(num_steps), desc="EDM Heun", unit="step", disable=not progress, leave=False)
    for i in steps:
        x = _heun_step(denoise, x, sigmas[i], sigmas[i + 1], labels)
    return x


def _heun_step(denoise: Callable, x: torch.Tensor, sigma: float, sigma_next: float, labels) -> torch.Tensor:
    """One step of EDM Alg. 1 from sigma to sigma_next: Euler, then the trapezoidal correction."""
    D = denoise(x, _per_sample(sigma, x), labels)
    if sigma_next == 0:
        # Euler to sigma = 0 lands exactly on D(x; sigma); writing it so avoids the roundoff of
        # x - sigma · (x - D) / sigma when x is large (num_steps = 1 gives exactly D(sigma_max n)).
        return D
    d = (x - D) / sigma
    x_next = x + (sigma_next - sigma) * d
    D_next = denoise(x_next, _per_sample(sigma_next, x_next), labels)
    d_next = (x_next - D_next) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)


# ----------------------------------------------------------------------------------------------
# MeanFlow samplers.


@torch.no_grad()
def meanflow_sample(
    net, noise: torch.Tensor, labels: torch.Tensor | None, num_steps: int = 1, t_max: float = T_MAX
) -> torch.Tensor:
    """K-step sampling with the average velocity u(x_t, t, r | c) (MeanFlow, Geng et al. 2025:
    z_r = z_t - (t - r) u(z_t, t, r)), on the grid t_k = 1 - k/K, k = 0..K.

    Noise sits at t = 1, but the net is queried at min(t_k, t_max): t_max = 80/81 is sigma = 80,
    the largest noise level the teacher (and hence u) was trained on. The step length stays
    t_k - t_{k+1}, so K = 1 is exactly x = n - u(n, t_max, 0 | c) (`one_step`).
    """
    _check_num_steps(num_steps)
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    _check_batch(noise, labels)
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    labels = batch_labels(net, labels)
    x = noise.to(_state_dtype(noise))
    for t, r in zip(ts[:-1], ts[1:]):
        u = net(x, _per_sample(min(t, t_max), x), _per_sample(r, x), labels).to(x.dtype)
        x = x - (t - r) * u
    return x


def one_step(net, noise: torch.Tensor, labels: torch.Tensor | None, t_max: float = T_MAX) -> torch.Tensor:
    """Re-MeanFlow one-step sample x = n - u(n, t_max, 0 | c) (docs/method.md)."""
    return meanflow_sample(net, noise, labels, num_steps=1, t_max=t_max)


# ----------------------------------------------------------------------------------------------
# Per-sample deterministic randomness (part of the coupling-store contract, docs/architecture.md).
#
# Sample id i under seed s gets its own counter-based generator
#     numpy.random.Generator(numpy.random.Philox(key=[i, s], counter=[0, 0, 0, stream]))
# i.e. the 128-bit Philox4x64-10 key is s · 2^64 + i. `stream` separates independent uses of the
# same (s, i): NOISE_STREAM = 0 for the noise, LABEL_STREAM = 1 for the class label.
# Noise row i = that generator's `standard_normal(prod(shape))` in float64, reshaped C-order to
# `shape`, then cast to the requested dtype. Label i = `integers(0, num_classes)` from its
# generator. Nothing depends on which other ids share the call, nor on their order.

NOISE_STREAM = 0
LABEL_STREAM = 1
_U64 = 1 << 64


def sample_generator(seed: int, sample_id: int, stream: int) -> np.random.Generator:
    """The generator for one (seed, sample id, stream), as documented above."""
    key = np.array([sample_id, seed], dtype=np.uint64)
    counter = np.array([0, 0, 0, stream], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def _check_ids(seed: int, sample_ids) -> np.ndarray:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < _U64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if isinstance(sample_ids, torch.Tensor):
        sample_ids = sample_ids.detach().cpu().numpy()
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
        raise ValueError(f"sample_ids must be a 1-D sequence of integers, got dtype {ids.dtype}, shape {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"sample ids must be >= 0, got {int(ids.min())}")
    return ids.astype(np.uint64)


def per_sample_noise(
    seed: int, sample_ids: Sequence[int] | np.ndarray | torch.Tensor, shape: Sequence[int], dtype=torch.float32
) -> torch.Tensor:
    """Standard-normal noise [N, *shape] on the CPU; row j depends only on (seed, sample_ids[j])."""
    ids = _check_ids(seed, sample_ids)
    shape = tuple(shape)
    if not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}")
    size = int(np.prod(shape))
    out = np.empty((len(ids), size), dtype=np.float64)
    for row, i in zip(out, ids):
        sample_generator(int(seed), int(i), NOISE_STREAM).standard_normal(out=row)
    return torch.from_numpy(out).reshape(len(ids), *shape).to(dtype)


def per_sample_labels(
    seed: int, sample_ids: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Uniform class indices [N] (int64, CPU) in [0, num_classes); entry j depends only on
    (seed, sample_ids[j]), and is independent of that sample's noise (separate Philox stream)."""
    ids = _check_ids(seed, sample_ids)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    labels = [sample_generator(int(seed), int(i), LABEL_STREAM).integers(num_classes) for i in ids]
    return torch.tensor(labels, dtype=torch.int64)
