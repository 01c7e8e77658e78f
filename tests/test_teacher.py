"""Toy EDM2 teacher: loss, schedules, power EMA, and a short end-to-end training run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from remeanflow import checkpoints, misc, networks, teacher
from remeanflow.settings import TeacherTrainSettings

TINY = dict(img_channels=3, label_dim=2)  # 'tiny' preset (8x8) reshaped for RGB, 2 classes


def colour_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of near-constant images: reddish (0) and bluish (1), random brightness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None] == 0, [200, 40, 40], [40, 40, 200]) * rng.uniform(0.6, 1.0, (n, 1))
    images = base[:, :, None, None] + rng.normal(0, 4, (n, 3, 8, 8))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def random_tiny_net(seed: int = 0) -> networks.Precond:
    """A tiny net whose output and log-variance are not trivially zero (EDM2 inits gains at 0)."""
    torch.manual_seed(seed)
    net = networks.build("tiny", **TINY)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for block in [*net.unet.enc.values(), *net.unet.dec.values()]:
            if hasattr(block, "emb_gain"):
                block.emb_gain.fill_(0.5)
    return net


def run(tmp_path, images, labels, name="run", diverge=False, **kwargs):
    recipe = dict(preset="tiny", steps=3, batch_size=8, guide_step=2)
    recipe.update((k, kwargs.pop(k)) for k in list(kwargs) if k in RECIPE_KEYS)
    args = dict(net_kwargs=TINY, progress=False, out_main=tmp_path / f"{name}-main.pt",
                out_guide=tmp_path / f"{name}-guide.pt")
    args.update(kwargs)
    settings = TeacherTrainSettings(**recipe)
    if diverge:  # settings refuse a non-finite lr; set one behind their back to make the weights blow up
        object.__setattr__(settings, "lr_ref", math.inf)
    return teacher.train_teacher(images, labels, settings, **args)


RECIPE_KEYS = {f.name for f in dataclasses.fields(TeacherTrainSettings)}


# ----------------------------------------------------------------------------------------------
# Loss.


def test_edm2_loss_matches_hand_computation_in_f_space():
    net = random_tiny_net()
    x = misc.uint8_to_float(colour_set(6, 0)[0])
    labels = torch.tensor([0, 1, -1, 0, 1, 1])
    loss = teacher.edm2_loss(net, x, labels, torch.Generator().manual_seed(3), P_mean=-0.4, P_std=1.0)

    # Same draws, in the documented order: ln-sigma normals, then the noise.
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(6, generator=g) - 0.4).exp().reshape(-1, 1, 1, 1)
    y = x + sigma * torch.randn(x.shape, generator=g)
    # EDM2's weighting makes the loss an unweighted MSE on the raw network output F against its
    # effective target (x - c_skip y) / c_out (EDM Eq. 8): check that form, not lambda itself.
    with torch.no_grad():
        D = net.denoise(y, sigma.flatten(), labels)
        logvar = net.logvar(sigma.flatten()).flatten()
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    F_out, F_target = (D - c_skip * y) / c_out, (x - c_skip * y) / c_out
    per_sample = (F_out - F_target).square().mean(dim=(1, 2, 3)) / logvar.exp() + logvar
    assert torch.isfinite(loss) and loss.ndim == 0
    assert logvar.abs().max() > 1e-3  # the log-variance term is really exercised
    torch.testing.assert_close(loss.detach(), per_sample.mean(), rtol=1e-5, atol=1e-6)


def test_edm2_loss_deterministic_given_generator_and_differentiable():
    net = random_tiny_net()
    x = misc.uint8_to_float(colour_set(4, 1)[0])
    labels = torch.tensor([0, 1, 0, 1])
    a = teacher.edm2_loss(net, x, labels, torch.Generator().manual_seed(7))
    b = teacher.edm2_loss(net, x, labels, torch.Generator().manual_seed(7))
    c = teacher.edm2_loss(net, x, labels, torch.Generator().manual_seed(8))
    assert a.item() == b.item()
    assert a.item() != c.item()
    a.backward()
    assert net.logvar_linear.weight.grad.abs().sum() > 0  # the uncertainty head is trained


def test_uint8_to_float_range():
    out = misc.uint8_to_float(np.array([0, 255, 128], dtype=np.uint8))
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


# ----------------------------------------------------------------------------------------------
# Learning rate.


def test_edm2_lr_rampup_and_inverse_sqrt_decay():
    lr = lambda step, **kw: teacher.edm2_lr(step, lr_ref=0.01, **{"t_ref_steps": None, "rampup_steps": None, **kw})
    assert lr(7) == 0.01  # both factors disabled
    assert lr(5, rampup_steps=10) == pytest.approx(0.005)
    assert lr(10, rampup_steps=10) == pytest.approx(0.01)
    assert lr(50, rampup_steps=10) == pytest.approx(0.01)
    assert lr(50, t_ref_steps=100) == pytest.approx(0.01)  # constant before t_ref
    assert lr(400, t_ref_steps=100) == pytest.approx(0.005)  # 1/sqrt(4)
    assert lr(900, t_ref_steps=100, rampup_steps=10) == pytest.approx(0.01 / 3)
    assert lr(2, t_ref_steps=100, rampup_steps=10) == pytest.approx(0.002)
    with pytest.raises(ValueError):
        lr(-1)


# ----------------------------------------------------------------------------------------------
# Power-function EMA.


def test_std_gamma_conversion_matches_edm2_values():
    # EDM2 section 3.1: sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94.
    assert teacher.std_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert teacher.std_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.01, 0.05, 0.2):
        assert teacher.gamma_to_std(teacher.std_to_gamma(std)) == pytest.approx(std, rel=1e-9)
    with pytest.raises(ValueError):
        teacher.std_to_gamma(0.3)  # wider than any gamma >= 0 allows


def test_power_ema_equals_closed_form_weighted_average():
    source = torch.nn.Linear(1, 1, bias=False).double()
    ema = teacher.PowerEMA(source, std=0.1)
    gamma = teacher.std_to_gamma(0.1)
    thetas = np.random.default_rng(0).normal(size=40)
    for t, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            source.weight.fill_(theta)
        ema.update(t)
        # Unrolling beta(t) = (1 - 1/t)^(gamma+1) gives weights (i^(g+1) - (i-1)^(g+1)) / t^(g+1).
        i = np.arange(1, t + 1, dtype=np.float64)
        weights = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / t ** (gamma + 1)
        assert weights.sum() == pytest.approx(1.0)
        assert ema.net.weight.item() == pytest.approx(float(weights @ thetas[:t]), rel=1e-9, abs=1e-12)
    # The average leans on recent steps but is not the last value.
    assert ema.net.weight.item() != pytest.approx(thetas[-1])
    assert not ema.net.training and not ema.net.weight.requires_grad
    with torch.no_grad():
        source.weight.fill_(123.0)
    assert ema.net.weight.item() != 123.0  # a copy, not a view
    with pytest.raises(ValueError):
        ema.update(0)


# ----------------------------------------------------------------------------------------------
# Training.


def test_train_teacher_learns_and_saves(tmp_path):
    images, labels = colour_set(64, 0)
    metrics = tmp_path / "metrics.csv"
    summary = run(tmp_path, images, labels, steps=60, batch_size=16, guide_step=10, metrics_csv=metrics)

    df = pd.read_csv(metrics)
    assert list(df.columns) == ["role", "step", "loss", "lr", "seconds"]
    assert df.step.tolist() == list(range(1, 61)) and set(df.role) == {"main"}
    assert df.lr[2] == pytest.approx(0.005) and df.lr[59] == pytest.approx(0.01)  # rampup 60 // 10
    assert df.seconds.is_monotonic_increasing
    assert df.loss.iloc[-10:].mean() < 0.6 * df.loss.iloc[:10].mean()
    assert summary["final_loss"] == pytest.approx(df.loss.iloc[-6:].mean())

    main = checkpoints.load_net(summary["out_main"])
    guide = checkpoints.load_net(summary["out_guide"])
    assert main["meta"]["role"] == "main" and main["meta"]["steps"] == 60
    assert guide["meta"]["role"] == "guide" and guide["meta"]["steps"] == 10
    assert guide["meta"]["guide"] == "snapshot"
    assert main["init_kwargs"]["img_channels"] == 3 and main["init_kwargs"]["label_dim"] == 2
    assert summary["params_main"] == summary["params_guide"] == sum(p.numel() for p in main["net"].parameters())
    assert summary["sha256_main"] != summary["sha256_guide"]
    assert (tmp_path / "run-main.pt.sha256").read_text().split()[0] == summary["sha256_main"]

    # Held-out denoising at a mid noise level: main beats the untrained net, the guide lies between.
    x_np, c_np = colour_set(64, 1)
    x, c = misc.uint8_to_float(x_np), torch.from_numpy(c_np)
    y = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    untrained = networks.build("tiny", **TINY).eval()
    with torch.no_grad():
        mse = {k: (n.denoise(y, 0.5, c) - x).square().mean().item()
               for k, n in [("main", main["net"]), ("guide", guide["net"]), ("init", untrained)]}
    assert mse["main"] < 0.7 * mse["init"]
    assert mse["main"] < mse["guide"] < mse["init"]


def test_train_teacher_deterministic_and_reads_zarr(tmp_path):
    images, labels = colour_set(24, 2)
    store = zarr.create_array(tmp_path / "images.zarr", shape=images.shape, chunks=(8, 3, 8, 8), dtype="uint8")
    store[...] = images
    a = run(tmp_path, images, labels, name="a")
    b = run(tmp_path, zarr.open_array(tmp_path / "images.zarr", mode="r"), labels, name="b")
    c = run(tmp_path, images, labels, name="c", seed=1)
    # Compare weights, not file hashes: torch.save names its zip records after the (temporary,
    # per-process) file name, so equal nets saved to different paths hash differently.
    for key in ("out_main", "out_guide"):
        wa, wb, wc = (checkpoints.load_net(s[key])["net"].state_dict() for s in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_train_teacher_separate_guide_net(tmp_path):
    images, labels = colour_set(16, 3)
    metrics = tmp_path / "metrics.csv"
    summary = run(
        tmp_path, images, labels, steps=4, guide_step=2, guide_preset="tiny",
        guide_net_kwargs=dict(model_channels=4, channels_per_head=4), metrics_csv=metrics,
    )
    guide = checkpoints.load_net(summary["out_guide"])
    assert summary["guide_mode"] == "separate"
    assert summary["params_guide"] < summary["params_main"]
    # Data-shape keys come from the main net, not from the guide's preset (which says 2 channels).
    assert guide["init_kwargs"]["img_channels"] == 3 and guide["init_kwargs"]["label_dim"] == 2
    assert guide["init_kwargs"]["model_channels"] == 4
    assert guide["meta"]["guide"] == "separate" and guide["meta"]["steps"] == 2
    df = pd.read_csv(metrics)
    assert df.groupby("role").step.max().to_dict() == {"guide": 2, "main": 4}


@pytest.mark.parametrize("steps, message", [(4, "non-finite loss nan at step 2"), (1, "non-finite after step 1")])
def test_non_finite_training_stops_and_writes_nothing(tmp_path, steps, message):
    # An infinite learning rate turns the weights into inf/NaN on the first update: with more
    # steps the next loss is NaN; with a single step the final weights are caught before saving.
    images, labels = colour_set(16, 4)
    with pytest.raises(FloatingPointError, match=message):
        run(tmp_path, images, labels, steps=steps, guide_step=steps, diverge=True, rampup_steps=0,
            metrics_csv=tmp_path / "metrics.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(guide_step=5), "guide_step"),
        (dict(images=np.zeros((8, 3, 8, 8), np.float32)), "uint8"),
        (dict(images=np.zeros((8, 3, 16, 16), np.uint8)), "expects"),
        (dict(labels=np.full(8, 2)), r"labels must lie in \[0, 1\]"),
        (dict(labels=np.zeros(7, int)), "7 labels for 8 images"),
        (dict(max_in_memory_bytes=100), "in-memory limit"),
    ],
)
def test_train_teacher_rejects_bad_inputs(tmp_path, change, message):
    args = dict(images=np.zeros((8, 3, 8, 8), np.uint8), labels=np.zeros(8, int))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, args.pop("images"), args.pop("labels"), **args)
    assert list(tmp_path.iterdir()) == []
