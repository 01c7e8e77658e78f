"""Toy EDM2 teacher for the embedded default: EDM2 training plus an autoguidance guide.

The real pipeline fetches published EDM2 checkpoints; the embedded default trains a small
EDM2-architecture net on the toy image set instead (docs/architecture.md, "teacher"). The recipe is
EDM2's (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
arXiv 2312.02696):

* the uncertainty-weighted denoising loss with a learned log-variance (EDM2 Eqs. 14-16, 21);
* Adam with betas (0.9, 0.99), an inverse-square-root learning-rate decay and a linear warm-up;
* forced weight normalisation (EDM2 Eq. 47) before every forward, done outside the forward
  (`Precond.normalize_weights_`) so that the forward stays a pure function of the parameters;
* a power-function EMA of the weights (EDM2 section 3.1; Eqs. 123, 126, 127 of its appendix).

The autoguidance guide (Karras et al., "Guiding a Diffusion Model with a Bad Version of
Itself", arXiv 2406.02507) is a weaker model of the same task: by default the EMA snapshot of the
same run at an early step; optionally a separately trained, smaller net.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import tqdm

from . import checkpoints, networks
from .fileio import atomic_path
from .misc import drop_labels, tail_mean, uint8_to_float
from .settings import TeacherTrainSettings

# Keys of a net's init_kwargs that are fixed by the data, so a separately trained guide must
# share them with the main net whatever its preset says.
DATA_KEYS = ("img_resolution", "img_channels", "label_dim")

# EDM2's StandardRGBEncoder: uint8 pixels -> [-1, 1].
ENCODER = {"class_name": "StandardRGBEncoder"}

# The whole dataset is read into memory once; above this size the in-pipeline teacher is the
# wrong tool (fetch a published EDM2 checkpoint instead).
MAX_IN_MEMORY_BYTES = 2 << 30

# ----------------------------------------------------------------------------------------------
# Loss and schedules.


def edm2_loss(
    net: networks.Precond,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None,
    *,
    P_mean: float = -0.4,
    P_std: float = 1.0,
) -> torch.Tensor:
    """EDM2's uncertainty-weighted denoising loss (EDM2 Eqs. 14-16 and 21), a scalar.

    Per sample: ln(sigma) ~ N(P_mean, P_std^2), y = x + sigma n with n ~ N(0, I),
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 and u(sigma) = net.logvar(sigma);
    loss_i = lambda / exp(u) · mean_CHW((D(y; sigma) - x)^2) + u. Returns mean_i loss_i.

    The learned u(sigma) is the log of the loss's expected value at sigma, so dividing by exp(u)
    equalises the contribution of every noise level (EDM2 Eq. 21). EDM2 backpropagates the sum
    over C, H, W instead of the mean; the two differ by the constant C·H·W, which Adam ignores
    (up to its eps), and the mean keeps the reported value independent of the image size.

    Random draws, in this order, from `generator` (on its device): ln-sigma normals [N], then
    the noise n like x. `labels` are class indices (-1 = null) or one-hot rows, as given.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = x.shape[0]
    rnd = torch.randn(n, generator=generator, device=gen_device).to(x.device)
    sigma = (rnd * P_std + P_mean).exp()
    noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
    sigma_b = sigma.reshape(-1, 1, 1, 1)
    sd = net.sigma_data
    weight = (sigma_b**2 + sd**2) / (sigma_b * sd) ** 2
    denoised = net.denoise(x + sigma_b * noise, sigma, labels)
    logvar = net.logvar(sigma)
    err = (denoised - x).square().mean(dim=(1, 2, 3), keepdim=True)
    return (weight / logvar.exp() * err + logvar).mean()


def edm2_lr(step: int, *, lr_ref: float, t_ref_steps: int | None, rampup_steps: int | None) -> float:
    """EDM2 learning rate for optimiser step `step` (1-based).

    alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)) (EDM2 section 2, "learning rate decay": the
    inverse-square-root decay that magnitude-preserving nets need instead of weight decay), times
    a linear warm-up min(t / t_rampup, 1). `t_ref_steps` or `rampup_steps` None/0 disables that
    factor. EDM2 evaluates the schedule at the images seen *before* a step, so its first step has
    lr 0; counting the current step instead wastes none.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lr = lr_ref
    if t_ref_steps:
        lr /= math.sqrt(max(step / t_ref_steps, 1))
    if rampup_steps:
        lr *= min(step / rampup_steps, 1)
    return lr


# ----------------------------------------------------------------------------------------------
# Power-function EMA.


def gamma_to_std(gamma: float) -> float:
    """Relative std of the power-function EMA profile t^gamma (EDM2 Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """Exponent gamma >= 0 of the power-function EMA with relative std `std` (EDM2 Eq. 126).

    Inverting Eq. 123 gives the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with
    s = std^-2; on gamma >= 0 the std decreases monotonically, so the largest real root is it.
    """
    if not 0 < std <= gamma_to_std(0):
        raise ValueError(f"EMA std must lie in (0, {gamma_to_std(0):.4f}] (gamma >= 0), got {std}")
    s = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


class PowerEMA:
    """Power-function EMA of a net's weights (EDM2 section 3.1).

    theta_hat(t) = beta(t) theta_hat(t-1) + (1 - beta(t)) theta(t), beta(t) = (1 - 1/t)^(gamma+1)
    (EDM2 Eq. 127 with one step per unit of t). The average then weights step i by
    (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), a profile proportional to t^gamma whose width
    relative to the training length is `std`: unlike a fixed-halflife EMA it forgets the random
    initialisation at the same rate whatever the run length. `.net` is a copy in eval mode
    without gradients.
    """

    def __init__(self, net: torch.nn.Module, std: float = 0.05):
        self.source = net
        self.std = std
        self.gamma = std_to_gamma(std)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def beta(self, step: int) -> float:
        """Decay after optimiser step `step` >= 1; beta(1) = 0 makes the EMA the first weights."""
        if step < 1:
            raise ValueError(f"EMA steps are 1-based, got {step}")
        return (1 - 1 / step) ** (self.gamma + 1)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the source weights after optimiser step `step` (1-based)."""
        beta = self.beta(step)
        for p_ema, p in zip(self.net.parameters(), self.source.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.net.buffers(), self.source.buffers()):
            b_ema.copy_(b)  # buffers (Fourier frequencies) are not trained: keep them identical


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class _Data:
    images: np.ndarray  # uint8 [N, C, H, W], in memory
    labels: np.ndarray | None  # int64 [N], or None for an unconditional net


def _load_data(images, labels, net: networks.Precond, max_bytes: int) -> _Data:
    """Read the whole image set (numpy or zarr array) into memory and check it against the net.

    The toy set is a few MB, so one read beats per-batch random access into a Zarr store (which
    is ~30x slower than whole-chunk reads). Larger sets are refused, not streamed: ImageNet-size
    teachers come from published EDM2 checkpoints.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {shape}")
    if np.dtype(images.dtype) != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got {images.dtype}")
    if math.prod(shape) > max_bytes:
        raise ValueError(
            f"image set of {math.prod(shape) / 2**30:.1f} GiB exceeds the in-memory limit "
            f"{max_bytes / 2**30:.1f} GiB; the in-pipeline teacher is for small (toy) sets"
        )
    expected = (net.img_channels, net.img_resolution, net.img_resolution)
    if shape[1:] != expected:
        raise ValueError(f"images are {shape[1:]} per sample but the net expects {expected}")
    if shape[0] == 0:
        raise ValueError("the image set is empty")
    pixels = np.ascontiguousarray(images[...])
    if not net.label_dim:
        return _Data(pixels, None)
    if labels is None:
        raise ValueError(f"the net is class-conditional (label_dim {net.label_dim}) but no labels were given")
    classes = np.asarray(labels[...]).astype(np.int64).reshape(-1)
    if classes.shape[0] != shape[0]:
        raise ValueError(f"{classes.shape[0]} labels for {shape[0]} images")
    if classes.min() < 0 or classes.max() >= net.label_dim:
        raise ValueError(f"labels must lie in [0, {net.label_dim - 1}], got [{classes.min()}, {classes.max()}]")
    return _Data(pixels, classes)


def _batch_indices(num: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices: a fresh permutation per epoch, batches may span two epochs
    (every image is seen once per epoch, as EDM2's infinite sampler does)."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(num, generator=generator)])
        yield order[:batch_size].numpy()
        order = order[batch_size:]


# ----------------------------------------------------------------------------------------------
# Training.


def _check_finite_params(net: torch.nn.Module, role: str, step: int) -> None:
    """Refuse to keep weights that went non-finite (they would be saved as a broken teacher)."""
    for name, p in net.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"teacher ({role}): parameter {name} is non-finite after step {step}")


def _seeded_build(preset: str | None, kwargs: dict, seed: int, device) -> networks.Precond:
    """Build a net whose random initialisation depends only on `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = networks.build(preset, **kwargs)
    return net.to(device)


@dataclasses.dataclass
class _Run:
    ema: PowerEMA
    losses: list[float]
    rows: list[dict]
    snapshot: networks.Precond | None = None  # EMA copy at `snapshot_step`
    snapshot_losses: list[float] | None = None


def _train(
    net: networks.Precond,
    data: _Data,
    *,
    role: str,
    steps: int,
    batch_size: int,
    lr_ref: float,
    t_ref_steps: int | None,
    rampup_steps: int | None,
    ema_std: float,
    P_mean: float,
    P_std: float,
    label_dropout: float,
    seed: int,
    snapshot_step: int | None,
    progress: bool,
) -> _Run:
    """One EDM2 training run of `net` for `steps` steps; raises FloatingPointError on NaN/Inf."""
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # CPU: same batches and noise on any device
    batches = _batch_indices(data.images.shape[0], batch_size, generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr_ref, betas=(0.9, 0.99), eps=1e-8)
    ema = PowerEMA(net, std=ema_std)
    run = _Run(ema=ema, losses=[], rows=[])
    net.train()
    start = time.perf_counter()
    bar = tqdm.tqdm(range(1, steps + 1), desc=f"teacher {role}", unit="step", disable=not progress)
    for step in bar:
        idx = next(batches)
        x = uint8_to_float(data.images[idx]).to(device)
        labels = None
        if data.labels is not None:
            labels = drop_labels(torch.from_numpy(data.labels[idx]), label_dropout, generator).to(device)

        net.normalize_weights_()  # EDM2 Eq. 47, outside the forward (see networks.py)
        loss = edm2_loss(net, x, labels, generator, P_mean=P_mean, P_std=P_std)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher ({role}): non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            raise FloatingPointError(f"teacher ({role}): non-finite gradient at step {step}")
        lr = edm2_lr(step, lr_ref=lr_ref, t_ref_steps=t_ref_steps, rampup_steps=rampup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        ema.update(step)

        run.losses.append(loss.item())
        run.rows.append(dict(role=role, step=step, loss=run.losses[-1], lr=lr, seconds=time.perf_counter() - start))
        if step == snapshot_step:
            _check_finite_params(ema.net, role, step)
            run.snapshot = copy.deepcopy(ema.net)
            run.snapshot_losses = list(run.losses)
        if step % 10 == 0 or step == steps:
            bar.set_postfix(loss=f"{run.losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
    _check_finite_params(ema.net, role, steps)
    return run


def _rampup(rampup_steps: int | None, steps: int) -> int:
    """Warm-up length: as given, or a tenth of the run (long enough for Adam's second-moment
    estimate to settle before the full learning rate)."""
    return steps // 10 if rampup_steps is None else rampup_steps


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _write_metrics(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["role", "step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(rows)


def train_teacher(
    images,
    labels,
    recipe: TeacherTrainSettings,
    *,
    net_kwargs: dict | None = None,  # data-shape keys (label_dim, img_resolution, img_channels) over the preset's
    seed: int = 0,
    out_main,
    out_guide,
    metrics_csv=None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    max_in_memory_bytes: int = MAX_IN_MEMORY_BYTES,
    t_ref_steps: int | None = None,  # EDM2 learning-rate decay reference; None: no decay
    guide_preset: str | None = None,  # train a separate guide net of this preset (None: EMA snapshot)
    guide_net_kwargs: dict | None = None,  # overrides of the separate guide's preset
) -> dict:
    """Train a small EDM2 teacher and its autoguidance guide; save both with `checkpoints.save_net`.

    images: uint8 [N, C, H, W] (numpy or zarr array; read into memory once); labels: int [N].
    The saved main net is the power-function EMA (std `ema_std`) after `steps` steps.

    Guide (autoguidance, arXiv 2406.02507: a weaker model of the same task and conditioning):
    * `guide_preset` None (default): the EMA snapshot of this same run at step `guide_step`;
    * `guide_preset` given: a separate net of that preset (data-shape keys taken from the main
      net, then `guide_net_kwargs`) trained with the same recipe and seed for `guide_step` steps.

    `recipe.label_dropout` (class dropout to the null class) is 0 by default: autoguidance needs
    no unconditional model, unlike CFG. Re-MeanFlow's stage-1 training teaches the null class to
    the student itself. The recipe's bounds were checked when it was built.

    Nothing is written unless both runs finish with finite losses, gradients and weights: a
    non-finite value raises FloatingPointError naming the step. Returns a summary dict.
    """
    preset, steps, batch_size, guide_step = recipe.preset, recipe.steps, recipe.batch_size, recipe.guide_step
    lr_ref, rampup_steps, ema_std = recipe.lr_ref, recipe.rampup_steps, recipe.ema_std
    P_mean, P_std, label_dropout = recipe.P_mean, recipe.P_std, recipe.label_dropout
    device = torch.device(device)
    net = _seeded_build(preset, dict(net_kwargs or {}), seed, device)
    data = _load_data(images, labels, net, max_in_memory_bytes)

    recipe = dict(
        batch_size=batch_size, lr_ref=lr_ref, t_ref_steps=t_ref_steps, ema_std=ema_std, P_mean=P_mean,
        P_std=P_std, label_dropout=label_dropout, seed=seed, progress=progress,
    )
    separate = guide_preset is not None
    start = time.perf_counter()
    main = _train(
        net, data, role="main", steps=steps, rampup_steps=_rampup(rampup_steps, steps),
        snapshot_step=None if separate else guide_step, **recipe,
    )
    if separate:
        shape = {k: net.init_kwargs[k] for k in DATA_KEYS}
        guide_net = _seeded_build(guide_preset, {**shape, **(guide_net_kwargs or {})}, seed, device)
        guide = _train(
            guide_net, data, role="guide", steps=guide_step, rampup_steps=_rampup(rampup_steps, guide_step),
            snapshot_step=None, **recipe,
        )
        guide_model, guide_losses = guide.ema.net, guide.losses
    else:
        guide, guide_model, guide_losses = None, main.snapshot, main.snapshot_losses
    seconds = time.perf_counter() - start

    # Everything trained and finite: only now write the outputs.
    recipe.pop("progress")
    sha_main = checkpoints.save_net(
        out_main, main.ema.net, ENCODER,
        dict(recipe, role="main", preset=preset, steps=steps, rampup_steps=_rampup(rampup_steps, steps),
             loss=tail_mean(main.losses)),
    )
    sha_guide = checkpoints.save_net(
        out_guide, guide_model, ENCODER,
        dict(recipe, role="guide", guide="separate" if separate else "snapshot",
             preset=guide_preset if separate else preset, steps=guide_step,
             rampup_steps=_rampup(rampup_steps, guide_step if separate else steps), loss=tail_mean(guide_losses)),
    )
    if metrics_csv is not None:
        _write_metrics(metrics_csv, main.rows + (guide.rows if guide else []))

    return dict(
        steps=steps,
        guide_step=guide_step,
        guide_mode="separate" if separate else "snapshot",
        final_loss=tail_mean(main.losses),
        last_loss=main.losses[-1],
        first_loss=main.losses[0],
        guide_loss=tail_mean(guide_losses),
        seconds=seconds,
        seconds_per_step=seconds / (steps + (guide_step if separate else 0)),
        params_main=_num_params(main.ema.net),
        params_guide=_num_params(guide_model),
        sha256_main=sha_main,
        sha256_guide=sha_guide,
        out_main=str(Path(out_main)),
        out_guide=str(Path(out_guide)),
    )
