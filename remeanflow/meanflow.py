"""MeanFlow training objective as used by Re-MeanFlow.

MeanFlow (Geng et al. 2025, arXiv 2505.13447) trains a network u(x_t, t, r | c) to predict the
*average* velocity over [r, t] through the MeanFlow identity (MeanFlow Eq. 6)

    u(x_t, t, r) = v(x_t, t) - (t - r) · d/dt u(x_t, t, r),

where d/dt is the total derivative along the flow, i.e. the Jacobian-vector product of u along the
tangent (v, 1, 0) in (x_t, t, r) (MeanFlow Eq. 8). Re-MeanFlow (arXiv 2511.23342) applies it to
rectified couplings (n, x) produced by an EDM2 teacher, with a U-shaped t distribution, a
logit-normal interval length, distance truncation of the couplings and a CFG-aware target.

Flow convention: data at t=0, noise at t=1, x_t = (1-t)·x + t·n, v = n - x.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# The official code keeps couplings with mean((n - x)^2) < 0.87 in every batch. That makes the
# number of kept samples differ between processes and batches (and can desync DDP); the default
# here is a quantile threshold computed once over the whole coupling set (`truncation_threshold`).
OFFICIAL_DISTANCE_THRESHOLD = 0.87

# ----------------------------------------------------------------------------------------------
# Time sampling (Re-MeanFlow section 4, "t, r schedule").


def u_shaped_icdf(u: torch.Tensor, mirror: torch.Tensor, a: float = 4.0) -> torch.Tensor:
    """Closed-form inverse CDF of the U-shaped density p(t) = a / (2 (e^a - 1)) · (e^{at} + e^{a(1-t)}).

    The 2-rectified-flow++ schedule reused by Re-MeanFlow is written p(t) ∝ e^{at} + e^{-at} on
    [0, 1]; taken literally that is cosh(at), which increases monotonically on [0, 1]. The
    reference implementations draw from one exponential branch and mirror it, which gives the
    symmetric U shape ∝ e^{at} + e^{a(1-t)} ∝ cosh(a (t - 1/2)); that is the density used here.

    Derivation: p is the even mixture of q(t) = a e^{at} / (e^a - 1) and its mirror q(1 - t).
    q has CDF Q(t) = expm1(a t) / expm1(a), so Q^{-1}(u) = log1p(u · expm1(a)) / a. Drawing
    t = Q^{-1}(u) and replacing t by 1 - t where `mirror` is true (probability 1/2) samples p
    exactly; the CDF of p is P(t) = (Q(t) + 1 - Q(1 - t)) / 2.
    """
    if a == 0:
        t = u  # the a -> 0 limit of both branches is uniform
    else:
        t = torch.log1p(u * math.expm1(a)) / a
    return torch.where(mirror, 1 - t, t)


def sample_t_r(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    a: float = 4.0,
    t_eps: float = 1e-5,
    t_max: float = 80 / 81,
    p_mean: float = -0.8,
    p_std: float = 1.0,
    high_t: float = 0.95,
    high_r: float = 0.4,
    ratio_r_neq_t: float = 0.25,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r) per sample following Re-MeanFlow section 4 (docs/method.md, MeanFlow loss steps 2-4).

    1. t ~ U-shaped density (`u_shaped_icdf`), scaled into [t_eps, 1 - t_eps] and clamped to
       <= t_max (80/81 is sigma = 80, the EDM2 teacher's largest noise level).
    2. r = clamp(t - sigmoid(N(p_mean, p_std)), 0, 1 - 1e-5): a logit-normal interval length.
    3. Where t > high_t and r < high_r, r = 0: near-pure-noise inputs with long but incomplete
       intervals are the high-variance cases; snapping them to the one-step interval [0, t]
       trains the configuration used at sampling time instead. Paper: t > 0.95, r < 0.4; the
       official code: t > 0.8 (so its 0.8 is high_t), r < 0.4.
    4. With probability 1 - ratio_r_neq_t, r = t (plain flow matching for those rows).

    Random draws are taken from `generator` (on its own device) in a fixed order and then moved
    to `device`, so the result depends only on the generator state and the arguments.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def rand() -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=gen_device)

    t = u_shaped_icdf(rand(), rand() < 0.5, a=a)
    t = (t * (1 - 2 * t_eps) + t_eps).clamp(max=t_max)

    z = torch.randn(batch, generator=generator, device=gen_device) * p_std + p_mean
    r = (t - torch.sigmoid(z)).clamp(0, 1 - 1e-5)
    r = torch.where((t > high_t) & (r < high_r), torch.zeros_like(r), r)
    r = torch.where(rand() < 1 - ratio_r_neq_t, t, r)
    return t.to(device), r.to(device)


# ----------------------------------------------------------------------------------------------
# Couplings and labels.


def truncation_threshold(distances: torch.Tensor | np.ndarray, quantile: float = 0.9) -> float:
    """Distance below which couplings are kept: the `quantile` of the whole coupling set.

    Re-MeanFlow drops the couplings whose distance is in the top 10%. Computing the threshold
    once over the full set (rather than per batch, as the official code does with the fixed
    value `OFFICIAL_DISTANCE_THRESHOLD`) keeps the batch composition independent of how the data
    is split across processes. The threshold is the empirical inverse CDF (the smallest distance
    d with F_n(d) >= quantile), so `truncation_mask` keeps exactly ceil(quantile · N) of N
    distinct distances. For the official behaviour pass OFFICIAL_DISTANCE_THRESHOLD to
    `truncation_mask` directly.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    d = distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else np.asarray(distances)
    if d.size == 0:
        raise ValueError("cannot compute a truncation threshold of an empty coupling set")
    return float(np.quantile(d.astype(np.float64).ravel(), quantile, method="inverted_cdf"))


def truncation_mask(distances, threshold: float):
    """Boolean mask (tensor or array, like `distances`) of the couplings to keep (distance <= threshold).
    The distances are `couplings.coupling_distance`, computed once per coupling at merge."""
    return distances <= threshold


def cfg_weights(w_pi: float) -> tuple[float, float]:
    """Stage-2 mixing weights (w, k) for a guidance scale w' = w_pi drawn from U(1, w_max).

    MeanFlow's CFG target v_hat = w·v + k·u_c + (1 - w - k)·u_null has effective guidance
    w / (1 - k) (MeanFlow §4.2); k = 1 - w / w_pi makes that equal to w_pi. Re-MeanFlow
    takes w = max(1, w_pi - 1) so that part of the guidance comes from the ground-truth v.
    """
    w = max(1.0, w_pi - 1.0)
    return w, 1.0 - w / w_pi


# ----------------------------------------------------------------------------------------------
# Loss.


@dataclasses.dataclass
class MeanFlowTerms:
    """Loss and per-sample diagnostics of one MeanFlow batch."""

    loss: torch.Tensor  # scalar, differentiable: the adaptively weighted loss
    e: torch.Tensor  # [N], detached: mean over C,H,W of (u - u_tgt)^2
    mse: torch.Tensor  # scalar, detached: unweighted mean of e


def null_rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows holding the null class: index -1, or an all-zero one-hot row."""
    if labels.dtype.is_floating_point:
        return labels.flatten(1).abs().sum(dim=1) == 0
    return labels < 0


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [N] tensor to broadcast over the non-batch dimensions of `like`."""
    return s.reshape(-1, *([1] * (like.ndim - 1)))


NULL_TARGETS = ("official", "plain")  # stage-2 target of null-class rows (`cfg_target`)


def cfg_target(
    model_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor,
    w: float,
    w_pi: float,
    null_target: str = "official",
) -> torch.Tensor:
    """Guided target v_hat = w·v + k·u(x_t,t,t|c) + (1-w-k)·u(x_t,t,t|null), k = 1 - w/w_pi
    (MeanFlow §4.2, CFG with mixing scale kappa = k; Re-MeanFlow stage 2), without gradient.

    Rows whose label is already null (class dropout): for them c = null, so u_c = u_null and the
    formula gives v_hat = w·v + (1-w)·u(x_t,t,t|null). null_target="official" keeps that, as the
    official code does (it builds the target for every row after dropout; the paper's numbers
    come from it); "plain" gives them v_hat = v instead, so that the unconditional model learns
    the plain flow target rather than a mixture with its own output. The two differ wherever
    w != 1, i.e. for w' > 2.
    """
    if null_target not in NULL_TARGETS:
        raise ValueError(f"null_target must be one of {NULL_TARGETS}, got {null_target!r}")
    k = 1.0 - w / w_pi
    null_labels = torch.zeros_like(labels) if labels.dtype.is_floating_point else torch.full_like(labels, -1)
    with torch.no_grad():
        # One forward over the doubled batch: conditional and unconditional halves.
        u = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        u_c, u_null = u.to(v.dtype).chunk(2)
        v_hat = w * v + k * u_c + (1 - w - k) * u_null
    if null_target == "official":
        return v_hat
    return torch.where(_per_sample(null_rows(labels), v), v, v_hat)


def guided(w: float | torch.Tensor, w_pi: float | torch.Tensor) -> bool:
    """Whether the loss uses the CFG target: w, w_pi other than 1, or given as tensors. A tensor
    is never compared by value, so that a compiled loss takes the guidance scale as a graph input
    instead of specialising (and recompiling) on every w' drawn in stage 2."""
    if isinstance(w, torch.Tensor) or isinstance(w_pi, torch.Tensor):
        return True
    return not (w == 1.0 and w_pi == 1.0)


JVP_MODES = ("tangent", "forward", "forward-fused", "autograd")


def jvp_t(
    model_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    labels: torch.Tensor | None,
    v_hat: torch.Tensor,
    jvp: str = "tangent",
    tangent_fn: ModelFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt): u(x_t, t, r | c) and its total derivative along (v_hat, 1, 0) (MeanFlow Eq. 8).

    u keeps its graph to the parameters; du/dt is detached (it only enters the stop-gradient
    target). r is held fixed rather than carried with a zero tangent: same derivative, no dual
    numbers through the r embedding.

    jvp="tangent": u and du/dt from one call `model_fn(x_t, t, r, labels, v_hat=v_hat)`, which
    `networks.Precond.forward` answers with its hand-derived tangent rules: two convolutions per
    MPConv in the pass (torch.func.jvp needs three), u's graph only, and the call goes through a
    DDP wrapper's forward. The fastest mode; needs a model that takes `v_hat`.
    jvp="forward": u from an ordinary forward of `model_fn`, du/dt from `torch.func.jvp` of
    `tangent_fn` (default `model_fn`) under no_grad. Since du/dt needs no graph, the tangent pass
    records nothing for backward: one extra primal forward buys the smallest peak memory, and
    the gradient path is a plain forward, so a DDP wrapper passed as `model_fn` still
    synchronises gradients while its unwrapped module serves as `tangent_fn`.
    jvp="forward-fused": u and du/dt from one `torch.func.jvp` of `model_fn` with autograd on.
    Fewer FLOPs, but autograd also records the tangent computation (time and memory).
    jvp="autograd": `torch.autograd.functional.jvp(create_graph=True)`, the official choice
    (double-backward trick); kept as the reference path.

    Both forward modes need a functional forward, which is why forced weight normalisation is
    `Precond.normalize_weights_()`, outside it.
    """

    def along(fn: ModelFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x_t, t: fn(x_t, t, r, labels)

    primals, tangents = (x_t, t), (v_hat, torch.ones_like(t))
    if jvp == "tangent":
        u, dudt = model_fn(x_t, t, r, labels, v_hat=v_hat)
    elif jvp == "forward":
        # Tangent first: its live set is gone before the graph of u starts to build up.
        with torch.no_grad():
            _, dudt = torch.func.jvp(along(tangent_fn if tangent_fn is not None else model_fn), primals, tangents)
        u = model_fn(x_t, t, r, labels)
    elif jvp == "forward-fused":
        u, dudt = torch.func.jvp(along(model_fn), primals, tangents)
    elif jvp == "autograd":
        u, dudt = torch.autograd.functional.jvp(along(model_fn), primals, tangents, create_graph=True)
    else:
        raise ValueError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
    return u, dudt.detach()


def meanflow_loss_terms(
    net: ModelFn | None,
    x: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    w: float = 1.0,
    w_pi: float = 1.0,
    p: float = 0.5,
    c: float = 1e-2,
    jvp: str = "tangent",
    model_fn: ModelFn | None = None,
    tangent_fn: ModelFn | None = None,
    null_target: str = "official",
) -> MeanFlowTerms:
    """MeanFlow loss of one batch (MeanFlow Alg. 1 with Re-MeanFlow's targets), deterministic given its inputs.

    x: data endpoints [N, C, H, W]; noise: the coupled noise n; labels: integer classes with -1
    for the null class (or one-hot rows, all-zero = null), already class-dropped by the caller
    (`misc.drop_labels`); t, r: [N] from `sample_t_r`.

    x_t = (1-t)·x + t·n, v = n - x. Stage 1 (w = w_pi = 1): v_hat = v. Stage 2: v_hat is the CFG
    target of `cfg_target` (null-label rows: see its `null_target`). (u, du/dt) is the JVP of
    (x_t, t, r) -> u(x_t, t, r | c) along (v_hat, 1, 0); u_tgt = v_hat - (t - r)·du/dt;
    e = mean over C,H,W of (u - sg(u_tgt))^2; loss = mean(e / sg((e + c)^p)).

    jvp selects how du/dt is computed (`jvp_t`): "tangent" (default: the network's own
    hand-derived tangent pass, `networks.Precond.forward(..., v_hat=)`), "forward" (graph-free
    `torch.func.jvp` tangent, any model), "forward-fused" or "autograd" (the official reference).
    The network's forward must not mutate parameters: call `net.normalize_weights_()` before the
    step. `model_fn(x_t, t, r, labels) -> u`, if given, replaces `net`'s forward (e.g. a
    DDP-wrapped model, so gradient synchronisation is not bypassed); with jvp="tangent" it is
    called with `v_hat=` and must return (u, du/dt). `tangent_fn`, if given, is used for the
    no-grad `torch.func.jvp` tangent of jvp="forward" instead (e.g. that model's unwrapped
    module, which `torch.func.jvp` can trace).
    """
    model_fn = model_fn if model_fn is not None else net
    if model_fn is None:
        raise ValueError("pass a network or a model_fn")
    t_, r_ = _per_sample(t, x), _per_sample(r, x)
    x_t = (1 - t_) * x + t_ * noise
    v = noise - x

    if not guided(w, w_pi):
        v_hat = v  # stage 1: no guidance
    elif labels is None:
        raise ValueError("a CFG target (w, w_pi != 1) needs class labels")
    else:
        v_hat = cfg_target(model_fn, x_t, t, v, labels, w, w_pi, null_target)

    u, dudt = jvp_t(model_fn, x_t, t, r, labels, v_hat, jvp, tangent_fn)
    u_tgt = v_hat - (t_ - r_) * dudt  # MeanFlow Eq. 10
    error = u - u_tgt.detach()

    # Adaptive loss weight (MeanFlow §4.3): e / sg((e + c)^p); p = 0.5 is a pseudo-Huber-like loss.
    e = error.square().flatten(1).mean(dim=1)
    loss = (e / (e + c).pow(p).detach()).mean()
    return MeanFlowTerms(loss=loss, e=e.detach(), mse=e.detach().mean())


def meanflow_loss(*args, **kwargs) -> torch.Tensor:
    """The scalar MeanFlow loss: `meanflow_loss_terms(...).loss`, same arguments."""
    return meanflow_loss_terms(*args, **kwargs).loss
