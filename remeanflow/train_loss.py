"""The MeanFlow training loss as the training loop runs it: `meanflow.meanflow_loss_terms` under
autocast, optionally compiled as one graph (`accel.compile_fn`), with the check of which JVP mode
and compile backend can go together.

Kept apart from `accel` so that the coupling job, which uses accel's precision and fast sampler,
does not import the loss: a rule's code version is the import closure of its script.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import accel, meanflow, networks


def check_loss_settings(jvp: str, backend: str | None) -> None:
    """A clear error for a JVP mode / compile backend pair the loss cannot run: an unknown mode or
    backend, or jvp="autograd" compiled (torch.compile does not capture
    `torch.autograd.functional.jvp(create_graph=True)`)."""
    if jvp not in meanflow.JVP_MODES:
        raise ValueError(f"jvp must be one of {meanflow.JVP_MODES}, got {jvp!r}")
    if backend is not None:
        accel.check_backend(backend)
        if jvp == "autograd":
            raise ValueError("jvp='autograd' (double backward) cannot be captured by torch.compile; run it eagerly "
                             "(no compile backend) or use another jvp mode")


def meanflow_loss_fn(
    net: networks.Precond,
    *,
    jvp: str = "tangent",
    precision: str = "fp32",
    use_channels_last: bool = False,
    backend: str | None = None,
    mode: str | None = None,
    model_fn: meanflow.ModelFn | None = None,
    tangent_fn: meanflow.ModelFn | None = None,
    null_target: str = "official",
) -> Callable[..., meanflow.MeanFlowTerms]:
    """`meanflow.meanflow_loss_terms` for `net` under autocast, optionally compiled as one graph.

    Returns `loss_fn(x, noise, labels, t, r, *, w=1.0, w_pi=1.0, p=0.5, c=1e-2) -> MeanFlowTerms`
    with the same arguments and results as the eager loss. Class indices are converted to
    one-hot rows outside the graph. Under torch.compile the tangent (no grad) and the forward
    with gradient become one graph and AOTAutograd compiles the backward.

    Guidance scales other than w = w_pi = 1 enter the graph as 0-dim tensors (`meanflow.guided`):
    stage 1 compiles one graph and stage 2 another, whatever w' each step draws.

    jvp="autograd" (the official double-backward reference) cannot be compiled
    (`check_loss_settings`). `null_target`: the stage-2 target of null-class rows
    (`meanflow.cfg_target`), a constant of the graph.
    """
    check_loss_settings(jvp, backend)
    if null_target not in meanflow.NULL_TARGETS:
        raise ValueError(f"null_target must be one of {meanflow.NULL_TARGETS}, got {null_target!r}")
    device = next(net.parameters()).device
    accel.check_precision(precision)
    if use_channels_last:
        accel.to_channels_last(net)
    layout = accel.channels_last if use_channels_last else (lambda x: x)

    def terms(x, noise, labels, t, r, w, w_pi, p, c):
        with accel.autocast(device, precision):
            out = meanflow.meanflow_loss_terms(
                net, layout(x), layout(noise), labels, t, r, w=w, w_pi=w_pi, p=p, c=c, jvp=jvp,
                model_fn=model_fn, tangent_fn=tangent_fn, null_target=null_target,
            )
        return out.loss, out.e, out.mse  # plain tuple: what a compiled graph returns best

    compiled = accel.compile_fn(terms, backend, mode=mode)

    def loss_fn(x, noise, labels, t, r, *, w: float = 1.0, w_pi: float = 1.0, p: float = 0.5,
                c: float = 1e-2) -> meanflow.MeanFlowTerms:
        if labels is not None and not labels.dtype.is_floating_point:
            labels = networks.one_hot(labels, net.label_dim)
        if meanflow.guided(w, w_pi):  # graph inputs, not constants: no recompilation per w'
            w, w_pi = (torch.as_tensor(s, dtype=torch.float64, device=x.device) for s in (w, w_pi))
        else:
            w, w_pi = 1.0, 1.0
        loss, e, mse = compiled(x, noise, labels, t, r, w, w_pi, float(p), float(c))
        return meanflow.MeanFlowTerms(loss=loss, e=e, mse=mse)

    return loss_fn
