"""EDM2 network in flow form: magnitude preservation, EDM2 naming/sizes, flow <-> EDM conversion."""

import math

import pytest
import torch

from remeanflow import networks as N


def _var(x):
    """Squared magnitude (mean square), the quantity EDM2's MP layers preserve."""
    return x.double().square().mean().item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _untrained_but_nontrivial(net):
    """EDM2 initialises out_gain and emb_gain to zero (F = 0); give them values so that tests
    see the whole network rather than the skip connection alone."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    return net


def test_mp_primitives_preserve_unit_variance():
    a, b = torch.randn(2, 200_000)
    assert _var(N.mp_silu(a)) == pytest.approx(1.0, abs=0.03)
    for t in (0.3, 0.5, 0.8):
        assert _var(N.mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.02)
    cat = N.mp_cat(torch.randn(4000, 8), torch.randn(4000, 56), dim=1, t=0.3)
    assert _var(cat) == pytest.approx(1.0, abs=0.03)
    # the weights of mp_cat follow the balance: the smaller part is up-weighted per element
    assert _var(cat[:, :8]) > _var(cat[:, 8:])
    fourier = N.MPFourier(256)(torch.rand(4000) * 4 - 2)
    assert _var(fourier) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mpconv_keeps_unit_variance_for_any_weight_scale(kernel):
    conv = N.MPConv(64, 48, kernel)
    with torch.no_grad():
        conv.weight.mul_(17.0)  # weight normalisation must make the scale irrelevant
    x = torch.randn(64, 64) if not kernel else torch.randn(16, 64, 24, 24)
    y = conv(x)
    if kernel == (3, 3):
        y = y[:, :, 1:-1, 1:-1]  # zero padding shrinks the border
    assert _var(y) == pytest.approx(1.0, abs=0.06)


def test_unet_activations_stay_unit_scale():
    net = N.build("toy-16").eval()
    x = torch.randn(32, 3, 16, 16)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(_var(o))) for blk in net.unet.enc.values()]
    with torch.no_grad():
        net.unet(x, net.unet.teacher_embedding(torch.zeros(32)), N.one_hot(torch.arange(32) % 10, 10))
    for h in hooks:
        h.remove()
    assert len(seen) == len(net.unet.enc)  # every block's call went through its hooks
    assert all(0.3 < v < 3.0 for v in seen), seen


@pytest.mark.parametrize(
    "preset, expected_millions",
    [("edm2-img512-s", 280.2), ("edm2-img512-xs", 124.7)],
)
def test_edm2_presets_have_published_parameter_counts(preset, expected_millions):
    with torch.device("meta"):
        net = N.build(preset)
    teacher_params = sum(
        p.numel() for name, p in net.named_parameters() if "emb_noise_t" not in name and "emb_noise_r" not in name
    )
    assert teacher_params / 1e6 == pytest.approx(expected_millions, abs=0.05)


def test_state_dict_names_follow_edm2():
    with torch.device("meta"):
        keys = set(N.build("edm2-img64-s").state_dict())
    for name in [
        "unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight",
        "unet.emb_label.weight", "unet.enc.64x64_conv.weight", "unet.enc.32x32_down.conv_res0.weight",
        "unet.enc.16x16_block0.attn_qkv.weight", "unet.enc.64x64_block2.emb_gain",
        "unet.dec.8x8_in0.attn_proj.weight", "unet.dec.8x8_in1.conv_res1.weight",
        "unet.dec.64x64_block3.conv_skip.weight", "unet.dec.32x32_up.emb_linear.weight",
        "unet.out_conv.weight", "logvar_fourier.freqs", "logvar_linear.weight",
        "unet.emb_noise_t.weight", "unet.emb_noise_r.weight",
    ]:
        assert name in keys, name
    assert not any(k.startswith("unet.enc.64x64_block3") or "attn" in k and "64x64" in k for k in keys)


def test_teacher_velocity_is_the_flow_form_of_denoise():
    net = _untrained_but_nontrivial(N.build("tiny").double().eval())
    x_t = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.9, 80 / 81], dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 3, -1, 1])
    with torch.no_grad():
        v = net.teacher_velocity(x_t, t, c)
        tb = t.reshape(-1, 1, 1, 1)
        by_hand = (x_t - net.denoise(x_t / (1 - tb), t / (1 - t), c)) / tb
    torch.testing.assert_close(v, by_hand, rtol=0, atol=0)


def test_forward_with_teacher_embedding_equals_teacher_velocity(monkeypatch):
    net = _untrained_but_nontrivial(N.build("tiny").eval())
    x_t = torch.randn(5, 2, 8, 8)
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95])
    c = torch.tensor([0, 1, 2, 3, -1])
    with torch.no_grad():
        v = net.teacher_velocity(x_t, t, c)
        u_new = net(x_t, t, t, c)
        monkeypatch.setattr(net.unet, "time_embedding", lambda t, r: net.unet.teacher_embedding((t / (1 - t)).log() / 4))
        u_teacher_emb = net(x_t, t, t, c)
    torch.testing.assert_close(u_teacher_emb, v, rtol=0, atol=0)
    assert not torch.allclose(u_new, v, atol=1e-3)  # the fresh dual embedding is a different function


def test_velocity_of_a_perfect_denoiser_is_n_minus_x(monkeypatch):
    """u = (x_t - D)/t must recover v = n - x when D returns the clean sample exactly."""
    net = N.build("tiny").double().eval()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    n = torch.randn_like(x)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * n
    monkeypatch.setattr(net, "_edm", lambda x_edm, sigma, emb, c: x)
    torch.testing.assert_close(net(x_t, t, 0.0 * t, None), n - x)


def test_forward_is_functional_and_weight_normalisation_is_separate():
    net = _untrained_but_nontrivial(N.build("tiny").train())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 2, 8, 8)
    u = net(x, torch.full((3,), 0.5), torch.full((3,), 0.2), torch.tensor([0, 1, -1]))
    u.square().mean().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "forward mutated parameters"

    net.normalize_weights_()
    conv = net.unet.enc["8x8_conv"]
    rms = conv.weight.flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    # forced normalisation changes the stored weights but not the function (up to the eps of normalize)
    with torch.no_grad():
        u2 = net(x, torch.full((3,), 0.5), torch.full((3,), 0.2), torch.tensor([0, 1, -1]))
    torch.testing.assert_close(u2, u.detach(), atol=1e-2, rtol=1e-2)


def test_forward_mode_jvp_runs_in_training_mode():
    net = _untrained_but_nontrivial(N.build("tiny").train())
    x = torch.randn(2, 2, 8, 8)
    t, r = torch.full((2,), 0.6), torch.full((2,), 0.1)
    c = torch.tensor([1, 2])
    u, dudt = torch.func.jvp(lambda a, b, d: net(a, b, d, c), (x, t, r), (x, torch.ones(2), torch.zeros(2)))
    assert u.shape == dudt.shape == x.shape and torch.isfinite(dudt).all()


def test_one_hot_and_null_class():
    oh = N.one_hot(torch.tensor([2, -1, 0]), 4)
    assert oh.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        N.one_hot(torch.tensor([4]), 4)
    with pytest.raises(ValueError, match="shape"):
        N.one_hot(torch.zeros(2, 3), 4)


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="edm2-img64-q"):
        N.build("edm2-img64-q")


def test_label_embedding_scales_with_sqrt_label_dim():
    # EDM2 multiplies one-hot labels by sqrt(label_dim) so the label embedding has unit variance
    net = N.build("tiny").eval()
    emb = net.unet.emb_label(N.one_hot(torch.arange(4), 4) * math.sqrt(4))
    assert _var(emb) == pytest.approx(1.0, abs=0.5)


# ----------------------------------------------------------------------------------------------
# Hand-derived tangent rules (Precond.forward with v_hat), checked against torch.func.jvp in
# float64, where only rounding separates two correct derivatives.


def _func_jvp(fn, primals, tangents):
    return torch.func.jvp(fn, primals, tangents)[1]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_primitive_tangent_rules_match_func_jvp():
    g = torch.Generator().manual_seed(3)
    x, dx = torch.randn(2, 2, 5, 6, 7, dtype=torch.float64, generator=g)
    x[0, 1] = 0  # a zero pixel vector: |x| is not differentiable there, both give 0
    for dim in (None, 1, 2):
        y, got = N.normalize_jvp(x, dx, dim=dim)
        assert torch.equal(y, N.normalize(x, dim=dim))
        torch.testing.assert_close(got, _func_jvp(lambda a: N.normalize(a, dim=dim), (x,), (dx,)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(N.mp_silu_jvp(x, dx), _func_jvp(N.mp_silu, (x,), (dx,)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(N.clamp_jvp(3 * x, dx, 2.0), _func_jvp(lambda a: a.clamp(-2.0, 2.0), (3 * x,), (dx,)))
    b, db = torch.randn(2, 2, 5, 6, 7, dtype=torch.float64, generator=g)
    torch.testing.assert_close(N.product_jvp(x, dx, b, db), _func_jvp(torch.mul, (x, b), (dx, db)))
    torch.testing.assert_close(N.product_jvp(x, None, b, db), x * db)
    for t in (0.3, 0.5):
        torch.testing.assert_close(N.mp_sum_jvp(dx, db, t), _func_jvp(lambda a, c: N.mp_sum(a, c, t), (x, b), (dx, db)))
        torch.testing.assert_close(N.mp_sum_jvp(dx, None, t), _func_jvp(lambda a: N.mp_sum(a, b, t), (x,), (dx,)))
        torch.testing.assert_close(N.mp_sum_jvp(None, db, t), _func_jvp(lambda c: N.mp_sum(x, c, t), (b,), (db,)))
    assert N.mp_sum_jvp(None, None) is None and N.mp_silu_jvp(x, None) is None
    fourier = N.MPFourier(16).double()
    s = torch.rand(9, dtype=torch.float64, generator=g)
    out, dout = fourier.jvp(s, torch.ones_like(s))
    torch.testing.assert_close(out, fourier(s))
    torch.testing.assert_close(dout, _func_jvp(fourier, (s,), (torch.ones_like(s),)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flavor, resample_mode, attention", [("enc", "down", True), ("dec", "up", False), ("dec", "keep", True)])
def test_block_tangent_matches_func_jvp(flavor, resample_mode, attention):
    block = N.Block(16, 32, 24, flavor, resample_mode, attention=attention, channels_per_head=8, clip_act=1.5).double()
    with torch.no_grad():
        block.emb_gain.fill_(0.8)
    g = torch.Generator().manual_seed(4)
    x, dx = torch.randn(2, 3, 16, 8, 8, dtype=torch.float64, generator=g)
    emb, demb = torch.randn(2, 3, 24, dtype=torch.float64, generator=g)
    y, dy = block.jvp(x, dx, emb, demb)
    torch.testing.assert_close(y, block(x, emb), rtol=0, atol=0)
    ref = _func_jvp(block, (x, emb), (dx, demb))
    assert _rel(dy, ref) < 1e-12
    assert (y.abs() >= 1.5).any()  # the clip is active somewhere, so its rule was exercised


@pytest.fixture
def flow_net():
    """toy-16 in float64 with non-zero gains and distinct t / r embeddings."""
    net = _untrained_but_nontrivial(N.build("toy-16")).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "emb_noise_t" in name or "emb_noise_r" in name:
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    x_t, v_hat = torch.randn(2, 4, 3, 16, 16, dtype=torch.float64, generator=g)
    t = 0.05 + 0.9 * torch.rand(4, dtype=torch.float64, generator=g)
    return net, x_t, v_hat, t, 0.5 * t, torch.tensor([0, 3, -1, 9])


def test_forward_with_v_hat_matches_func_jvp(flow_net):
    net, x_t, v_hat, t, r, labels = flow_net
    u, dudt = net(x_t, t, r, labels, v_hat=v_hat)
    assert u.requires_grad and not dudt.requires_grad
    torch.testing.assert_close(u, net(x_t, t, r, labels), rtol=0, atol=0)
    ref = _func_jvp(lambda a, b: net(a, b, r, labels), (x_t, t), (v_hat, torch.ones_like(t)))
    assert _rel(dudt, ref) < 1e-12


def test_tangent_pass_costs_one_convolution_per_conv_and_records_no_graph(flow_net):
    net, x_t, v_hat, t, r, labels = flow_net

    def convolutions_and_saved(**kwargs):
        saved = []
        with torch.profiler.profile() as prof, torch.autograd.graph.saved_tensors_hooks(
            lambda s: saved.append(s.shape) or s, lambda s: s
        ):
            net(x_t, t, r, labels, **kwargs)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution"), len(saved)

    plain_convs, plain_saved = convolutions_and_saved()
    convs, saved = convolutions_and_saved(v_hat=v_hat)
    assert plain_convs > 0 and convs == 2 * plain_convs  # primal + tangent, no conv(x, zero weight tangent)
    assert saved == plain_saved  # the tangent's arithmetic stays out of the graph of u


def test_tangent_pass_calls_every_submodule_through_its_hooks(flow_net):
    # Hooks (and wrappers such as FSDP) must see the submodule calls of both passes.
    net, x_t, v_hat, t, r, labels = flow_net
    calls = {"plain": [], "tangent": []}
    mode = ["plain"]
    modules = [m for m in net.unet.modules() if isinstance(m, (N.MPConv, N.Block))]
    hooks = [m.register_forward_hook(lambda m, i, o: calls[mode[0]].append(m)) for m in modules]
    with torch.no_grad():
        net(x_t, t, r, labels)
        mode[0] = "tangent"
        net(x_t, t, r, labels, v_hat=v_hat)
    for h in hooks:
        h.remove()
    used = {id(m) for m in calls["plain"]}
    assert used and {id(m) for m in calls["tangent"]} == used
    assert len(calls["tangent"]) == len(calls["plain"])


def test_tangent_follows_the_dropout_mask():
    # Dropout is random: with the same seed both evaluations of a central difference draw the
    # same masks, and the tangent must use the primal's mask.
    net = _untrained_but_nontrivial(N.build("tiny", dropout=0.3).train()).double()
    g = torch.Generator().manual_seed(6)
    x_t, v_hat = torch.randn(2, 3, 2, 8, 8, dtype=torch.float64, generator=g)
    t, r, labels, h = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64), torch.zeros(3, dtype=torch.float64), None, 1e-6

    def u_at(eps):
        torch.manual_seed(11)
        return net(x_t + eps * v_hat, t + eps, r, labels, v_hat=v_hat)

    _, dudt = u_at(0.0)
    fd = (u_at(h)[0] - u_at(-h)[0]) / (2 * h)
    assert _rel(dudt, fd) < 1e-6
    torch.manual_seed(12)
    other_mask = net(x_t, t, r, labels, v_hat=v_hat)[1]
    assert _rel(other_mask, dudt) > 1e-3  # the masks matter, so the check above is not vacuous


def test_clamp_tangent_exactly_at_the_bound_passes_the_tangent_through():
    # The clamp is not differentiable at +-bound; `clamp_jvp` defines its tangent there as dx
    # (derivative one, PyTorch's convention), so the hand-written tangent pass and torch.func /
    # autograd agree on activations that land exactly on `clip_act`; one float beyond, it is zero.
    bound = 2.0
    beyond = torch.nextafter(torch.tensor(bound, dtype=torch.float64), torch.tensor(math.inf, dtype=torch.float64))
    x = torch.tensor([-beyond.item(), -bound, bound, beyond.item(), 0.5], dtype=torch.float64)
    dx = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    got = N.clamp_jvp(x, dx, bound)
    assert got.tolist() == [0.0, 2.0, 3.0, 0.0, 5.0]
    assert torch.equal(got, _func_jvp(lambda a: a.clamp(-bound, bound), (x,), (dx,)))
