"""Held-out teacher couplings for evaluation (docs/method.md), and the small helpers that the
evaluation modules share (device choice, net loading, batched inference, argument checks).

* `make_heldout` / `load_heldout`: noise, labels and the teacher's endpoints for sample ids
  0..N-1 under an *evaluation* seed. The caller must pass a seed different from the training
  couplings' seed: noise is keyed by (seed, sample id) (`sampling.per_sample_noise`), so the same
  seed would reproduce training couplings exactly and the error against the teacher would measure
  memorisation, not generalisation.
* `resolve_device`, `load_net_and_info`, `batched`: helpers also used by
  `evaluate`, `reference_stats` and `figures`.

Held-out file (``.npz``, written atomically, loaded without pickle)::

    noise             float32 [N, C, H, W]  per_sample_noise(seed, 0..N-1): standard normal
    labels            int64   [N]           per_sample_labels(seed, 0..N-1, num_classes)
    teacher_endpoint  float32 [N, C, H, W]  edm_heun(heun_steps) with autoguidance
    teacher_1step     float32 [N, C, H, W]  edm_heun(num_steps=1), same guide and guidance
    attrs             str (0-d)             JSON: format, seed, num_samples, num_classes, sampler
                                            settings, nfe, teacher/guide sha256

The teacher's one-step baseline uses the *same* guided denoiser as the multi-step endpoints, so
that the two teacher columns differ only in the number of ODE steps: a single Euler step from
sigma_max lands on D_guided(sigma_max · n), the guided posterior mean at the highest noise level.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tqdm

from . import accel, checkpoints, fid, sampling
from .checkpoints import net_sha256
from .fileio import atomic_path
from .misc import heun_nfe, require_int

HELDOUT_FORMAT = "remeanflow-heldout-v1"
HELDOUT_ARRAYS = ("noise", "labels", "teacher_endpoint", "teacher_1step")

# ----------------------------------------------------------------------------------------------
# Small helpers (shared with `evaluate`, `reference_stats` and `figures`).


def resolve_device(device) -> torch.device:
    """The given device, or CUDA when available (evaluation is meant for the GPU)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_net_and_info(net_or_path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A Precond (in eval mode) plus what is known of its origin: path, sha256, encoder."""
    if isinstance(net_or_path, torch.nn.Module):
        return net_or_path.eval().to(device), {"path": None, "sha256": None, "encoder": None}
    loaded = checkpoints.load_net(net_or_path)
    info = {"path": str(net_or_path), "sha256": net_sha256(net_or_path), "encoder": loaded["encoder"]}
    return loaded["net"].to(device), info


def batched(
    fn: Callable, noise: torch.Tensor, labels: torch.Tensor, *, batch: int, device: torch.device, desc: str,
    progress: bool,
) -> np.ndarray:
    """fn(noise, labels) over batches of rows on `device` -> float32 numpy [N, ...] on the CPU."""
    require_int("batch", batch, 1)
    out = []
    starts = range(0, noise.shape[0], batch)
    with torch.inference_mode():
        for lo in tqdm.tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            x = fn(noise[lo : lo + batch].to(device), labels[lo : lo + batch].to(device))
            out.append(x.float().cpu())
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------------
# Held-out teacher couplings.


@dataclasses.dataclass(frozen=True)
class Heldout:
    """Held-out couplings as numpy arrays (see the module docstring for the format)."""

    noise: np.ndarray
    labels: np.ndarray
    teacher_endpoint: np.ndarray
    teacher_1step: np.ndarray
    attrs: dict

    @property
    def num_samples(self) -> int:
        return int(self.noise.shape[0])


def make_heldout(
    teacher,
    guide,
    out_path,
    *,
    num_samples: int,
    seed: int,
    num_classes: int,
    heun_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: float,
    batch: int = 256,
    precision: str = "fp32",
    device=None,
    progress: bool = True,
) -> dict:
    """Write held-out teacher couplings for sample ids 0..num_samples-1 to `out_path` (``.npz``).

    `teacher` / `guide` are Preconds or project checkpoint paths (`guide` may be None when
    guidance == 1). `seed` must differ from the training couplings' seed (module docstring).
    The teacher runs on `device` (default: CUDA if available) under `precision` (the couplings'
    `couplings.precision`, so that the model is scored against the arithmetic its training
    couplings came from); the ODE state stays float32. Returns the attrs.
    """
    for name, value in (("num_samples", num_samples), ("num_classes", num_classes), ("heun_steps", heun_steps)):
        require_int(name, value, 1)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs two samples), got {num_samples}")
    device = resolve_device(device)
    net, net_info = load_net_and_info(teacher, device)
    guide_net, guide_info = load_net_and_info(guide, device) if guide is not None else (None, {"sha256": None})
    if not 1 <= num_classes <= net.label_dim:
        raise ValueError(f"num_classes={num_classes} must lie in [1, label_dim={net.label_dim}] of the teacher")

    ids = np.arange(num_samples)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise = sampling.per_sample_noise(seed, ids, shape)
    labels = sampling.per_sample_labels(seed, ids, num_classes)
    sampler = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guide=guide_net, guidance=guidance)

    precision = accel.resolve_precision(precision, device, "couplings.precision")

    def solve(num_steps: int, desc: str) -> np.ndarray:
        fn = functools.partial(sampling.edm_heun, net, num_steps=num_steps, **sampler)
        with accel.autocast(device, precision):
            return batched(fn, noise, labels, batch=batch, device=device, desc=desc, progress=progress)

    arrays = dict(
        noise=noise.numpy(),
        labels=labels.numpy(),
        teacher_endpoint=solve(heun_steps, f"held-out teacher ({heun_steps} Heun steps)"),
        teacher_1step=solve(1, "held-out teacher (1 Euler step)"),
    )
    attrs = dict(
        format=HELDOUT_FORMAT,
        seed=int(seed),
        num_samples=int(num_samples),
        num_classes=int(num_classes),
        sample_ids=[0, int(num_samples)],
        heun_steps=int(heun_steps),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        rho=float(rho),
        guidance=float(guidance),
        guided=guide_net is not None and guidance != 1,
        # Sequential denoiser evaluations per net; a guided solve costs twice that in net calls.
        nfe={"teacher_endpoint": heun_nfe(heun_steps), "teacher_1step": heun_nfe(1)},
        teacher_sha256=net_info["sha256"],
        guide_sha256=guide_info["sha256"],
        noise="sampling.per_sample_noise (numpy Philox key [sample_id, seed], stream 0), float32",
        precision=accel.precision_record(device, precision),
        numpy=np.__version__,
    )
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays, attrs=np.array(json.dumps(attrs)))
    return attrs


def load_heldout(path) -> Heldout:
    """Read and check a held-out ``.npz``; errors name the file and the offending key."""
    path = Path(path)
    arrays = fid.read_npz(path, (*HELDOUT_ARRAYS, "attrs"), "held-out couplings file")
    try:
        attrs = json.loads(str(arrays.pop("attrs")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: 'attrs' is not JSON ({e})") from e
    if not isinstance(attrs, dict) or attrs.get("format") != HELDOUT_FORMAT:
        found = attrs.get("format") if isinstance(attrs, dict) else attrs
        raise ValueError(f"{path}: attrs format is {found!r}, expected {HELDOUT_FORMAT!r}")
    _check_heldout_arrays(path, arrays, attrs)
    return Heldout(**arrays, attrs=attrs)


def _check_heldout_arrays(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    noise, labels = arrays["noise"], arrays["labels"]
    n = attrs.get("num_samples")
    if noise.ndim != 4 or noise.shape[0] != n:
        raise ValueError(f"{path}: 'noise' must be [num_samples={n}, C, H, W], got shape {noise.shape}")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be integers [{n}], got {labels.dtype} {labels.shape}")
    for key in ("noise", "teacher_endpoint", "teacher_1step"):
        a = arrays[key]
        if a.shape != noise.shape or a.dtype.kind != "f":
            raise ValueError(f"{path}: '{key}' must be floating-point {noise.shape}, got {a.dtype} {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: '{key}' contains NaN or infinite values")


def as_heldout(heldout) -> Heldout:
    """A `Heldout` as is, or the held-out file at that path (`load_heldout`)."""
    return heldout if isinstance(heldout, Heldout) else load_heldout(heldout)
