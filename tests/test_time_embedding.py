"""Tests of remeanflow.time_embedding: time sampling, the fitting loss and the fit itself."""

from __future__ import annotations

import copy

import pytest
import torch

from remeanflow import networks, time_embedding

TRAINED = ("unet.emb_noise_t.weight", "unet.emb_noise_r.weight")


def tiny_net(seed: int = 0) -> networks.Precond:
    torch.manual_seed(seed)
    return networks.build("tiny")


def test_sample_embedding_times():
    t, r = time_embedding.sample_embedding_times(10_000, torch.Generator().manual_seed(0))
    assert (t >= r).all()
    for s in (t, r):
        assert s.min() >= 1 / 501 and s.max() <= 80 / 81
    assert (t > r).float().mean() > 0.99  # independent draws, not copies
    # max / min of two uniforms: E[t] = 2/3, E[r] = 1/3 (clamping moves them by < 1e-3).
    assert t.mean().item() == pytest.approx(2 / 3, abs=0.01)
    assert r.mean().item() == pytest.approx(1 / 3, abs=0.01)
    again = time_embedding.sample_embedding_times(10_000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again[0]) and torch.equal(r, again[1])


def test_loss_target_is_teacher_embedding_of_t():
    net = tiny_net()
    unet = net.unet
    t = torch.tensor([0.05, 0.3, 0.5, 0.9])
    r = torch.tensor([0.01, 0.2, 0.5, 0.1])
    sigma = t / (1 - t)
    with torch.no_grad():
        target = unet.emb_noise(unet.emb_fourier(sigma.log() / 4))
        emb = networks.mp_sum(unet.emb_noise_t(unet.emb_fourier(t)), unet.emb_noise_r(unet.emb_fourier(r)))
    expected = ((emb - target) ** 2).mean()
    assert time_embedding.time_embedding_loss(unet, t, r).item() == pytest.approx(expected.item(), rel=1e-6)

    # With emb_r silenced, the new embedding ignores r; so must the loss: the target depends on t only.
    with torch.no_grad():
        unet.emb_noise_r.weight.zero_()
    a = time_embedding.time_embedding_loss(unet, t, r)
    b = time_embedding.time_embedding_loss(unet, t, torch.full_like(r, 1e-3))
    assert torch.equal(a, b)


def test_fit_reduces_loss_and_touches_only_time_embeddings():
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    out = time_embedding.fit_time_embedding(net, steps=40, batch=128, lr=3e-2, progress=False, log_every=10)
    # The teacher copy is not already a fit: it embeds raw t where the teacher had ln(sigma)/4.
    assert out["initial_loss"] > 0.5
    assert out["final_loss"] < 0.5 * out["initial_loss"]
    assert [step for step, _ in out["history"]] == [0, 10, 20, 30, 39]
    after = net.state_dict()
    for name in before:
        if name in TRAINED:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    # Forced weight normalisation keeps the trained rows at unit RMS.
    for name in TRAINED:
        rms = after[name].square().mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_fit_starts_from_teacher_copy():
    net = tiny_net()
    out = time_embedding.fit_time_embedding(net, steps=0, batch=64, progress=False)
    w = net.unet.emb_noise.weight
    torch.testing.assert_close(net.unet.emb_noise_t.weight, networks.normalize(w))
    torch.testing.assert_close(net.unet.emb_noise_r.weight, networks.normalize(w))
    # Forced normalisation of already-normalised weights only moves them by EDM2's eps (1e-4).
    assert out["final_loss"] == pytest.approx(out["initial_loss"], rel=1e-3)


def test_fit_deterministic_given_seed():
    def fit(seed):
        net = tiny_net()
        out = time_embedding.fit_time_embedding(net, steps=5, batch=32, seed=seed, progress=False, log_every=1)
        return net.state_dict(), out

    (sd_a, out_a), (sd_b, out_b), (sd_c, _) = fit(0), fit(0), fit(1)
    assert out_a == out_b
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a[TRAINED[0]], sd_c[TRAINED[0]])


def test_fit_restores_requires_grad():
    net = tiny_net()
    net.requires_grad_(False)
    time_embedding.fit_time_embedding(net, steps=2, batch=16, progress=False)
    assert not any(p.requires_grad for p in net.parameters())


def test_fit_one_step_matches_manual_step():
    # One Adam step on the normalised weights, then forced normalisation (EDM2 Eq. 47), with the
    # training batch drawn after the evaluation batch from the seeded generator.
    net, ref = tiny_net(), tiny_net()
    time_embedding.fit_time_embedding(net, steps=1, batch=32, lr=0.1, seed=3, progress=False)

    ref.init_time_embedding_()
    layers = [ref.unet.emb_noise_t, ref.unet.emb_noise_r]
    for layer in layers:
        layer.normalize_weight_()
    gen = torch.Generator().manual_seed(3)
    time_embedding.sample_embedding_times(32, gen)  # the evaluation batch
    t, r = time_embedding.sample_embedding_times(32, gen)
    opt = torch.optim.Adam([layer.weight for layer in layers], lr=0.1, betas=(0.9, 0.99))
    time_embedding.time_embedding_loss(ref.unet, t, r).backward()
    opt.step()
    for layer in layers:
        layer.normalize_weight_()
    for name in TRAINED:
        torch.testing.assert_close(net.state_dict()[name], ref.state_dict()[name], rtol=1e-6, atol=1e-7)
