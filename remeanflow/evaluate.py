"""Evaluation that needs no external weights: held-out teacher couplings, pixel-space Fréchet
distance, error against the teacher, and a sample grid (DESIGN.md §3 "Evaluation", §4).

* `make_heldout` / `load_heldout`: noise, labels and the teacher's endpoints for sample ids
  0..N-1 under an *evaluation* seed. The caller must pass a seed different from the training
  couplings' seed: noise is keyed by (seed, sample id) (`sampling.per_sample_noise`), so the same
  seed would reproduce training couplings exactly and the error against the teacher would measure
  memorisation, not generalisation.
* `pixel_stats` / `reference_pixel_stats`: Gaussian statistics of flattened pixels in [-1, 1],
  for a Fréchet distance in pixel space (a weak stand-in for FID, which needs Inception weights).
* `evaluate_generator`: metrics of one set of samples for the held-out noise.
* `evaluate_checkpoint`: one-step samples of a checkpoint (and of the untrained initial model and
  the teacher's own one- and multi-step solutions, for comparison) -> ``metrics.json`` + PNG grid.

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
import torch.nn.functional as F
import tqdm
from PIL import Image

from . import checkpoints, fid, sampling
from .coupling_job import net_sha256
from .data.preprocess import load_images
from .fileio import atomic_path, sha256_file
from .teacher import uint8_to_float

HELDOUT_FORMAT = "remeanflow-heldout-v1"
METRICS_FORMAT = "remeanflow-eval-v1"
HELDOUT_ARRAYS = ("noise", "labels", "teacher_endpoint", "teacher_1step")
PIXEL_ENCODER = "StandardRGBEncoder"  # EDM2's encoder for nets that work on pixels in [-1, 1]
FID_SKIPPED = "FID skipped: no Inception weights configured"

# ----------------------------------------------------------------------------------------------
# Small helpers.


def _device(device) -> torch.device:
    """The given device, or CUDA when available (evaluation is meant for the GPU)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_net(net_or_path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A Precond (in eval mode) plus what is known of its origin: path, sha256, encoder."""
    if isinstance(net_or_path, torch.nn.Module):
        return net_or_path.eval().to(device), {"path": None, "sha256": None, "encoder": None}
    loaded = checkpoints.load_net(net_or_path)
    info = {"path": str(net_or_path), "sha256": net_sha256(net_or_path), "encoder": loaded["encoder"]}
    return loaded["net"].to(device), info


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _batched(
    fn: Callable, noise: torch.Tensor, labels: torch.Tensor, *, batch: int, device: torch.device, desc: str,
    progress: bool,
) -> np.ndarray:
    """fn(noise, labels) over batches of rows on `device` -> float32 numpy [N, ...] on the CPU."""
    _check_positive_int("batch", batch)
    out = []
    starts = range(0, noise.shape[0], batch)
    with torch.inference_mode():
        for lo in tqdm.tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            x = fn(noise[lo : lo + batch].to(device), labels[lo : lo + batch].to(device))
            out.append(x.float().cpu())
    return torch.cat(out).numpy()


def _write_json(path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


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


def heun_nfe(num_steps: int) -> int:
    """Denoiser evaluations per net of `sampling.edm_heun`: Heun steps, the last one Euler."""
    return 2 * num_steps - 1


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
    device=None,
    progress: bool = True,
) -> dict:
    """Write held-out teacher couplings for sample ids 0..num_samples-1 to `out_path` (``.npz``).

    `teacher` / `guide` are Preconds or project checkpoint paths (`guide` may be None when
    guidance == 1). `seed` must differ from the training couplings' seed (module docstring).
    The teacher runs in float32 on `device` (default: CUDA if available). Returns the attrs.
    """
    for name, value in (("num_samples", num_samples), ("num_classes", num_classes), ("heun_steps", heun_steps)):
        _check_positive_int(name, value)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs two samples), got {num_samples}")
    device = _device(device)
    net, net_info = _load_net(teacher, device)
    guide_net, guide_info = _load_net(guide, device) if guide is not None else (None, {"sha256": None})
    if not 1 <= num_classes <= net.label_dim:
        raise ValueError(f"num_classes={num_classes} must lie in [1, label_dim={net.label_dim}] of the teacher")

    ids = np.arange(num_samples)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise = sampling.per_sample_noise(seed, ids, shape)
    labels = sampling.per_sample_labels(seed, ids, num_classes)
    sampler = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guide=guide_net, guidance=guidance)

    def solve(num_steps: int, desc: str) -> np.ndarray:
        fn = functools.partial(sampling.edm_heun, net, num_steps=num_steps, **sampler)
        return _batched(fn, noise, labels, batch=batch, device=device, desc=desc, progress=progress)

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
        precision="fp32",
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


def _as_heldout(heldout) -> Heldout:
    return heldout if isinstance(heldout, Heldout) else load_heldout(heldout)


# ----------------------------------------------------------------------------------------------
# Pixel-space statistics.


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 as saved to disk (EDM2: x · 127.5 + 128, clipped, floored);
    the exact inverse of `uint8_to_float` on uint8 values."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def pixel_features(images, resolution: int | None = None) -> np.ndarray:
    """Flattened pixels in [-1, 1], float64 [N, C·H·W], of uint8 or float ([-1, 1]) images [N, C, H, W].

    Float images are first quantised like images written to disk, so that generated samples are
    compared with the (uint8) dataset on the same grid. With `resolution` below H, images are
    area-downsampled first: the covariance is (C·H·W)^2 and its square root cubic in that, so 64 px
    and up must be reduced to stay tractable.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or floating point in [-1, 1], got {x.dtype}")
        x = _to_uint8(x.float())
    x = uint8_to_float(x)
    if resolution is not None and resolution < x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x.reshape(x.shape[0], -1).double().numpy()


def pixel_stats(images, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics (mu, sigma) of `pixel_features(images, resolution)`."""
    return fid.gaussian_stats(pixel_features(images, resolution))


def reference_rows(num_images: int, max_images: int | None) -> np.ndarray:
    """Rows of an image store used for reference statistics: all, or `max_images` evenly spaced
    ones (the store is sorted by class, so a prefix would cover only the first classes)."""
    if max_images is None or max_images >= num_images:
        return np.arange(num_images)
    _check_positive_int("max_images", max_images)
    return np.arange(max_images) * num_images // max_images


def reference_pixel_stats(
    images_store, max_images: int | None = None, *, resolution: int | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel statistics of a preprocessed image store (`data.preprocess` format), read a chunk at a
    time; with `max_images`, of an evenly spaced subset (`reference_rows`)."""
    images, _ = load_images(images_store)
    rows = reference_rows(images.shape[0], max_images)
    stats = fid.RunningStats()
    step = images.chunks[0]
    for lo in tqdm.tqdm(range(0, images.shape[0], step), desc="reference pixel stats", unit="chunk",
                        disable=not progress, leave=False):
        wanted = rows[(rows >= lo) & (rows < lo + step)]
        if wanted.size:
            block = images[lo : lo + step]
            stats.update(pixel_features(block[wanted - lo], resolution))
    return stats.finalize()


# ----------------------------------------------------------------------------------------------
# Metrics.


def evaluate_generator(
    name: str, samples, heldout, ref_stats: tuple[np.ndarray, np.ndarray] | None, *, nfe: int,
    resolution: int | None = None,
) -> dict:
    """Metrics of `samples` [N, C, H, W] (in [-1, 1]) generated from the held-out noise and labels.

    * ``mse_vs_teacher``: mean squared error against the teacher's multi-step endpoints for the
      same noise, on the raw (unclipped) samples: the quantity the reflow training drives down.
    * ``fd_pixels``: Fréchet distance of `pixel_stats(samples, resolution)` to `ref_stats`
      (None when `ref_stats` is None).
    """
    heldout = _as_heldout(heldout)
    x = torch.as_tensor(samples).detach().cpu().double().numpy()
    if x.shape != heldout.teacher_endpoint.shape:
        raise ValueError(f"{name}: samples have shape {x.shape}, the held-out set {heldout.teacher_endpoint.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: samples contain NaN or infinite values")
    mse = float(np.mean((x - heldout.teacher_endpoint.astype(np.float64)) ** 2))
    fd = None if ref_stats is None else fid.frechet_distance(*pixel_stats(x, resolution), *ref_stats)
    return dict(name=name, fd_pixels=fd, mse_vs_teacher=mse, nfe=int(nfe), num_samples=heldout.num_samples)


# ----------------------------------------------------------------------------------------------
# Sample grid.


def grid_indices(labels: np.ndarray, per_class: int = 2, max_classes: int = 10) -> np.ndarray:
    """The first `per_class` held-out samples of each of the first `max_classes` classes present
    (in class order): a fixed, class-covering selection for the grid."""
    labels = np.asarray(labels)
    classes = np.unique(labels)[:max_classes]
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def save_grid(images, path, nrow: int, scale: int = 4, pad: int = 1, pad_value: int = 255) -> tuple[int, int]:
    """Tile images [N, C, H, W] in [-1, 1] (C = 1 or 3) into a PNG, `nrow` images per row
    (torchvision's convention), each upscaled `scale`x by nearest neighbour and separated (and
    framed) by `pad` pixels of grey level `pad_value`. Written atomically; returns (width, height).
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"grid images must be [N, 1 or 3, H, W] with N >= 1, got shape {tuple(x.shape)}")
    _check_positive_int("nrow", nrow)
    _check_positive_int("scale", scale)
    x = _to_uint8(x.float()).repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        canvas[:, top : top + h, left : left + w] = x[i]
    pixels = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG")
    return image.size


# ----------------------------------------------------------------------------------------------
# Checkpoint evaluation.


def _one_step_samples(net_or_path, heldout: Heldout, *, batch: int, device: torch.device, desc: str, progress: bool):
    """One-step samples x = n - u(n, t_max, 0 | c) of a net for the held-out noise and labels."""
    net, info = _load_net(net_or_path, device)
    expected = heldout.noise.shape[1:]
    actual = (net.img_channels, net.img_resolution, net.img_resolution)
    if actual != expected:
        raise ValueError(f"{info['path'] or desc}: net makes images {actual}, the held-out noise is {expected}")
    if heldout.labels.max() >= net.label_dim:
        raise ValueError(f"{info['path'] or desc}: label_dim {net.label_dim} too small for held-out labels")
    noise, labels = torch.from_numpy(heldout.noise), torch.from_numpy(heldout.labels)
    samples = _batched(lambda n, c: sampling.one_step(net, n, c), noise, labels, batch=batch, device=device,
                       desc=desc, progress=progress)
    return samples, info


def _check_teacher(teacher_path, heldout: Heldout, heldout_path) -> str | None:
    """sha256 of the teacher, checked against the one that made the held-out set when both are known."""
    if teacher_path is None:
        return heldout.attrs.get("teacher_sha256")
    digest = net_sha256(teacher_path)
    made_by = heldout.attrs.get("teacher_sha256")
    if made_by is not None and made_by != digest:
        raise ValueError(f"{heldout_path} was made by teacher sha256 {made_by}, not by {teacher_path} ({digest})")
    return digest


def evaluate_checkpoint(
    net_path,
    heldout_path,
    images_store,
    out_json,
    out_grid_png,
    *,
    batch: int = 256,
    include_teacher: bool = True,
    teacher_path=None,
    initial_path=None,
    max_ref_images: int | None = None,
    pixel_resolution: int | None = None,
    grid_per_class: int = 2,
    grid_max_classes: int = 10,
    grid_scale: int = 4,
    device=None,
    progress: bool = True,
) -> dict:
    """Evaluate a one-step checkpoint on held-out teacher couplings; write metrics JSON and a grid.

    Rows: the checkpoint's one-step samples; with `initial_path`, the untrained initial model's
    one-step samples (e.g. the teacher with fitted time embeddings, the stage-1 initialisation);
    with `include_teacher`, the teacher's single Euler step and its multi-step endpoints (whose
    error against themselves is 0 by definition; the row is there for its Fréchet distance).
    The pixel Fréchet distance is computed only for pixel-space nets (EDM2 StandardRGBEncoder);
    latent nets would need the VAE decoder, and their grid shows latent channels 0-2.
    Grid: rows = held-out samples (`grid_per_class` per class for up to `grid_max_classes`
    classes), columns as listed in ``grid.columns`` of the JSON. Returns the metrics dict.
    """
    heldout = load_heldout(heldout_path)
    teacher_sha = _check_teacher(teacher_path, heldout, heldout_path)
    device = _device(device)
    sampler = functools.partial(_one_step_samples, heldout=heldout, batch=batch, device=device, progress=progress)
    columns, shas = {}, dict(net=None, initial=None, teacher=teacher_sha, guide=heldout.attrs.get("guide_sha256"))
    columns["one_step"], net_info = sampler(net_path, desc="one-step samples")
    shas["net"] = net_info["sha256"]
    if initial_path is not None:
        columns["initial_one_step"], initial_info = sampler(initial_path, desc="initial-model samples")
        shas["initial"] = initial_info["sha256"]
    columns["teacher_1step"] = heldout.teacher_1step
    columns["teacher_endpoint"] = heldout.teacher_endpoint
    nfe = dict(one_step=1, initial_one_step=1, **heldout.attrs["nfe"])

    encoder = (net_info["encoder"] or {}).get("class_name")
    pixel_space = encoder == PIXEL_ENCODER
    notes = [FID_SKIPPED]
    ref_stats = None
    if pixel_space:
        ref_stats = reference_pixel_stats(images_store, max_ref_images, resolution=pixel_resolution, progress=progress)
        num_ref = len(reference_rows(load_images(images_store)[0].shape[0], max_ref_images))
    else:
        notes.append(f"pixel Fréchet distance skipped: the net works in the latent space of {encoder} "
                     "(needs the VAE decoder); the grid shows latent channels 0-2")

    names = [k for k in columns if include_teacher or not k.startswith("teacher")]
    rows = [evaluate_generator(k, columns[k], heldout, ref_stats, nfe=nfe[k], resolution=pixel_resolution)
            for k in names]

    picked = grid_indices(heldout.labels, grid_per_class, grid_max_classes)
    tiles = np.stack([columns[k][picked, :3] for k in columns], axis=1)  # [K, columns, C, H, W]
    width, height = save_grid(tiles.reshape(-1, *tiles.shape[2:]), out_grid_png, nrow=len(columns), scale=grid_scale)

    metrics = dict(
        format=METRICS_FORMAT,
        rows=rows,
        num_samples=heldout.num_samples,
        seed=heldout.attrs["seed"],
        fid=None,
        notes=notes,
        heldout=dict(path=str(heldout_path), sha256=sha256_file(heldout_path), attrs=heldout.attrs),
        reference=None if ref_stats is None else dict(
            images_store=str(images_store), num_images=num_ref, pixel_resolution=pixel_resolution),
        checkpoints=shas,
        grid=dict(
            path=str(out_grid_png), columns=list(columns), sample_index=picked.tolist(),
            labels=heldout.labels[picked].tolist(), scale=grid_scale, size=[width, height],
        ),
    )
    _write_json(out_json, metrics)
    return metrics
