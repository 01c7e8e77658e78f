"""Speed helpers for coupling generation, the MeanFlow training step and the GPU benchmark.

Nothing here changes the mathematics: every helper wraps the plain paths of `networks` and
`sampling` (mixed precision, memory layout, attention kernel, graph compilation,
CUDA graph replay), and `benchmarks/gpu_bench.py` checks each fast path against the eager
reference before it reports a speed (method: `docs/method.md`; modules: `docs/architecture.md`).

Who uses what:

* the coupling job (`coupling_job.make_generate_fn`): `resolve_precision` + `autocast` always
  (config `couplings.precision`), and `FastDenoiser` + `fast_edm_heun` when
  `couplings.fast_path` is on (compiled on CUDA; eager, without CUDA graphs, on the CPU);
* the training loss (`train_loss.meanflow_loss_fn`): `autocast`, `compile_fn`, channels-last;
* held-out couplings and evaluation (`heldout`, `evaluate`): `autocast` (configs
  `couplings.precision`, `evaluate.precision`) and `precision_record`;
* `benchmarks/gpu_bench.py` / `benchmarks/train_step.py`: all of the above plus the rest
  (`CudaGraphCall`, `use_sdpa_attention`, channels-last, `compile_fn`, `forward_flops`,
  `relative_error`).

The helpers:

* `resolve_precision` / `autocast`: precision names ("fp32" = off, "bf16", "fp16"), checked
  against what this torch can autocast on the device, and autocast by name.
* `to_channels_last` / `channels_last`: NHWC layout for the nets and their image inputs (tensor
  cores and cuDNN's NHWC kernels; no effect on results beyond rounding).
* `use_sdpa_attention`: EDM2's cosine attention through `F.scaled_dot_product_attention`
  (flash / memory-efficient kernels) instead of two einsums and a materialised softmax.
  Inference only: the MeanFlow tangent (the net's own rules or forward-mode AD) does not go
  through the fused kernels.
* `compile_fn`: `torch.compile` with this project's defaults (full graph, static shapes).
* `CudaGraphCall`: capture a fixed-shape function once, replay it (no per-kernel launch cost).
* `FastDenoiser` + `fast_edm_heun`: the autoguided EDM Heun sampler (`sampling.edm_heun`) with
  all of the above around one fused `D_guide + w (D_main - D_guide)` function.
* `forward_flops`: FLOPs of one denoiser forward from torch's FLOP counter (for MFU figures).
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from . import networks, sampling

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# ----------------------------------------------------------------------------------------------
# Precision and memory layout.


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32); a clear error for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this torch autocasts to `dtype` on `device`'s type. An unsupported pair is not an
    error in torch: it warns once and silently runs in float32, which would put couplings computed
    in fp32 under a reduced-precision fingerprint; so ask autocast itself what it turned on."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        # nothing can run there from this machine (e.g. a fingerprint computed ahead); CUDA's own dtypes
        return dtype in (torch.float16, torch.bfloat16)
    if not torch.amp.is_autocast_available(kind):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(kind, dtype=dtype):
                return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == dtype
        except RuntimeError:  # e.g. bf16 on a GPU without bf16 support
            return False


def resolve_precision(precision: str, device: torch.device | str, key: str = "precision") -> str:
    """The precision that runs on `device`: the name itself ("fp32", "bf16", "fp16"), on every
    device type, so that a fingerprint naming it describes the arithmetic that ran. A name this
    torch cannot autocast to on that device, or any other name, is a ValueError naming `key`."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is not None and not autocast_supported(device, dtype):
        raise ValueError(f"{key} = {precision!r}: this torch ({torch.__version__}) has no {dtype} autocast on "
                         f"{torch.device(device).type}; use fp32 there, or another precision")
    return precision


def autocast(device: torch.device | str, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on `device`, or a no-op context for fp32.

    The state of the ODE and of the loss arithmetic stays float32 either way: `Precond` promotes
    its inputs and outputs, so only convolutions and matmuls run in reduced precision.
    `cache_enabled=False` is required inside a CUDA graph capture (cached weight casts made
    before the capture would be read from freed memory on replay).
    """
    dtype = check_precision(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def precision_record(device: torch.device | str, precision: str) -> str:
    """What a precision name means on `device`, for metrics and sidecars: on CUDA, "fp32" runs
    convolutions (and matmuls, when enabled) in TF32 unless torch is told otherwise, and the
    record says so instead of claiming plain fp32."""
    check_precision(precision)
    if torch.device(device).type != "cuda":
        return precision if precision == "fp32" else f"{precision} autocast"
    if precision != "fp32":
        return f"{precision} autocast (cuda)"
    tf32 = [name for name, on in (("convolutions", torch.backends.cudnn.allow_tf32),
                                  ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (cuda; TF32 {' and '.join(tf32)})" if tf32 else "fp32 (cuda, TF32 off)"


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC copy of a 4-D image batch (other tensors are returned unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store every 4-D parameter (conv weights) in NHWC, in place; returns the module.

    `MPConv` normalises its weight on every forward; elementwise ops keep the layout, so the
    convolution sees NHWC weights and (with `channels_last` inputs) runs cuDNN's NHWC kernels
    without transposes.
    """
    return module.to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Attention.


def sdpa_attention(block: networks.Block, x: torch.Tensor, dx: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """`networks.Block._attention` through `F.scaled_dot_product_attention` (no tangent).

    EDM2's cosine attention is softmax(q^T k / sqrt(c)) applied to v, with q, k, v normalised
    per pixel over the head's channels (EDM2 Fig. 21). Written channels-last per head ([.., hw, c])
    it is exactly SDPA with its default scale 1/sqrt(c), which can then use fused kernels that
    never materialise the [hw, hw] attention matrix.
    """
    if dx is not None:
        raise ValueError("SDPA attention has no tangent rule: a net that computes MeanFlow tangents keeps EDM2's "
                         "einsum attention (use_sdpa_attention is for inference)")
    n, c, h, w = x.shape
    y = block.attn_qkv(x).reshape(n, block.num_heads, -1, 3, h * w)
    # [n, heads, hw, c_head] each, contiguous: the fused kernels need a unit stride over channels
    q, k, v = (z.transpose(-1, -2).contiguous() for z in networks.normalize(y, dim=2).unbind(3))
    y = F.scaled_dot_product_attention(q, k, v)
    return block.attn_proj(y.transpose(-1, -2).reshape(n, c, h, w)), None


def use_sdpa_attention(net: torch.nn.Module, enable: bool = True) -> int:
    """Switch every attention block of `net` to `sdpa_attention` (or back); returns how many.

    Inference only (sampling, CFG targets): neither `torch.func.jvp` nor the net's own tangent
    rules go through the fused SDPA kernels, so a net that computes MeanFlow tangents must keep
    the einsum form.
    """
    count = 0
    for module in net.modules():
        if isinstance(module, networks.Block) and module.num_heads:
            if enable:
                module._attention = types.MethodType(sdpa_attention, module)  # instance attribute wins
            else:
                module.__dict__.pop("_attention", None)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Compilation and CUDA graphs.


def check_backend(backend: str) -> str:
    """A torch.compile backend name, or a clear error listing the known ones."""
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"unknown torch.compile backend {backend!r}; known: {torch._dynamo.list_backends()}")
    return backend


def compile_fn(
    fn: Callable,
    backend: str | None = "inductor",
    *,
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = False,
    options: dict[str, Any] | None = None,
) -> Callable:
    """`torch.compile(fn)` with this project's defaults, or `fn` itself for backend None.

    fullgraph=True turns any graph break into an error: a silently split graph would give a
    misleading speed (and the breaks in this code base are bugs, e.g. integer labels reaching
    `networks.one_hot`'s data-dependent checks; pass one-hot rows instead). dynamic=False
    compiles one static graph per input shape, which is what fixed-batch jobs want.
    """
    if backend is None:
        return fn
    check_backend(backend)
    kwargs: dict[str, Any] = dict(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    return torch.compile(fn, **kwargs)


def _describe(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


class CudaGraphCall:
    """A pure function of fixed-shape CUDA tensors, captured once as a CUDA graph and replayed.

    Arguments are copied into static buffers, the graph replays every kernel of `fn` with one
    launch, and the outputs are cloned (the next replay overwrites the static outputs). `fn`
    runs `warmup` times on a side stream first: that is where torch.compile compiles and
    cuBLAS/cuDNN pick their algorithms, none of which may happen during capture. `fn` must not
    synchronise with the host (no `.item()`, no data-dependent shapes).
    """

    def __init__(self, fn: Callable[..., Any], example_args: Sequence[torch.Tensor], warmup: int = 3):
        if not torch.cuda.is_available() or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in example_args):
            raise ValueError("CudaGraphCall needs CUDA tensors as arguments (CUDA graphs exist only on CUDA devices)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (compilation and autotuning cannot be captured), got {warmup}")
        self.signature = [_describe(a) for a in example_args]
        self.static_args = [a.detach().clone() for a in example_args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static_args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_args)

    def __call__(self, *args: torch.Tensor) -> Any:
        got = [_describe(a) for a in args]
        if got != self.signature:
            raise ValueError(f"CudaGraphCall was captured for arguments {self.signature}, got {got}")
        for static, a in zip(self.static_args, args):
            static.copy_(a)
        self.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_out)


# ----------------------------------------------------------------------------------------------
# Coupling generation.


class FastDenoiser:
    """Autoguided denoiser D = D_guide + w (D_main - D_guide) with the speed options, exposing
    `.denoise(x, sigma, class_labels)` so that `sampling.edm_heun` runs it unchanged.

    Modifies `net` and `guide` in place (layout, attention): pass copies when the plain nets are
    still needed. `class_labels` must be one-hot rows (`fast_edm_heun` converts once per batch),
    which keeps the compiled graph free of `one_hot`'s data-dependent checks. With
    `cuda_graph=True` one graph is captured per (shape, dtype) of the state on first use.
    """

    def __init__(
        self,
        net: networks.Precond,
        guide: networks.Precond | None = None,
        guidance: float = 1.0,
        *,
        precision: str = "bf16",
        use_channels_last: bool = True,
        sdpa: bool = True,
        backend: str | None = "inductor",
        mode: str | None = None,
        cuda_graph: bool = False,
    ):
        check_precision(precision)
        self.nets = [n for n in (net, guide) if n is not None]
        self.label_dim = net.label_dim
        self.precision, self.cuda_graph = precision, cuda_graph
        for n in self.nets:
            n.eval()
            if use_channels_last:
                to_channels_last(n)
            if sdpa:
                use_sdpa_attention(n)
        guided = sampling.guided_denoiser(net, guide, guidance)
        layout = channels_last if use_channels_last else (lambda x: x)
        device = next(net.parameters()).device

        def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # Cached autocast weight casts would dangle inside a CUDA graph; MPConv recomputes
            # its weights every call anyway, so the cache saves nothing here.
            with autocast(device, precision, cache_enabled=False):
                return guided(layout(x), sigma, labels)

        self._fn = compile_fn(denoise, backend, mode=mode)
        self._graphs: dict[tuple, CudaGraphCall] = {}

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if not class_labels.dtype.is_floating_point:
            raise ValueError("FastDenoiser takes one-hot class labels [N, label_dim]; use fast_edm_heun, which "
                             "converts class indices once per batch")
        if not self.cuda_graph:
            return self._fn(x, sigma, class_labels)
        key = tuple(_describe(a) for a in (x, sigma, class_labels))
        if key not in self._graphs:
            self._graphs[key] = CudaGraphCall(self._fn, (x, sigma, class_labels))
        return self._graphs[key](x, sigma, class_labels)


@torch.no_grad()
def fast_edm_heun(denoiser: FastDenoiser, noise: torch.Tensor, labels: torch.Tensor | None, **sampler_kwargs) -> torch.Tensor:
    """`sampling.edm_heun` with a `FastDenoiser` (guidance lives in the denoiser). Class indices
    (-1 = null) are converted to one-hot rows once, outside any compiled graph."""
    if labels is None:
        onehot = torch.zeros(noise.shape[0], denoiser.label_dim, device=noise.device)  # the null class
    elif labels.dtype.is_floating_point:
        onehot = labels.to(noise.device)
    else:
        onehot = networks.one_hot(labels, denoiser.label_dim).to(noise.device)
    return sampling.edm_heun(denoiser, noise, onehot, **sampler_kwargs)


# ----------------------------------------------------------------------------------------------
# Training step.


# ----------------------------------------------------------------------------------------------
# FLOPs.


def forward_flops(net: networks.Precond, batch: int = 1, device: torch.device | str = "cpu") -> int:
    """FLOPs of one teacher-denoiser forward (`net.denoise`) at `batch`, from torch's FLOP counter
    (convolutions and matmuls; 2 FLOPs per multiply-add). One Heun ODE step costs 2 of these per
    net, the final Euler step 1."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    x = torch.randn(shape, device=device)
    sigma = torch.ones(batch, device=device)
    labels = torch.zeros(batch, net.label_dim, device=device) if net.label_dim else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.denoise(x, sigma, labels)
    return int(counter.get_total_flops())


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-sample relative L2 error ||a - ref|| / ||ref|| over the batch (float64)."""
    a, ref = a.detach().double().flatten(1), ref.detach().double().flatten(1)
    if a.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(ref.shape)}")
    err = (a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    value = float(err.max())
    return value if math.isfinite(value) else math.inf
