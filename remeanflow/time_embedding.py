"""Initialisation of Re-MeanFlow's dual time embedding from the teacher's noise embedding.

Re-MeanFlow (arXiv 2511.23342, section 4, "time embedding") replaces EDM2's embedding of
c_noise = ln(sigma)/4 by mp_sum(emb_t(fourier(t)), emb_r(fourier(r))) on raw flow times. Before
MeanFlow training the two new layers are fitted, with the rest of the network frozen, so that the
new embedding of any interval [r, t] reproduces the teacher's embedding at sigma = t / (1 - t).
The network then starts as the teacher: u(x_t, t, r) ≈ v_teacher(x_t, t) for every r.
"""

from __future__ import annotations

import torch
import tqdm

from . import networks

# EDM2's sampling range sigma in [0.002, 80] in flow time t = sigma / (1 + sigma).
T_MIN = 1 / 501
T_MAX = 80 / 81


def sample_embedding_times(
    batch: int,
    generator: torch.Generator | None = None,
    t_min: float = T_MIN,
    t_max: float = T_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """t, r ~ U(0, 1) clamped to [t_min, t_max] and swapped so that t >= r (official recipe).

    Drawn on the generator's device; the caller moves them.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    a = torch.rand(batch, generator=generator, device=gen_device).clamp(t_min, t_max)
    b = torch.rand(batch, generator=generator, device=gen_device).clamp(t_min, t_max)
    return torch.maximum(a, b), torch.minimum(a, b)


def time_embedding_loss(unet: networks.UNet, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """MSE between the new embedding of [r, t] and the teacher's embedding of sigma = t/(1-t).

    The target depends on t only, as in the official `init_time_emb.py`: the teacher knows no
    interval, and u over [r, t] must start out as the teacher's instantaneous velocity at t.
    emb_r is therefore fitted to contribute whatever makes the mp_sum independent of r.
    """
    emb = unet.time_embedding(t, r)
    with torch.no_grad():
        target = unet.teacher_embedding(torch.log(t / (1 - t)) / 4)
    return (emb - target).square().mean()


def fit_time_embedding(
    net: networks.Precond,
    *,
    steps: int = 10_000,
    batch: int = 1024,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.99),
    seed: int = 0,
    device: torch.device | str | None = None,
    init: bool = True,
    progress: bool = True,
    log_every: int = 100,
) -> dict:
    """Fit `unet.emb_noise_t` and `unet.emb_noise_r` to the teacher embedding (Adam, paper values).

    Only those two weights change; every other parameter and buffer is left bit-identical (the
    loss does not reach them and they are not in the optimiser). With `init`, both layers first
    become copies of the teacher's `emb_noise` (`Precond.init_time_embedding_`). Forced weight
    normalisation (EDM2 Eq. 47) is applied to the two layers before every step, as EDM2 training
    does, and once at the end so the stored weights lie on the unit-RMS sphere.

    Times come from a generator seeded with `seed`, so the result is deterministic given the
    seed and the network. `device` defaults to the network's. Returns `initial_loss` and
    `final_loss` on one fixed evaluation batch (drawn first) and `history`, a list of
    (step, training loss) every `log_every` steps.
    """
    unet = net.unet
    layers = [unet.emb_noise_t, unet.emb_noise_r]
    params = [layer.weight for layer in layers]
    device = torch.device(device) if device is not None else params[0].device
    generator = torch.Generator().manual_seed(seed)

    if init:
        net.init_time_embedding_()
    was_trainable = [param.requires_grad for param in params]
    for param in params:
        param.requires_grad_(True)
    try:
        eval_t, eval_r = (s.to(device) for s in sample_embedding_times(batch, generator))

        def eval_loss() -> float:
            with torch.no_grad():
                return time_embedding_loss(unet, eval_t, eval_r).item()

        initial_loss = eval_loss()
        opt = torch.optim.Adam(params, lr=lr, betas=betas)
        history = []
        for step in tqdm.trange(steps, disable=not progress, desc="time embedding"):
            for layer in layers:
                layer.normalize_weight_()
            t, r = (s.to(device) for s in sample_embedding_times(batch, generator))
            loss = time_embedding_loss(unet, t, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps - 1:
                history.append((step, loss.item()))
        for layer in layers:
            layer.normalize_weight_()
        final_loss = eval_loss()
    finally:
        for param, flag in zip(params, was_trainable):
            param.grad = None
            param.requires_grad_(flag)
    return dict(initial_loss=initial_loss, final_loss=final_loss, history=history)
