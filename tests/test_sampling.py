"""Tests for remeanflow.sampling: EDM Heun against an exact Gaussian-mixture ODE, autoguidance,
MeanFlow samplers on a tiny EDM2 net, and the per-sample randomness contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from remeanflow import networks, sampling

# ----------------------------------------------------------------------------------------------
# An exact denoiser: class-conditional isotropic Gaussian mixture in 2-D (samples [N, 2, 1, 1]).

MEANS = [  # [class, component, xy]
    [[-1.0, -1.0], [1.0, 1.0]],
    [[-1.0, 1.0], [1.0, -1.0]],
    [[0.0, 1.5], [0.0, -1.5]],
]


class MixtureDenoiser:
    """D(x; sigma, c) = E[x0 | x0 + sigma n = x, c] for x0 ~ sum_k pi_k N(mu_k, s^2 I) over the
    components of class c (all components for the null class -1 or an all-zero one-hot row).

    Per component the posterior mean is mu_k + s^2/(s^2+sigma^2) (x - mu_k); the responsibilities
    are the softmax of log N(x; mu_k, (s^2+sigma^2) I) with equal weights.
    """

    def __init__(self, means=MEANS, std: float = 0.2):
        self.means = torch.tensor(means, dtype=torch.float64)
        self.std = std
        self.calls = 0

    def component_mask(self, labels: torch.Tensor) -> torch.Tensor:
        num_classes, num_comp, _ = self.means.shape
        if labels.dtype.is_floating_point:  # one-hot rows
            labels = torch.where(labels.sum(1) > 0, labels.argmax(1), -1)
        comp_class = torch.arange(num_classes).repeat_interleave(num_comp)
        return (labels[:, None] < 0) | (comp_class[None] == labels[:, None])

    def denoise(self, x: torch.Tensor, sigma, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        xf = x.reshape(x.shape[0], 2)
        mu = self.means.reshape(-1, 2).to(x.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        var = self.std**2 + sigma**2
        logw = -((xf[:, None, :] - mu[None]) ** 2).sum(-1) / (2 * var)
        w = logw.masked_fill(~self.component_mask(class_labels), -torch.inf).softmax(1)
        mu_bar = w @ mu
        return (mu_bar + self.std**2 / var * (xf - mu_bar)).reshape(x.shape)


def mixture_batch(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, 1, 1, generator=g)
    labels = torch.arange(n) % len(MEANS)
    return noise, labels


def reference_endpoint(net: MixtureDenoiser, noise, labels, sigma_min=0.002, sigma_max=80.0) -> torch.Tensor:
    """The limit of the Heun sampler as num_steps -> inf: the exact ODE solution
    dx/dln(sigma) = x - D(x; sigma) from sigma_max to sigma_min (DOP853, rtol 1e-10, float64),
    followed by the sampler's final Euler step to sigma = 0, i.e. D(x(sigma_min); sigma_min)."""
    sigma_min = float(np.float32(sigma_min))  # the sampler's grid is float32
    shape = noise.shape

    def rhs(log_sigma, y):
        x = torch.from_numpy(y).reshape(shape)
        return (x - net.denoise(x, math.exp(log_sigma), labels)).reshape(-1).numpy()

    x0 = (noise.double() * sigma_max).reshape(-1).numpy()
    sol = scipy.integrate.solve_ivp(
        rhs, (math.log(sigma_max), math.log(sigma_min)), x0, method="DOP853", rtol=1e-10, atol=1e-10
    )
    assert sol.success, sol.message
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return net.denoise(x, sigma_min, labels)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


# ----------------------------------------------------------------------------------------------
# EDM Heun.


def test_karras_sigmas_follow_edm_eq5():
    sigmas = sampling.karras_sigmas(6, sigma_min=0.002, sigma_max=80, rho=7).double()
    assert sigmas.shape == (7,)
    assert sigmas[0] == 80 and sigmas[-1] == 0 and sigmas[-2] == pytest.approx(0.002, rel=1e-6)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert sigmas[2].item() == pytest.approx((a + 2 / 5 * (b - a)) ** 7, rel=1e-6)
    assert sampling.karras_sigmas(1).tolist() == [80.0, 0.0]


def test_heun_converges_to_exact_ode_endpoint_at_second_order():
    net = MixtureDenoiser()
    noise, labels = mixture_batch()
    ref = reference_endpoint(net, noise, labels)
    errors = {n: rms(sampling.edm_heun(net, noise, labels, num_steps=n), ref) for n in (8, 32, 128)}
    assert errors[32] < 0.02  # the paper's 32-step setting is already close to the exact flow
    assert errors[8] > errors[32] > errors[128]
    # Heun is 2nd order: 4x the steps should cut the error ~16x; ask for an observed order >= 1.6.
    for coarse, fine in ((8, 32), (32, 128)):
        order = math.log(errors[coarse] / errors[fine]) / math.log(4)
        assert order >= 1.6, (coarse, fine, errors)


def test_heun_endpoints_land_on_their_class_modes():
    net = MixtureDenoiser(std=0.2)
    noise, labels = mixture_batch(seed=1)
    x = sampling.edm_heun(net, noise, labels).reshape(-1, 2).double()
    own_means = net.means[labels]  # [N, components, 2]
    dist_own = (x[:, None] - own_means).norm(dim=-1).min(1).values
    assert dist_own.max() < 5 * net.std
    # Null-class samples reach the components of every class.
    x_null = sampling.edm_heun(net, noise, torch.full_like(labels, -1)).reshape(-1, 2).double()
    nearest = (x_null[:, None] - net.means.reshape(-1, 2)).norm(dim=-1).argmin(1)
    assert len(set((nearest // 2).tolist())) == len(MEANS)


def test_heun_state_dtype_and_float64_input():
    net = MixtureDenoiser()
    noise, labels = mixture_batch(8)
    assert sampling.edm_heun(net, noise.half(), labels, num_steps=4).dtype == torch.float32
    x64 = sampling.edm_heun(net, noise.double(), labels, num_steps=4)
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), sampling.edm_heun(net, noise, labels, num_steps=4), atol=1e-5, rtol=1e-5)


def test_one_heun_step_is_the_denoiser_at_sigma_max():
    net = MixtureDenoiser()
    noise, labels = mixture_batch(8)
    out = sampling.edm_heun(net, noise, labels, num_steps=1)
    assert torch.equal(out, net.denoise(80 * noise, 80.0, labels))
    assert net.calls == 2


@pytest.mark.parametrize("num_steps", [1, 5])
def test_function_evaluations_without_active_guidance(num_steps):
    main, guide = MixtureDenoiser(), MixtureDenoiser(std=0.5)
    noise, labels = mixture_batch(4)
    sampling.edm_heun(main, noise, labels, num_steps=num_steps, guide=guide, guidance=1.0)
    assert (main.calls, guide.calls) == (2 * num_steps - 1, 0)
    sampling.edm_heun(main, noise, labels, num_steps=num_steps)
    assert main.calls == 2 * (2 * num_steps - 1)
    sampling.edm_heun(main, noise, labels, num_steps=num_steps, guide=guide, guidance=2.0)
    assert guide.calls == 2 * num_steps - 1


def test_autoguidance_with_itself_is_no_guidance():
    net = MixtureDenoiser()
    noise, labels = mixture_batch(16)
    plain = sampling.edm_heun(net, noise, labels, num_steps=8)
    assert torch.equal(sampling.edm_heun(net, noise, labels, num_steps=8, guide=net, guidance=2.1), plain)


def test_autoguidance_extrapolates_from_the_guide():
    main, guide = MixtureDenoiser(std=0.2), MixtureDenoiser(std=0.5)
    noise, labels = mixture_batch(16)
    w = 1.7
    x = 80 * noise
    expected = guide.denoise(x, 80.0, labels) + w * (main.denoise(x, 80.0, labels) - guide.denoise(x, 80.0, labels))
    got = sampling.edm_heun(main, noise, labels, num_steps=1, guide=guide, guidance=w)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    plain = sampling.edm_heun(main, noise, labels, num_steps=8)
    guided = sampling.edm_heun(main, noise, labels, num_steps=8, guide=guide, guidance=w)
    assert rms(plain, guided) > 1e-2


def test_edm_heun_rejects_bad_input():
    net = MixtureDenoiser()
    noise, labels = mixture_batch(4)
    with pytest.raises(ValueError, match="num_steps"):
        sampling.edm_heun(net, noise, labels, num_steps=0)
    with pytest.raises(ValueError, match="sigma_min"):
        sampling.edm_heun(net, noise, labels, sigma_min=100)
    with pytest.raises(ValueError, match="labels"):
        sampling.edm_heun(net, noise, labels[:3])
    with pytest.raises(ValueError, match="noise"):
        sampling.edm_heun(net, torch.zeros(4, dtype=torch.int64), labels)
    with pytest.raises(ValueError, match="guide"):
        sampling.edm_heun(net, noise, labels, guidance=2.0)


# ----------------------------------------------------------------------------------------------
# A tiny EDM2 net.


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = networks.build("tiny").eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:  # zero-initialised gains would hide the label and content paths
                p.fill_(0.7)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(3, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    labels = torch.tensor([2, -1, 0])
    return net, noise, labels


def test_edm_heun_tiny_net_under_inference_mode_and_autocast(tiny):
    net, noise, labels = tiny
    with torch.inference_mode():
        ref = sampling.edm_heun(net, noise, labels, num_steps=3, progress=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sampling.edm_heun(net, noise, labels, num_steps=3)
    for x in (ref, low):
        assert x.shape == noise.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    # bf16 only inside the net: a bf16 ODE state would already be off by ~80 * 2^-8 at the start.
    assert rms(ref, low) < 0.05 * ref.std().item()
    with torch.no_grad():
        one = sampling.edm_heun(net, noise, labels, num_steps=1)
        assert torch.equal(one, net.denoise(80 * noise, 80, labels))


def test_tiny_net_labels_as_indices_or_one_hot(tiny):
    net, noise, labels = tiny
    by_index = sampling.edm_heun(net, noise, labels, num_steps=2)
    by_one_hot = sampling.edm_heun(net, noise, networks.one_hot(labels, net.label_dim), num_steps=2)
    assert torch.equal(by_index, by_one_hot)
    other = sampling.edm_heun(net, noise, (labels + 2) % net.label_dim, num_steps=2)
    assert rms(by_index, other) > 1e-4  # labels actually reach the net


# ----------------------------------------------------------------------------------------------
# MeanFlow samplers.


def test_one_step_is_noise_minus_average_velocity(tiny):
    net, noise, labels = tiny
    with torch.no_grad():
        by_hand = noise - net(noise, 80 / 81, 0.0, labels)
        at_t = noise - net(noise, 0.9, 0.0, labels)
    x = sampling.one_step(net, noise, labels)
    assert torch.equal(x, by_hand)
    assert torch.equal(x, sampling.meanflow_sample(net, noise, labels, num_steps=1))
    assert torch.equal(sampling.one_step(net, noise, labels, t_max=0.9), at_t)


def test_two_step_meanflow_walks_the_grid(tiny):
    net, noise, labels = tiny
    with torch.no_grad():
        x_half = noise - 0.5 * net(noise, 80 / 81, 0.5, labels)
        by_hand = x_half - 0.5 * net(x_half, 0.5, 0.0, labels)
    two = sampling.meanflow_sample(net, noise, labels, num_steps=2)
    torch.testing.assert_close(two, by_hand, atol=1e-6, rtol=1e-6)
    assert rms(two, sampling.one_step(net, noise, labels)) > 1e-3


def test_meanflow_under_inference_mode_and_autocast(tiny):
    net, noise, labels = tiny
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = sampling.one_step(net, noise, networks.one_hot(labels, net.label_dim))
    assert x.shape == noise.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert rms(x, sampling.one_step(net, noise, labels)) < 0.05 * x.std().item()
    with pytest.raises(ValueError, match="num_steps"):
        sampling.meanflow_sample(net, noise, labels, num_steps=0)
    with pytest.raises(ValueError, match="t_max"):
        sampling.one_step(net, noise, labels, t_max=1.5)


# ----------------------------------------------------------------------------------------------
# Per-sample randomness.

IDS = [5, 0, 17, 3, 99, 42, 1 << 40]


def test_noise_rows_do_not_depend_on_the_batch():
    shape = (2, 3, 3)
    full = sampling.per_sample_noise(7, IDS, shape)
    assert full.shape == (len(IDS), *shape) and full.dtype == torch.float32 and full.device.type == "cpu"
    split = torch.cat([sampling.per_sample_noise(7, IDS[:2], shape), sampling.per_sample_noise(7, IDS[2:], shape)])
    assert torch.equal(split, full)
    assert torch.equal(sampling.per_sample_noise(7, IDS[::-1], shape), full.flip(0))
    assert torch.equal(sampling.per_sample_noise(7, np.array(IDS), shape), full)
    assert torch.equal(sampling.per_sample_noise(7, torch.tensor(IDS), shape)[3], full[3])


def test_noise_follows_the_documented_derivation():
    # The storage contract: Philox4x64 keyed by seed * 2^64 + id, counter 0, float64 normals.
    seed, i, shape = 7, 17, (2, 3, 3)
    gen = np.random.Generator(np.random.Philox(key=seed * 2**64 + i, counter=0))
    expected = torch.from_numpy(gen.standard_normal(18)).reshape(shape).float()
    assert torch.equal(sampling.per_sample_noise(seed, [i], shape)[0], expected)


def test_noise_differs_across_seeds_and_ids():
    a = sampling.per_sample_noise(7, IDS, (16,))
    b = sampling.per_sample_noise(8, IDS, (16,))
    assert not torch.isclose(a, b).all(dim=1).any()
    assert torch.cdist(a, a).add(torch.eye(len(IDS))).min() > 0.1
    big = sampling.per_sample_noise(2**64 - 1, [0], (4,))  # the whole key range is usable
    assert torch.isfinite(big).all()


def test_noise_is_standard_normal():
    x = sampling.per_sample_noise(0, range(256), (4, 8, 8), dtype=torch.float64)
    assert x.dtype == torch.float64
    flat = x.flatten().numpy()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert scipy.stats.kstest(flat, "norm").pvalue > 1e-3
    rows = x.reshape(256, -1)
    corr = torch.corrcoef(rows)[~torch.eye(256, dtype=torch.bool)]
    assert corr.abs().max() < 0.3  # 256-value rows: |r| of independent rows stays < ~0.25
    assert sampling.per_sample_noise(0, [1], (3,), dtype=torch.float16).dtype == torch.float16


def test_per_sample_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="sample ids must be >= 0"):
        sampling.per_sample_noise(0, [1, -2], (3,))
    with pytest.raises(ValueError, match="integers"):
        sampling.per_sample_noise(0, [1.5], (3,))
    with pytest.raises(ValueError, match="shape"):
        sampling.per_sample_noise(0, [1], (3, 0))
    with pytest.raises(ValueError, match="seed"):
        sampling.per_sample_noise(-1, [1], (3,))


def test_labels_are_per_sample_and_uniform():
    full = sampling.per_sample_labels(3, IDS, 10)
    assert full.dtype == torch.int64 and full.shape == (len(IDS),)
    split = torch.cat([sampling.per_sample_labels(3, IDS[:4], 10), sampling.per_sample_labels(3, IDS[4:], 10)])
    assert torch.equal(split, full)
    gen = np.random.Generator(np.random.Philox(key=3 * 2**64 + IDS[2], counter=[0, 0, 0, 1]))
    assert full[2].item() == gen.integers(10)

    labels = sampling.per_sample_labels(3, range(2000), 10)
    assert labels.min() >= 0 and labels.max() < 10
    counts = torch.bincount(labels, minlength=10).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert not torch.equal(labels, sampling.per_sample_labels(4, range(2000), 10))
    with pytest.raises(ValueError, match="num_classes"):
        sampling.per_sample_labels(3, IDS, 0)
