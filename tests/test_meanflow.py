"""Tests of remeanflow.meanflow: time sampling, truncation, labels, CFG target, JVP and loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from remeanflow import meanflow, misc, networks
from remeanflow.couplings import coupling_distance

# ----------------------------------------------------------------------------------------------
# Helpers.


class SmoothNet(torch.nn.Module):
    """A small smooth conditional model u(x_t, t, r | c) that stays in float64 end to end, for
    derivative checks at tolerances the float32 EDM2 net cannot reach."""

    def __init__(self, shape=(2, 3, 3), num_classes: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.shape = shape
        self.W = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.a = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.emb = torch.nn.Parameter(torch.randn(num_classes + 1, d, generator=g, dtype=torch.float64))

    def forward(self, x_t, t, r, labels, v_hat=None):
        h = x_t.flatten(1) @ self.W * (1 + t[:, None] ** 2) + self.a * t[:, None] + self.b * r[:, None] ** 2
        u = torch.tanh(h + self.emb[labels + 1])  # label -1 -> row 0
        if v_hat is None:
            return u.reshape(-1, *self.shape)
        with torch.no_grad():  # du/dt along (v_hat, 1, 0), by hand, for jvp="tangent"
            dh = v_hat.flatten(1) @ self.W * (1 + t[:, None] ** 2) + x_t.flatten(1) @ self.W * (2 * t[:, None]) + self.a
            dudt = (1 - u.square()) * dh
        return u.reshape(-1, *self.shape), dudt.reshape(-1, *self.shape)


def tiny_net(seed: int = 0) -> networks.Precond:
    """The 'tiny' EDM2 net with non-zero gains, so that every layer reaches the output."""
    torch.manual_seed(seed)
    net = networks.build("tiny")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 0:  # out_gain and emb_gain start at zero in EDM2
                param.copy_(0.5 + torch.rand([], generator=g))
    net.init_time_embedding_()
    return net


def batch(shape, num_classes: int, n: int = 6, seed: int = 0, dtype=torch.float32):
    """Couplings, labels (with null rows), and (t, r) with a mix of r < t and r = t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    noise = torch.randn(n, *shape, generator=g, dtype=dtype)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[::3] = -1
    t = (0.1 + 0.8 * torch.rand(n, generator=g)).to(dtype)
    r = t * torch.rand(n, generator=g).to(dtype)
    r[1::4] = t[1::4]
    return x, noise, labels, t, r


def fd_dudt(model, x_t, t, r, labels, v_hat, h):
    """Central finite difference of u along the tangent (v_hat, 1, 0)."""
    with torch.no_grad():
        plus = model(x_t + h * v_hat, t + h, r, labels)
        minus = model(x_t - h * v_hat, t - h, r, labels)
    return (plus - minus) / (2 * h)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------
# Time sampling.


def u_shaped_cdf(s: np.ndarray, a: float) -> np.ndarray:
    """CDF of p(s) ∝ e^{as} + e^{a(1-s)} on [0, 1], by direct integration of each term."""
    integral = (np.expm1(a * s) + np.exp(a) - np.exp(a * (1 - s))) / a
    return integral / (2 * np.expm1(a) / a)


def test_u_shaped_cdf_matches_quadrature():
    a = 4.0
    z, _ = scipy.integrate.quad(lambda s: np.exp(a * s) + np.exp(a * (1 - s)), 0, 1)
    for s in [0.1, 0.37, 0.5, 0.9]:
        num, _ = scipy.integrate.quad(lambda u: np.exp(a * u) + np.exp(a * (1 - u)), 0, s)
        assert u_shaped_cdf(np.array(s), a) == pytest.approx(num / z, rel=1e-12)


@pytest.mark.parametrize("a", [4.0, 1.5])
def test_t_follows_u_shaped_density(a):
    eps = 1e-5
    t, _ = meanflow.sample_t_r(20_000, torch.Generator().manual_seed(1), a=a, t_eps=eps, t_max=1.0)
    s = (t.double().numpy() - eps) / (1 - 2 * eps)  # undo the scaling into [eps, 1 - eps]
    assert scipy.stats.kstest(s, lambda q: u_shaped_cdf(q, a)).pvalue > 1e-3
    # The literal cosh(a t) density (monotone on [0, 1]) must be rejected: the test has power.
    assert scipy.stats.kstest(s, lambda q: np.sinh(a * q) / np.sinh(a)).pvalue < 1e-6


def test_t_range_and_clamp_mass():
    n, eps, t_max = 50_000, 1e-5, 80 / 81
    t, _ = meanflow.sample_t_r(n, torch.Generator().manual_seed(2))
    assert t.min() >= eps and t.max() <= t_max
    p_clamp = 1 - u_shaped_cdf(np.array((t_max - eps) / (1 - 2 * eps)), 4.0)
    frac = (t == torch.tensor(t_max, dtype=t.dtype)).double().mean().item()
    assert abs(frac - p_clamp) < 4 * math.sqrt(p_clamp * (1 - p_clamp) / n)


@pytest.mark.parametrize("high_r", [0.4, 0.8])
def test_r_rules(high_r):
    n, high_t = 50_000, 0.95
    t, r = meanflow.sample_t_r(n, torch.Generator().manual_seed(3), high_t=high_t, high_r=high_r)
    assert (r <= t).all() and (r >= 0).all() and (r < 1).all()
    frac_eq = (r == t).double().mean().item()
    assert abs(frac_eq - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    high = (t > high_t) & (r != t)
    assert not (high & (r > 0) & (r < high_r)).any()
    assert (high & (r == 0)).any()  # the snapping is active
    assert ((t <= high_t) & (r > 0) & (r < t)).any()  # short intervals elsewhere survive


def test_interval_is_logit_normal_without_clamps():
    # With the clamps and the snapping out of the way, logit(t - r) must be N(p_mean, p_std).
    t, r = meanflow.sample_t_r(
        20_000, torch.Generator().manual_seed(4), ratio_r_neq_t=1.0, high_t=2.0, p_mean=-3.0, p_std=0.5
    )
    d = (t - r).double()
    keep = (r > 0) & (t >= 0.2)  # r > 0 is only ever biased when sigmoid(z) > t, i.e. z > -1.4 here
    z = torch.logit(d[keep]).numpy()
    assert scipy.stats.kstest(z, scipy.stats.norm(-3.0, 0.5).cdf).pvalue > 1e-3


def test_sample_t_r_deterministic():
    a = meanflow.sample_t_r(100, torch.Generator().manual_seed(5))
    b = meanflow.sample_t_r(100, torch.Generator().manual_seed(5))
    c = meanflow.sample_t_r(100, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ----------------------------------------------------------------------------------------------
# Couplings, labels, CFG weights.


def test_coupling_distance():
    g = torch.Generator().manual_seed(0)
    n, x = torch.randn(5, 2, 3, 4, generator=g), torch.randn(5, 2, 3, 4, generator=g)
    expected = ((n.numpy() - x.numpy()) ** 2).reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(coupling_distance(n.half().numpy(), x.half().numpy()),
                               ((n.half().float() - x.half().float()) ** 2).reshape(5, -1).mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(coupling_distance(n.numpy(), x.numpy()), expected, rtol=1e-6)


@pytest.mark.parametrize("size", [100, 1000, 37])
def test_truncation_drops_top_decile(size):
    d = torch.randperm(size, generator=torch.Generator().manual_seed(size)).double() / size
    keep = meanflow.truncation_mask(d, meanflow.truncation_threshold(d, 0.9))
    n_keep = math.ceil(0.9 * size)
    assert keep.sum().item() == n_keep
    assert d[~keep].min() > d[keep].max()  # exactly the largest ones are dropped
    assert meanflow.truncation_threshold(d.numpy(), 0.5) == pytest.approx(sorted(d.tolist())[math.ceil(0.5 * size) - 1])


def test_truncation_threshold_rejects_bad_input():
    with pytest.raises(ValueError):
        meanflow.truncation_threshold(torch.empty(0))
    with pytest.raises(ValueError):
        meanflow.truncation_threshold(torch.ones(3), quantile=0.0)


def test_drop_labels():
    n, p = 100_000, 0.1
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    out = misc.drop_labels(labels, p, torch.Generator().manual_seed(1))
    dropped = out == -1
    assert abs(dropped.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(out, misc.drop_labels(labels, p, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("w_pi, w, k", [(1.0, 1.0, 0.0), (1.5, 1.0, 1 / 3), (2.5, 1.5, 0.4), (3.0, 2.0, 1 / 3)])
def test_cfg_weights(w_pi, w, k):
    w_out, k_out = meanflow.cfg_weights(w_pi)
    assert w_out == pytest.approx(w) and k_out == pytest.approx(k)
    assert w_out / (1 - k_out) == pytest.approx(w_pi)  # effective guidance scale (MeanFlow §4.2)


# ----------------------------------------------------------------------------------------------
# CFG target.


@pytest.mark.parametrize("null_target", meanflow.NULL_TARGETS)
def test_cfg_target_formula_and_null_rows(null_target):
    model = SmoothNet()
    x, noise, labels, t, _ = batch(model.shape, 4, n=8, dtype=torch.float64)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    v = noise - x
    w_pi = 2.5  # w' > 2, where the two null-row targets differ
    w, k = 1.5, 1 - 1.5 / 2.5  # by hand: w = max(1, w' - 1), k = 1 - w / w'
    assert meanflow.cfg_weights(w_pi) == pytest.approx((w, k), rel=1e-15)
    v_hat = meanflow.cfg_target(model, x_t, t, v, labels, w, w_pi, null_target)
    with torch.no_grad():
        u_c = model(x_t, t, t, labels)
        u_null = model(x_t, t, t, torch.full_like(labels, -1))
    expected = w * v + k * u_c + (1 - w - k) * u_null
    null = labels == -1
    assert null.any() and (~null).any()
    torch.testing.assert_close(v_hat[~null], expected[~null], rtol=1e-12, atol=1e-12)
    if null_target == "official":
        # the official code's target for every row; with c = null it is w v + (1 - w) u_null
        torch.testing.assert_close(v_hat[null], expected[null], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v_hat[null], (1.5 * v - 0.5 * u_null)[null], rtol=1e-12, atol=1e-12)
        assert (v_hat[null] - v[null]).abs().max() > 1e-3
    else:
        assert torch.equal(v_hat[null], v[null])  # the unconditional target stays the plain v
    assert not v_hat.requires_grad
    # Without guidance the formula collapses to v.
    torch.testing.assert_close(meanflow.cfg_target(model, x_t, t, v, labels, 1.0, 1.0, null_target), v, rtol=0,
                               atol=1e-15)
    # w' <= 2 gives w = 1: the official null-row target is v as well
    w2, w_pi2 = meanflow.cfg_weights(1.8)
    official = meanflow.cfg_target(model, x_t, t, v, labels, w2, w_pi2, null_target)
    torch.testing.assert_close(official[null], v[null], rtol=0, atol=1e-14)


def test_cfg_target_rejects_an_unknown_null_target():
    model = SmoothNet()
    x, noise, labels, t, _ = batch(model.shape, 4, n=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"null_target must be one of \('official', 'plain'\), got 'zero'"):
        meanflow.cfg_target(model, x, t, noise - x, labels, 1.5, 2.5, "zero")


# ----------------------------------------------------------------------------------------------
# JVP.


def test_jvp_modes_match_finite_difference_float64():
    model = SmoothNet()
    x, noise, labels, t, r = batch(model.shape, 4, dtype=torch.float64)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    v_hat = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    d_fd = fd_dudt(model, x_t, t, r, labels, v_hat, h=1e-5)
    with torch.no_grad():
        u_ref = model(x_t, t, r, labels)
    d_ref = None
    for mode in meanflow.JVP_MODES:
        u, d = meanflow.jvp_t(model, x_t, t, r, labels, v_hat, mode)
        torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=0)
        assert rel_err(d, d_fd) < 1e-8, mode
        d_ref = d if d_ref is None else d_ref
        assert rel_err(d, d_ref) < 1e-12, mode
        assert u.requires_grad and not d.requires_grad


def test_jvp_modes_match_finite_difference_edm2():
    # the real EDM2 network in float64 (Precond keeps float64 end to end): tight tolerances
    net = tiny_net().double()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    x, noise, labels, t, r = batch(shape, net.label_dim, dtype=torch.float64)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    v_hat = noise - x
    u_a, d_a = meanflow.jvp_t(net, x_t, t, r, labels, v_hat, "autograd")
    d_fd = fd_dudt(net, x_t, t, r, labels, v_hat, h=1e-5)
    assert rel_err(d_a, d_fd) < 1e-7
    for mode in ["tangent", "forward", "forward-fused"]:
        u_f, d_f = meanflow.jvp_t(net, x_t, t, r, labels, v_hat, mode)
        assert rel_err(u_f, u_a) < 1e-12, mode
        assert rel_err(d_f, d_a) < 1e-10, mode
        assert rel_err(d_f, d_fd) < 1e-7, mode
    # The t-tangent matters: dropping it would be far off.
    _, d_x_only = torch.func.jvp(lambda y: net(y, t, r, labels), (x_t,), (v_hat,))
    assert rel_err(d_x_only, d_f) > 0.1


# ----------------------------------------------------------------------------------------------
# Loss.


def grads(model, **loss_kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    meanflow.meanflow_loss(model, **loss_kwargs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_inputs(model_shape, num_classes, dtype, n=6):
    x, noise, labels, t, r = batch(model_shape, num_classes, n=n, dtype=dtype)
    return dict(x=x, noise=noise, labels=labels, t=t, r=r)


@pytest.mark.parametrize("w, w_pi", [(1.0, 1.0), (1.5, 2.5)])
def test_loss_matches_hand_computation_float64(w, w_pi):
    model = SmoothNet()
    inp = loss_inputs(model.shape, 4, torch.float64)
    x, noise, labels, t, r = inp.values()
    p, c = 0.5, 1e-2
    tb, rb = t[:, None, None, None], r[:, None, None, None]
    x_t = (1 - tb) * x + tb * noise
    v_hat = meanflow.cfg_target(model, x_t, t, noise - x, labels, w, w_pi)
    dudt = fd_dudt(model, x_t, t, r, labels, v_hat, h=1e-5)
    with torch.no_grad():
        e = (model(x_t, t, r, labels) - (v_hat - (tb - rb) * dudt)).square().mean(dim=(1, 2, 3))
    expected = (e / (e + c) ** p).mean()
    for jvp in meanflow.JVP_MODES:
        loss = meanflow.meanflow_loss(model, **inp, w=w, w_pi=w_pi, p=p, c=c, jvp=jvp)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-8)


@pytest.mark.parametrize("jvp", meanflow.JVP_MODES)
def test_loss_gradient_stops_at_target_and_weight(jvp):
    # d loss / d theta must flow through u only: sg on u_tgt and on the adaptive weight.
    model = SmoothNet()
    inp = loss_inputs(model.shape, 4, torch.float64)
    x, noise, labels, t, r = inp.values()
    p, c = 0.5, 1e-2
    tb, rb = t[:, None, None, None], r[:, None, None, None]
    x_t = (1 - tb) * x + tb * noise
    v = noise - x
    u_tgt = v - (tb - rb) * fd_dudt(model, x_t, t, r, labels, v, h=1e-5)
    model.zero_grad(set_to_none=True)
    e = (model(x_t, t, r, labels) - u_tgt).square().mean(dim=(1, 2, 3))
    (e / (e.detach() + c) ** p).mean().backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters()}
    got = grads(model, **inp, p=p, c=c, jvp=jvp)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("jvp", meanflow.JVP_MODES)
def test_loss_with_r_equal_t_is_flow_matching(jvp):
    net = tiny_net()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float32)
    inp["r"] = inp["t"].clone()
    x, noise, labels, t, _ = inp.values()
    tb = t[:, None, None, None]
    p, c = 0.5, 1e-2
    with torch.no_grad():
        e = (net((1 - tb) * x + tb * noise, t, t, labels) - (noise - x)).square().mean(dim=(1, 2, 3))
    expected = (e / (e + c) ** p).mean()
    terms = meanflow.meanflow_loss_terms(net, **inp, p=p, c=c, jvp=jvp)
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(terms.e, e, rtol=1e-5, atol=1e-7)
    assert terms.mse.item() == pytest.approx(e.mean().item(), rel=1e-5)


def test_loss_deterministic_and_forward_is_functional():
    net = tiny_net()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for jvp in meanflow.JVP_MODES:
        for kwargs in [{}, dict(w=1.5, w_pi=2.5)]:
            a = meanflow.meanflow_loss(net, **inp, **kwargs, jvp=jvp)
            a.backward()
            b = meanflow.meanflow_loss(net, **inp, **kwargs, jvp=jvp)
            assert torch.equal(a, b)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("w, w_pi", [(1.0, 1.0), (1.5, 2.5)])
def test_gradients_forward_vs_autograd_float64(w, w_pi):
    model = SmoothNet()
    inp = loss_inputs(model.shape, 4, torch.float64)
    g_a = grads(model, **inp, w=w, w_pi=w_pi, jvp="autograd")
    assert set(g_a) == {name for name, _ in model.named_parameters()}
    for mode in ["tangent", "forward", "forward-fused"]:
        g_f = grads(model, **inp, w=w, w_pi=w_pi, jvp=mode)
        assert set(g_f) == set(g_a)
        for name in g_f:
            assert g_f[name].abs().sum() > 0
            torch.testing.assert_close(g_f[name], g_a[name], rtol=1e-10, atol=1e-14)


def test_gradients_forward_vs_autograd_edm2():
    net = tiny_net().double()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float64)
    g_a = grads(net, **inp, jvp="autograd")
    # The teacher's emb_noise and the EDM2 log-variance head are not used by u.
    unused = {"unet.emb_noise.weight", "logvar_linear.weight"}
    expected = {name for name, _ in net.named_parameters()} - unused
    assert set(g_a) == expected
    for mode in ["tangent", "forward", "forward-fused"]:
        g_f = grads(net, **inp, jvp=mode)
        assert set(g_f) == expected
        for name in expected:
            assert g_f[name].abs().sum() > 0, name
            assert rel_err(g_f[name], g_a[name]) < 1e-10, (mode, name)


def test_cfg_changes_target_except_null_rows():
    net = tiny_net()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float32, n=9)
    null = inp["labels"] == -1
    e1 = meanflow.meanflow_loss_terms(net, **inp).e
    e2 = meanflow.meanflow_loss_terms(net, **inp, w=1.0, w_pi=2.0, null_target="plain").e
    e3 = meanflow.meanflow_loss_terms(net, **inp, w=2.0, w_pi=3.0, null_target="plain").e
    assert (e1[~null] - e2[~null]).abs().min() > 1e-6
    assert (e2[~null] - e3[~null]).abs().min() > 1e-6
    torch.testing.assert_close(e2[null], e1[null], rtol=1e-6, atol=0)
    torch.testing.assert_close(e3[null], e1[null], rtol=1e-6, atol=0)
    # the official target (the default) guides the null rows too once w = w' - 1 > 1
    o2 = meanflow.meanflow_loss_terms(net, **inp, w=1.0, w_pi=2.0).e
    o3 = meanflow.meanflow_loss_terms(net, **inp, w=2.0, w_pi=3.0).e
    torch.testing.assert_close(o2, e2, rtol=1e-6, atol=0)
    torch.testing.assert_close(o3[~null], e3[~null], rtol=1e-6, atol=0)
    assert (o3[null] - e3[null]).abs().min() > 1e-6


def test_model_fn_replaces_net():
    net = tiny_net()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float32)
    calls = []

    def recorder(tag):
        def fn(x_t, t, r, labels, **kwargs):
            calls.append((tag, x_t.shape[0], torch.is_grad_enabled()))
            return net(x_t, t, r, labels, **kwargs)

        return fn

    ref = meanflow.meanflow_loss(net, **inp, w=1.5, w_pi=2.5, jvp="forward")
    out = meanflow.meanflow_loss(None, **inp, w=1.5, w_pi=2.5, jvp="forward", model_fn=recorder("model"))
    assert torch.equal(ref, out)
    # No-grad CFG forward over the doubled batch, the no-grad tangent, then the forward for u.
    assert calls == [("model", 12, False), ("model", 6, False), ("model", 6, True)]
    calls.clear()
    out = meanflow.meanflow_loss(None, **inp, w=1.5, w_pi=2.5, jvp="forward", model_fn=recorder("model"),
                                 tangent_fn=recorder("tangent"))
    assert torch.equal(ref, out)
    assert calls == [("model", 12, False), ("tangent", 6, False), ("model", 6, True)]
    # jvp="tangent" (the default): one call with gradient returns u and du/dt.
    calls.clear()
    ref = meanflow.meanflow_loss(net, **inp, w=1.5, w_pi=2.5)
    out = meanflow.meanflow_loss(None, **inp, w=1.5, w_pi=2.5, model_fn=recorder("model"))
    assert torch.equal(ref, out)
    assert calls == [("model", 12, False), ("model", 6, True)]


def test_bad_arguments():
    net = tiny_net()
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    inp = loss_inputs(shape, net.label_dim, torch.float32)
    with pytest.raises(ValueError):
        meanflow.meanflow_loss(net, **inp, jvp="reverse")
    with pytest.raises(ValueError):
        meanflow.meanflow_loss(net, **dict(inp, labels=None), w=1.5, w_pi=2.5)
    with pytest.raises(ValueError):
        meanflow.meanflow_loss(None, **inp)
