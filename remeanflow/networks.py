"""EDM2 magnitude-preserving U-Net in flow form, with Re-MeanFlow's dual time embedding.

Architecture follows Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (EDM2, arXiv 2312.02696); parameter names match EDM2's state_dict so that published
checkpoints load by name. Two deliberate differences from the reference implementation:

* forced weight normalisation (EDM2 Eq. 47) is a separate no-grad step,
  `Precond.normalize_weights_()`, instead of a parameter mutation inside `forward`. The forward
  pass is then a pure function of the parameters, which `torch.func.jvp` and `torch.compile`
  require;
* `Precond.forward(x_t, t, r, class_labels)` returns the MeanFlow average velocity u over [r, t]
  (Re-MeanFlow, arXiv 2511.23342), with the teacher's ln(sigma)/4 noise embedding replaced by
  mp_sum(emb_t(fourier(t)), emb_r(fourier(r))).

With `v_hat` given, `Precond.forward` also returns du/dt, the total derivative of u along
(v_hat, 1, 0) that the MeanFlow target needs (MeanFlow Eq. 8), from hand-derived tangent rules
that ride along the forward pass (the `*_jvp` functions and methods below). Why not
`torch.func.jvp` alone: PyTorch's forward-mode rule for convolution also evaluates conv(x, w_t)
with a materialised zero weight tangent, so every MPConv costs three convolutions instead of two,
and `torch.compile` cannot trace a custom jvp. The rules here carry a tangent only where it is
non-zero, run under no_grad (du/dt only enters the stop-gradient target, so the tangent records
no graph while u keeps its own), and are plain tensor ops that compile. A tangent of None means
zero; with every tangent None the same code is the ordinary forward.

Flow convention: data at t=0, noise at t=1, x_t = (1-t) x + t n, velocity v = n - x.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .misc import one_hot  # noqa: F401  (networks.one_hot: the labels the nets take)

# ----------------------------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 section 3 and appendix B).


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision tensors, float64 kept (tests check derivatives in float64)."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale x to unit RMS over `dim` (all but the first by default), EDM2 Eq. 45."""
    return normalize_jvp(x, None, dim, eps)[0]


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output std under unit-normal input (EDM2 Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Interpolate a and b with weight t and restore unit variance (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate with per-part weights that keep the result at unit variance (EDM2 Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = scale / math.sqrt(na) * (1 - t)
    wb = scale / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """2x box-filter resampling. EDM2's default filter [1,1] makes its strided (transposed)
    depthwise convolution exactly a 2x2 average pool (down) or nearest-neighbour copy (up)."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


# The tangent arguments of the modules' forward default to PLAIN: a plain call returns the output
# alone. Passing a tangent (None = zero) returns (output, tangent). Either way the call goes through
# nn.Module.__call__, so hooks (and wrappers such as FSDP) see every submodule call.
PLAIN = object()


def call_jvp(module: torch.nn.Module, *args, dx=None, demb=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, tangent) of `module(*args, **kwargs)`: a plain call when no tangent flows (dx and
    demb None; a hook then sees the plain output), otherwise the call with its tangents."""
    if dx is None and demb is None:
        return module(*args, **kwargs), None
    return module(*args, dx=dx, **kwargs) if demb is None else module(*args, dx=dx, demb=demb, **kwargs)


# Tangent rules of the primitives (see the module docstring). Each takes the primal input(s) and
# their tangents (None = zero) and returns the output tangent (None when it is zero);
# `normalize_jvp` returns the output too, since both come from the same norm. Linear primitives
# (resample, mp_sum, mp_cat, and MPConv with its `jvp`) are their own tangent maps.


def normalize_jvp(
    x: torch.Tensor, dx: torch.Tensor | None, dim=None, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`normalize` and its tangent, from one norm: with n = eps + a|x|,
    d(x/n) = dx/n - x (a <x, dx>/|x|) / n^2."""
    if dim is None:
        dim = list(range(1, x.ndim))
    dtype = _compute_dtype(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    alpha = math.sqrt(norm.numel() / x.numel())
    n = torch.add(eps, norm, alpha=alpha)
    y = x / n.to(x.dtype)
    if dx is None:
        return y, None
    with torch.no_grad():
        dot = (x.to(dtype) * dx.to(dtype)).sum(dim=dim, keepdim=True)
        dnorm = torch.where(norm > 0, dot / norm, 0)  # |x| is not differentiable at 0: PyTorch's 0
        return y, (dx.to(dtype) / n - x.to(dtype) * (alpha * dnorm / n**2)).to(dx.dtype)


@torch.no_grad()
def mp_silu_jvp(x: torch.Tensor, dx: torch.Tensor | None) -> torch.Tensor | None:
    """Tangent of `mp_silu`: silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x)."""
    if dx is None:
        return None
    s = torch.sigmoid(x)
    return dx * (s * (1 + x * (1 - s))) / 0.596


def mp_sum_jvp(da: torch.Tensor | None, db: torch.Tensor | None, t: float = 0.5) -> torch.Tensor | None:
    """Tangent of `mp_sum` (linear), with None for a zero tangent of either input."""
    if da is None and db is None:
        return None
    scale = math.sqrt((1 - t) ** 2 + t**2)
    if db is None:
        return da * ((1 - t) / scale)
    if da is None:
        return db * (t / scale)
    return mp_sum(da, db, t)


@torch.no_grad()
def product_jvp(a: torch.Tensor, da: torch.Tensor | None, b: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor | None:
    """Tangent of a * b (product rule)."""
    if da is None:
        return None if db is None else a * db
    return da * b if db is None else da * b + a * db


@torch.no_grad()
def clamp_jvp(x: torch.Tensor, dx: torch.Tensor | None, bound: float) -> torch.Tensor | None:
    """Tangent of x.clamp(-bound, bound): dx where the clamp is inactive (PyTorch's convention
    at the boundary, where the derivative is one)."""
    if dx is None:
        return None
    return dx * ((x >= -bound) & (x <= bound)).to(dx.dtype)


def linear_jvp(fn, dx: torch.Tensor | None, *args, **kwargs) -> torch.Tensor | None:
    """Tangent of a linear map `fn` (its own tangent map), under no_grad so that no parameter
    records a graph for it."""
    if dx is None:
        return None
    with torch.no_grad():
        return fn(dx, *args, **kwargs)


class MPFourier(torch.nn.Module):
    """Random Fourier features cos(2pi f x + phi)·sqrt(2), unit variance for any x (EDM2 Eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor, dx=PLAIN):
        return self.jvp(x, None)[0] if dx is PLAIN else self.jvp(x, dx)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and their tangent -sin(2pi f x + phi)·sqrt(2)·2pi f dx."""
        dtype = _compute_dtype(x.dtype)
        freqs = self.freqs.to(dtype)
        y = x.to(dtype).outer(freqs) + self.phases.to(dtype)
        out = (y.cos() * math.sqrt(2)).to(x.dtype)
        if dx is None:
            return out, None
        with torch.no_grad():
            return out, (-y.sin() * math.sqrt(2) * dx.to(dtype).outer(freqs)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (or linear layer for an empty kernel) with weight normalisation and
    magnitude-preserving scaling 1/sqrt(fan_in) (EDM2 Eq. 46)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation (EDM2 Eq. 47): project the stored weight back onto the
        unit-RMS sphere so that the effective learning rate stays constant."""
        self.weight.copy_(normalize(self.weight.to(_compute_dtype(self.weight.dtype))))

    def forward(self, x: torch.Tensor, gain=1.0, dx=PLAIN):
        return self.jvp(x, None, gain)[0] if dx is PLAIN else self.jvp(x, dx, gain)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor | None, gain=1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output and tangent; the layer is linear in x, so the tangent is the same map of dx
        (with the normalised weight computed once for both)."""
        w = normalize(self.weight.to(_compute_dtype(self.weight.dtype)))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if dx is None:
            return self._conv(x, w), None
        with torch.no_grad():
            dy = self._conv(dx.to(x.dtype), w)
        return self._conv(x, w), dy

    @staticmethod
    def _conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# ----------------------------------------------------------------------------------------------
# U-Net.


class Block(torch.nn.Module):
    """EDM2 encoder/decoder block: residual branch modulated by the embedding, optional
    cosine-attention, activation clipping (EDM2 Fig. 21)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter=(1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if list(resample_filter) != [1, 1]:
            raise ValueError(f"only EDM2's default resample_filter [1, 1] is supported, got {resample_filter}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, dx=PLAIN, demb: torch.Tensor | None = None):
        return self.jvp(x, None, emb, None)[0] if dx is PLAIN else self.jvp(x, dx, emb, demb)

    def jvp(
        self, x: torch.Tensor, dx: torch.Tensor | None, emb: torch.Tensor, demb: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output and its tangent for tangents dx of x and demb of emb."""
        x, dx = resample(x, self.resample_mode), linear_jvp(resample, dx, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x, dx = call_jvp(self.conv_skip, x, dx=dx)
            # pixel norm keeps encoder activations on the sphere
            x, dx = normalize_jvp(x, dx, dim=1)

        y, dy = call_jvp(self.conv_res0, mp_silu(x), dx=mp_silu_jvp(x, dx))
        c, dc = call_jvp(self.emb_linear, emb, gain=self.emb_gain, dx=demb)
        c = (c + 1)[:, :, None, None].to(y.dtype)
        dc = dc[:, :, None, None].to(y.dtype) if dc is not None else None
        y, dy = y * c, product_jvp(y, dy, c, dc)
        y, dy = mp_silu(y), mp_silu_jvp(y, dy)
        if self.training and self.dropout:
            if dy is None:
                y = F.dropout(y, p=self.dropout)
            else:  # the tangent needs the primal's mask
                y, keep = torch.native_dropout(y, self.dropout, True)
                dy = dy * keep / (1 - self.dropout)
        y, dy = call_jvp(self.conv_res1, y, dx=dy)

        if self.flavor == "dec" and self.conv_skip is not None:
            x, dx = call_jvp(self.conv_skip, x, dx=dx)
        x, dx = mp_sum(x, y, t=self.res_balance), mp_sum_jvp(dx, dy, t=self.res_balance)

        if self.num_heads:
            a, da = self._attention(x, dx)
            x, dx = mp_sum(x, a, t=self.attn_balance), mp_sum_jvp(dx, da, t=self.attn_balance)
        if self.clip_act is not None:
            # out of place: forward stays functional
            x, dx = x.clamp(-self.clip_act, self.clip_act), clamp_jvp(x, dx, self.clip_act)
        return x, dx

    def _attention(self, x: torch.Tensor, dx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, c, h, w = x.shape
        y, dy = call_jvp(self.attn_qkv, x, dx=dx)
        shape = (n, self.num_heads, -1, 3, h * w)
        # cosine attention: q, k, v on the unit sphere
        qkv, dqkv = normalize_jvp(y.reshape(shape), dy.reshape(shape) if dy is not None else None, dim=2)
        q, k, v = qkv.unbind(3)
        scale = 1 / math.sqrt(q.shape[2])
        attn = torch.einsum("nhcq,nhck->nhqk", q, k * scale).softmax(dim=3)
        out = torch.einsum("nhqk,nhck->nhcq", attn, v).reshape(n, c, h, w)
        if dqkv is None:
            return self.attn_proj(out), None
        with torch.no_grad():
            dq, dk, dv = dqkv.unbind(3)
            dlogits = (torch.einsum("nhcq,nhck->nhqk", dq, k) + torch.einsum("nhcq,nhck->nhqk", q, dk)) * scale
            dattn = attn * (dlogits - (attn * dlogits).sum(dim=3, keepdim=True))  # softmax tangent
            dout = torch.einsum("nhqk,nhck->nhcq", dattn, v) + torch.einsum("nhqk,nhck->nhcq", attn, dv)
        return self.attn_proj(out, dx=dout.reshape(n, c, h, w))


class UNet(torch.nn.Module):
    """EDM2 U-Net (config G). `emb_noise_t`/`emb_noise_r` are Re-MeanFlow's new time embeddings,
    shaped like the teacher's `emb_noise` and initialised from it (see `init_time_embedding_`)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_noise=None,
        channel_mult_emb=None,
        num_blocks: int = 3,
        attn_resolutions=(16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_noise_t = MPConv(cnoise, cemb, ())
        self.emb_noise_r = MPConv(cnoise, cemb, ())
        self.emb_label = MPConv(label_dim, cemb, ()) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # constant-one channel gives the first conv a bias
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, "enc", attention=res in attn_resolutions, **block_kwargs
                )

        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, "dec", attention=res in attn_resolutions, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def teacher_embedding(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The teacher's noise embedding of c_noise = ln(sigma)/4, before the label is mixed in."""
        return self.emb_noise(self.emb_fourier(c_noise))

    def time_embedding(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Re-MeanFlow's embedding of the interval [r, t] on raw flow times."""
        return self.time_embedding_jvp(t, r, None)[0]

    def time_embedding_jvp(
        self, t: torch.Tensor, r: torch.Tensor, dt: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`time_embedding` and its tangent for a tangent dt of t (r held fixed)."""
        f, df = call_jvp(self.emb_fourier, t, dx=dt)
        emb_t, demb_t = call_jvp(self.emb_noise_t, f, dx=df)
        emb_r = self.emb_noise_r(self.emb_fourier(r))
        return mp_sum(emb_t, emb_r, t=0.5), mp_sum_jvp(demb_t, None, t=0.5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, class_labels: torch.Tensor | None, dx=PLAIN,
                demb: torch.Tensor | None = None):
        """x: preconditioned input; emb: output of `teacher_embedding` or `time_embedding`;
        class_labels: one-hot rows [N, label_dim] (all-zero = null class)."""
        if dx is PLAIN:
            return self.jvp(x, None, emb, None, class_labels)[0]
        return self.jvp(x, dx, emb, demb, class_labels)

    def jvp(
        self,
        x: torch.Tensor,
        dx: torch.Tensor | None,
        emb: torch.Tensor,
        demb: torch.Tensor | None,
        class_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` and its tangent for tangents dx of x and demb of emb (labels are constant)."""
        if self.emb_label is not None:
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb, demb = mp_sum(emb, label_emb.to(emb.dtype), t=self.label_balance), mp_sum_jvp(demb, None, t=self.label_balance)
        emb, demb = mp_silu(emb).to(x.dtype), mp_silu_jvp(emb, demb)
        demb = demb.to(x.dtype) if demb is not None else None

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        dx = torch.cat([dx, torch.zeros_like(dx[:, :1])], dim=1) if dx is not None else None
        skips = []
        for name, block in self.enc.items():
            x, dx = call_jvp(block, x, dx=dx) if name.endswith("_conv") else call_jvp(block, x, emb, dx=dx, demb=demb)
            skips.append((x, dx))
        for name, block in self.dec.items():
            if "block" in name:
                skip, dskip = skips.pop()
                x, dx = mp_cat(x, skip, t=self.concat_balance), linear_jvp(mp_cat, dx, dskip, t=self.concat_balance)
            x, dx = call_jvp(block, x, emb, dx=dx, demb=demb)
        return call_jvp(self.out_conv, x, gain=self.out_gain, dx=dx)


# ----------------------------------------------------------------------------------------------
# Preconditioning: EDM denoiser and its flow-form average velocity.


def _weight_groups(module: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The MPConv weights of `module`, grouped by (fan-in, dtype, device). A weight that is not
    contiguous (e.g. channels-last) is a group of its own: flattening it would reorder its rows'
    elements and with them the rounding of their norms."""
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for m in module.modules():
        if isinstance(m, MPConv):
            w = m.weight
            key = (w.numel() // w.shape[0], w.dtype, w.device) if w.is_contiguous() else ("alone", id(w))
            groups.setdefault(key, []).append(w)
    return list(groups.values())


@torch.no_grad()
def _normalize_group_(weights: list[torch.nn.Parameter]) -> None:
    """`MPConv.normalize_weight_` of weights sharing fan-in, dtype and device, as one [rows, fan_in]
    matrix: one concatenation, one `normalize` (each row reduced over its own fan-in, as per
    layer), one fused copy back."""
    if len(weights) == 1:
        w = weights[0]
        w.copy_(normalize(w.to(_compute_dtype(w.dtype))))
        return
    rows = torch.cat([w.reshape(w.shape[0], -1) for w in weights])
    normed = normalize(rows.to(_compute_dtype(rows.dtype))).to(rows.dtype)
    parts = normed.split([w.shape[0] for w in weights])
    torch._foreach_copy_(weights, [part.view(w.shape) for part, w in zip(parts, weights)])


class Precond(torch.nn.Module):
    """EDM preconditioning around `UNet` (EDM2 Eq. 7 with sigma_data = 0.5).

    `denoise(x, sigma, c)` is the teacher's D(x); `forward(x_t, t, r, c)` is the average velocity
    u(x_t, t, r | c) = (x_t - D_{t,r}(x_t / (1-t))) / t, where D_{t,r} uses the dual time
    embedding at sigma = t / (1 - t). For r = t and a time embedding equal to the teacher's this
    is exactly the teacher's flow velocity (`teacher_velocity`).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        **unet_kwargs,
    ):
        super().__init__()
        self.init_kwargs = dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
            sigma_data=sigma_data, logvar_channels=logvar_channels, **unet_kwargs,
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, ())

    # -- helpers -------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every MPConv; call before each optimiser step's forward.

        Batched: the weights are normalised per group with the same fan-in, dtype and device
        (`_weight_groups`), a handful of kernels per group instead of ~6 per layer (an EDM2 net
        has ~160 MPConvs, so the per-layer loop was ~1000 small launches per step). Each row is
        still reduced alone over its contiguous fan-in, so the result is bit-identical to
        `MPConv.normalize_weight_` layer by layer (tested on the CPU).
        """
        for weights in _weight_groups(self):
            _normalize_group_(weights)

    @torch.no_grad()
    def init_time_embedding_(self) -> None:
        """Start emb_noise_t and emb_noise_r as copies of the teacher's emb_noise (Re-MeanFlow)."""
        self.unet.emb_noise_t.weight.copy_(self.unet.emb_noise.weight)
        self.unet.emb_noise_r.weight.copy_(self.unet.emb_noise.weight)

    def labels(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        return one_hot(class_labels.to(device), self.label_dim)

    def _edm(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, class_labels) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x) with the given noise embedding."""
        return self._edm_jvp(x, None, sigma, None, emb, None, class_labels)[0]

    def _edm_jvp(self, x, dx, sigma, dsigma, emb, demb, class_labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_edm` and its tangent for tangents dx, dsigma (per sample), demb (all three or none)."""
        x = x.to(_compute_dtype(x.dtype))
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        s2 = sigma**2 + sd2
        c_skip = sd2 / s2
        c_out = sigma * self.sigma_data / s2.sqrt()
        c_in = 1 / s2.sqrt()
        labels = self.labels(class_labels, x.shape[0], x.device)
        labels = labels.to(x.dtype) if labels is not None else None
        dz = None
        if dx is not None:
            with torch.no_grad():  # derivatives of the coefficients along sigma
                ds = dsigma.to(x.dtype).reshape(-1, 1, 1, 1)
                dc_skip = -2 * sigma * sd2 / s2**2 * ds
                dc_out = self.sigma_data * sd2 / s2**1.5 * ds
                dc_in = -sigma / s2**1.5 * ds
                dz = dc_in * x + c_in * dx.to(x.dtype)
        F_x, dF_x = call_jvp(self.unet, c_in * x, emb, labels, dx=dz, demb=demb)
        D = c_skip * x + c_out * F_x.to(x.dtype)
        if dF_x is None:
            return D, None
        with torch.no_grad():
            dD = dc_skip * x + c_skip * dx.to(x.dtype) + dc_out * F_x.to(x.dtype) + c_out * dF_x.to(x.dtype)
        return D, dD

    @staticmethod
    def _expand(v, x: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=_compute_dtype(x.dtype), device=x.device)
        return v.expand(x.shape[0]) if v.ndim == 0 else v.reshape(x.shape[0])

    # -- public API ----------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """EDM2's D(x; sigma, c) with the teacher's embedding of c_noise = ln(sigma)/4."""
        sigma = self._expand(sigma, x)
        return self._edm(x, sigma, self.unet.teacher_embedding(sigma.log() / 4), class_labels)

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample log-variance of EDM2's uncertainty-weighted loss (EDM2 Eq. 21)."""
        c_noise = sigma.to(_compute_dtype(sigma.dtype)).flatten().log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def teacher_velocity(self, x_t: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """Flow velocity of the unmodified teacher: (x_t - D(x_t/(1-t), t/(1-t))) / t."""
        x_t = x_t.to(_compute_dtype(x_t.dtype))
        t = self._expand(t, x_t)
        tb = t.reshape(-1, 1, 1, 1)
        D = self.denoise(x_t / (1 - tb), t / (1 - t), class_labels)
        return (x_t - D) / tb

    def forward(self, x_t: torch.Tensor, t, r, class_labels=None, v_hat: torch.Tensor | None = None):
        """MeanFlow average velocity u(x_t, t, r | c) over [r, t].

        With `v_hat`, returns (u, du/dt): u with its graph, and the total derivative of u along
        (v_hat, 1, 0) -- dx_t/dt = v_hat, dt/dt = 1, r fixed (MeanFlow Eq. 8) -- without one.
        Passing v_hat through `forward` (rather than a separate method) lets a DDP wrapper see the
        call and synchronise the gradients of u.
        """
        x_t = x_t.to(_compute_dtype(x_t.dtype))
        t, r = self._expand(t, x_t), self._expand(r, x_t)
        tb = t.reshape(-1, 1, 1, 1)
        x, sigma = x_t / (1 - tb), t / (1 - t)
        if v_hat is None:
            D = self._edm(x, sigma, self.unet.time_embedding(t, r), class_labels)
            return (x_t - D) / tb
        with torch.no_grad():
            v_hat = v_hat.to(x_t.dtype)
            dx = (v_hat + x) / (1 - tb)  # d/dt [x_t / (1 - t)]
            dsigma = 1 / (1 - t) ** 2
        emb, demb = self.unet.time_embedding_jvp(t, r, torch.ones_like(t))
        D, dD = self._edm_jvp(x, dx, sigma, dsigma, emb, demb, class_labels)
        u = (x_t - D) / tb
        with torch.no_grad():
            dudt = (v_hat - dD - u) / tb  # d/dt [(x_t - D) / t]
        return u, dudt


# ----------------------------------------------------------------------------------------------
# Presets. EDM2 configs from its training script (img512 in VAE latent space 4x64x64,
# img64 in pixels 3x64x64); "toy"/"tiny" are CPU-sized nets of the same architecture.

_EDM2_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
_EDM2_DROPOUT = {
    "img512": {"xs": 0.0, "s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1},
    "img64": {"xs": 0.0, "s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1},
}

PRESETS: dict[str, dict] = {}
for _ds, (_res, _ch) in {"img512": (64, 4), "img64": (64, 3)}.items():
    for _size, _mc in _EDM2_CHANNELS.items():
        PRESETS[f"edm2-{_ds}-{_size}"] = dict(
            img_resolution=_res, img_channels=_ch, label_dim=1000, model_channels=_mc,
            dropout=_EDM2_DROPOUT[_ds][_size],
        )
PRESETS["toy-16"] = dict(
    img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=(1, 2),
    num_blocks=1, attn_resolutions=(8,), channels_per_head=32, logvar_channels=32,
)
PRESETS["toy-16-xs"] = dict(PRESETS["toy-16"], model_channels=16, channels_per_head=16)
PRESETS["tiny"] = dict(
    img_resolution=8, img_channels=2, label_dim=4, model_channels=8, channel_mult=(1, 2),
    num_blocks=1, attn_resolutions=(4,), channels_per_head=8, logvar_channels=8,
)


def build(preset: str | None = None, **overrides) -> Precond:
    """Build a Precond from a preset name plus keyword overrides (or from kwargs alone)."""
    if preset is not None and preset not in PRESETS:
        raise KeyError(f"unknown network preset {preset!r}; known: {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset]) if preset else {}
    kwargs.update(overrides)
    return Precond(**kwargs)
