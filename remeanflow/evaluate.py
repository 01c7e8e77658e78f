"""Sampled evaluation of one-step checkpoints (docs/method.md; stages and artifacts in
docs/architecture.md): FID over sharded samples when Inception weights are given, and the metrics
of a checkpoint on held-out teacher couplings (`heldout`) that need no external weights.

* `evaluate_generator`: metrics of one set of samples for the held-out noise.
* `evaluate_checkpoint`: one-step samples of a checkpoint (and of the untrained initial model and
  the teacher's own one- and multi-step solutions, for comparison) -> ``metrics.json`` + PNG grid
  (`figures`), with the sharded metrics (`sampled_metrics`) under ``sampled`` and its FID as ``fid``.

Pixel features and reference statistics live in `reference_stats`, the held-out couplings in
`heldout`, the sample grid in `figures`.

Sampled evaluation at paper scale (FID, docs/method.md): `sample_shard` x N, then `sampled_metrics`.
Sample id i in [0, fid_samples) gets noise ``per_sample_noise(seed, i)`` and a uniformly random
class ``per_sample_labels(seed, i)``, so the samples do not depend on how the ids are split;
shard k of N takes the contiguous ids `shard_range(fid_samples, k, N)`. A shard decodes its
one-step samples to uint8 pixels (`vae.make_decoder`: EDM2's encoder decode, the SD VAE for latent
nets) and keeps per-sample features only. Shard file (``.npz``, written atomically, no pickle)::

    sample_ids   int64   [n]      contiguous ids of this shard
    labels       int64   [n]      their classes
    f_inception  float32 [n, 2048] InceptionV3 pool features (when Inception weights are given)
    f_pixels     float32 [n, D]   `pixel_features` of the decoded pixels (at `pixel_resolution`)
    attrs        str (0-d)        JSON: format, shard, num_shards, seed, num_samples, num_classes,
                                  net sha256 and encoder, features (name -> dim, details), notes

`sampled_metrics` merges the shards of one checkpoint, checks that their ids are exactly
0..fid_samples-1 (no gap, no overlap) and that they agree on seed, net and features, and computes
FID (Inception features against reference statistics) and the pixel Fréchet distance over all of
them in sample-id order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
import tqdm

from . import accel, fid, inception, sampling, vae
from .checkpoints import net_sha256
from .data.preprocess import load_images
from .figures import grid_indices, save_panels
from .fileio import atomic_path, sha256_file
from .heldout import (
    Heldout,
    as_heldout,
    batched,
    load_heldout,
    load_net_and_info,
    resolve_device,
)
from .misc import require_int
from .preflight import vae_factor
from .reference_stats import (
    pixel_features,
    pixel_stats,
    reference_pixel_stats,
    reference_rows,
)

# Panel titles of the sample grid, by generator.
GRID_TITLES = {"one_step": "one-step model", "initial_one_step": "untrained (1 step)",
               "teacher_1step": "teacher, 1 Euler step", "teacher_endpoint": "teacher ODE"}
METRICS_FORMAT = "remeanflow-eval-v1"
SHARD_FORMAT = "remeanflow-eval-shard-v1"
PIXEL_ENCODER = vae.PIXEL_ENCODER  # EDM2's encoder for nets that work on pixels in [-1, 1]
FID_SKIPPED = "FID skipped: no Inception weights configured (config evaluate.inception.weights is null)"
# Pixels of all panels of the sample grid together: 10 classes of 64 px, 3 of decoded 512 px
# samples (a PNG of a few MB that the report inlines), whatever the resolution.
GRID_MAX_PIXELS = 4_000_000
STATS_CHUNK = 4096  # feature rows per RunningStats update: bounds the float64 copy in memory


def _write_json(path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


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
    heldout = as_heldout(heldout)
    x = torch.as_tensor(samples).detach().cpu().double().numpy()
    if x.shape != heldout.teacher_endpoint.shape:
        raise ValueError(f"{name}: samples have shape {x.shape}, the held-out set {heldout.teacher_endpoint.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: samples contain NaN or infinite values")
    mse = float(np.mean((x - heldout.teacher_endpoint.astype(np.float64)) ** 2))
    fd = None if ref_stats is None else fid.frechet_distance(*pixel_stats(x, resolution), *ref_stats)
    return dict(name=name, fd_pixels=fd, mse_vs_teacher=mse, nfe=int(nfe), num_samples=heldout.num_samples)


# ----------------------------------------------------------------------------------------------
# Sampled evaluation in shards (FID at paper scale).


def shard_range(num_samples: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[lo, hi) of the sample ids of shard `shard` of `num_shards`: contiguous, disjoint, covering
    0..num_samples-1, sizes differing by at most one."""
    require_int("num_samples", num_samples, 1)
    require_int("num_shards", num_shards, 1)
    if num_shards > num_samples:
        raise ValueError(f"num_shards={num_shards} exceeds num_samples={num_samples}: some shards would be empty")
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be an integer in [0, {num_shards}), got {shard!r}")
    return shard * num_samples // num_shards, (shard + 1) * num_samples // num_shards


def _decoder_or_none(encoder: dict | None, vae_path, device, need_pixels: bool, vae_batch: int | None = None):
    """`vae.make_decoder`, or None (with the reason) for a latent net without a VAE when nothing
    needs pixels; with Inception weights configured that is an error instead."""
    if (encoder or {}).get("class_name") == vae.VAE_ENCODER and vae_path is None and not need_pixels:
        return None, ("sampled pixel Fréchet distance skipped: the net works in the latent space of "
                      f"{vae.VAE_ENCODER} and no VAE is configured (evaluate.vae)")
    return vae.make_decoder(encoder, vae_path, device, batch_size=vae_batch), None


def sample_shard(
    net_path,
    out_path,
    *,
    shard: int,
    num_shards: int,
    num_samples: int,
    seed: int,
    num_classes: int,
    batch: int = 256,
    inception_weights=None,
    inception_sha256: str | None = None,
    vae_path=None,
    vae_batch: int | None = None,
    pixel_resolution: int | None = None,
    precision: str = "fp32",
    device=None,
    progress: bool = True,
) -> dict:
    """One-step samples of a checkpoint for the sample ids of one shard -> per-sample features (.npz).

    The ids are `shard_range(num_samples, shard, num_shards)`; noise and classes come from
    (`seed`, id) alone (module docstring). Samples are decoded to uint8 pixels, then reduced to
    `pixel_features` at `pixel_resolution` and, with `inception_weights` (a local file), to
    InceptionV3 pool features. The one-step net and the VAE run under `precision` (autocast;
    decoded in `vae_batch` images at a time), Inception always in float32: its features define the
    FID, so they stay comparable across runs and to published statistics. Returns the shard's attrs.
    """
    lo, hi = shard_range(num_samples, shard, num_shards)
    require_int("num_classes", num_classes, 1)
    device = resolve_device(device)
    net, info = load_net_and_info(net_path, device)
    if num_classes > net.label_dim:
        raise ValueError(f"{net_path}: label_dim {net.label_dim} is smaller than num_classes={num_classes}")
    precision = accel.resolve_precision(precision, device, "evaluate.precision")
    decode, note = _decoder_or_none(info["encoder"], vae_path, device, need_pixels=inception_weights is not None,
                                    vae_batch=vae_batch)
    detector = None
    if inception_weights is not None:
        detector = inception.load_inception(inception_weights, inception_sha256, device=device)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    ids = np.arange(lo, hi)
    labels = sampling.per_sample_labels(seed, ids, num_classes)
    feats: dict[str, list[np.ndarray]] = {"pixels": [], "inception": []} if decode is not None else {}
    image_shape = None
    with torch.inference_mode():
        for start in tqdm.tqdm(range(0, len(ids), batch), desc=f"eval shard {shard}", unit="batch",
                               disable=not progress, leave=False):
            part = ids[start : start + batch]
            noise = sampling.per_sample_noise(seed, part, shape).to(device)
            with accel.autocast(device, precision):
                x = sampling.one_step(net, noise, labels[start : start + batch].to(device)).float()
                if decode is None:
                    continue
                pixels = decode(x)
            image_shape = list(pixels.shape[1:])
            feats["pixels"].append(pixel_features(pixels, pixel_resolution).astype(np.float32))
            if detector is not None:
                feats["inception"].append(inception.extract_features(detector, pixels, batch=batch))
    arrays = {f"f_{k}": np.concatenate(v) for k, v in feats.items() if v}
    features = {k[2:]: int(v.shape[1]) for k, v in arrays.items()}
    attrs = dict(
        format=SHARD_FORMAT, shard=int(shard), num_shards=int(num_shards), sample_ids=[int(lo), int(hi)],
        num_samples=int(num_samples), seed=int(seed), num_classes=int(num_classes), net_sha256=info["sha256"],
        net_path=info["path"], encoder=(info["encoder"] or {}).get("class_name", PIXEL_ENCODER),
        features=features, image_shape=image_shape, pixel_resolution=pixel_resolution,
        inception_sha256=None if detector is None else inception.check_sha256(inception_weights, inception_sha256),
        vae=None if vae_path is None else str(vae_path), nfe=1, notes=[] if note is None else [note],
        precision={"sampling": accel.precision_record(device, precision),
                   "inception": accel.precision_record(device, "fp32")},
        noise="sampling.per_sample_noise (numpy Philox key [sample_id, seed], stream 0), float32",
    )
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sample_ids=ids.astype(np.int64), labels=labels.numpy(), **arrays, attrs=np.array(json.dumps(attrs)))
    return attrs


@dataclasses.dataclass(frozen=True)
class Shard:
    """One evaluation shard file, read and checked."""

    path: Path
    sample_ids: np.ndarray
    labels: np.ndarray
    features: dict[str, np.ndarray]
    attrs: dict


def load_shard(path) -> Shard:
    """Read an evaluation shard (.npz, no pickle); errors name the file and the bad key."""
    path = Path(path)
    arrays = fid.read_npz(path, ("sample_ids", "labels", "attrs"), "evaluation shard file")
    try:
        attrs = json.loads(str(arrays["attrs"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: 'attrs' is not JSON ({e})") from e
    if not isinstance(attrs, dict) or attrs.get("format") != SHARD_FORMAT:
        found = attrs.get("format") if isinstance(attrs, dict) else attrs
        raise ValueError(f"{path}: attrs format is {found!r}, expected {SHARD_FORMAT!r}")
    names = list(attrs.get("features") or {})
    features = fid.read_npz(path, tuple(f"f_{k}" for k in names), "evaluation shard file")
    ids, labels = arrays["sample_ids"], arrays["labels"]
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or labels.shape != ids.shape:
        raise ValueError(f"{path}: 'sample_ids' and 'labels' must be integer vectors of one length, "
                         f"got {ids.dtype} {ids.shape} and {labels.dtype} {labels.shape}")
    for name in names:
        f = features[f"f_{name}"]
        if f.shape != (len(ids), attrs["features"][name]) or not np.isfinite(f).all():
            raise ValueError(f"{path}: 'f_{name}' must be finite [{len(ids)}, {attrs['features'][name]}], "
                             f"got shape {f.shape}")
    return Shard(path, ids, labels, {k[2:]: v for k, v in features.items()}, attrs)


# Attributes every shard of one evaluation must share.
_SHARED_ATTRS = ("num_shards", "num_samples", "seed", "num_classes", "net_sha256", "encoder", "features",
                 "image_shape", "pixel_resolution", "inception_sha256")


def merge_shards(paths, num_samples: int) -> Shard:
    """All shards of one evaluation as one `Shard` in sample-id order, after checking that they
    agree (`_SHARED_ATTRS`) and that their ids are exactly 0..num_samples-1: a gap, an overlap or a
    shard made for another sample count is an error naming the files."""
    shards = [load_shard(p) for p in paths]
    if not shards:
        raise ValueError("no evaluation shards given")
    first = shards[0]
    for s in shards[1:]:
        for key in _SHARED_ATTRS:
            if s.attrs.get(key) != first.attrs.get(key):
                raise ValueError(f"{s.path}: {key} is {s.attrs.get(key)!r}, but {first.path} has "
                                 f"{first.attrs.get(key)!r}")
    if first.attrs["num_samples"] != num_samples:
        raise ValueError(f"{first.path}: made for {first.attrs['num_samples']} samples, expected exactly {num_samples}")
    ids = np.concatenate([s.sample_ids for s in shards])
    owner = np.concatenate([np.full(len(s.sample_ids), i) for i, s in enumerate(shards)])
    order = np.argsort(ids, kind="stable")
    ids, owner = ids[order], owner[order]
    if (dup := np.flatnonzero(ids[1:] == ids[:-1])).size:
        a, b = shards[owner[dup[0]]].path, shards[owner[dup[0] + 1]].path
        raise ValueError(f"evaluation shards overlap: {dup.size} sample id(s) appear twice, e.g. {ids[dup[0]]} "
                         f"in {a} and {b}")
    if ids.size != num_samples or ids[0] != 0 or ids[-1] != num_samples - 1:
        missing = np.setdiff1d(np.arange(num_samples), ids)
        raise ValueError(f"evaluation shards hold {ids.size} distinct samples, expected exactly ids "
                         f"0..{num_samples - 1}: "
                         f"{missing.size} missing (e.g. {missing[:5].tolist()}), "
                         f"{int(np.sum((ids < 0) | (ids >= num_samples)))} out of range")
    labels = np.concatenate([s.labels for s in shards])[order]
    features = {k: np.concatenate([s.features[k] for s in shards])[order] for k in first.features}
    notes = sorted({n for s in shards for n in s.attrs.get("notes", [])})
    return Shard(Path(first.path).parent, ids, labels, features, dict(first.attrs, shard=None, notes=notes))


def _feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stats = fid.RunningStats()
    for lo in range(0, features.shape[0], STATS_CHUNK):
        stats.update(features[lo : lo + STATS_CHUNK])
    return stats.finalize()


def _distance_to(features: np.ndarray, ref_path, what: str) -> float:
    """Fréchet distance of the Gaussian fitted to `features` to the statistics in `ref_path`."""
    ref = fid.load_stats(ref_path)
    if ref[0].shape[0] != features.shape[1]:
        raise ValueError(f"{ref_path}: {what} reference statistics are {ref[0].shape[0]}-d, the samples' "
                         f"features {features.shape[1]}-d (different pixel_resolution or image size?)")
    return fid.frechet_distance(*_feature_stats(features), *ref)


def sampled_metrics(
    shard_paths, *, num_samples: int, inception_ref=None, pixel_ref=None, ref_resolution: int | None = None
) -> dict:
    """FID and pixel Fréchet distance over exactly `num_samples` sharded samples (`merge_shards`).

    `inception_ref`: FID reference statistics (.npz, mu/sigma), required when the shards hold
    Inception features; `ref_resolution`: the image size they were computed at, when known (a note
    flags samples of another size: such an FID is not comparable to published numbers);
    `pixel_ref`: pixel statistics of the dataset at the same `pixel_resolution`. A metric that
    cannot be computed is None, with the reason in ``notes``.
    """
    merged = merge_shards(shard_paths, num_samples)
    attrs, notes = merged.attrs, list(merged.attrs["notes"])
    out = dict(
        num_samples=int(merged.sample_ids.size), seed=attrs["seed"], num_shards=attrs["num_shards"],
        classes="uniform", num_classes=attrs["num_classes"],
        class_counts=np.bincount(merged.labels, minlength=attrs["num_classes"]).tolist(),
        net_sha256=attrs["net_sha256"], encoder=attrs["encoder"], image_shape=attrs["image_shape"], nfe=attrs["nfe"],
        fid=None, inception_sha256=attrs["inception_sha256"], inception_reference=None,
        fd_pixels=None, pixel_resolution=attrs["pixel_resolution"], pixel_reference=None, notes=notes,
    )
    if "inception" in merged.features:
        if inception_ref is None:
            raise ValueError("the evaluation shards hold Inception features but no FID reference statistics were given")
        out["fid"] = _distance_to(merged.features["inception"], inception_ref, "FID")
        out["inception_reference"] = dict(path=str(inception_ref), sha256=sha256_file(inception_ref),
                                          resolution=ref_resolution)
        size = attrs["image_shape"][-1]
        if ref_resolution is not None and ref_resolution != size:
            notes.append(f"FID reference statistics come from {ref_resolution} px dataset images, the samples are "
                         f"{size} px: not comparable to published FIDs (set evaluate.ref_stats.source)")
    else:
        notes.append(FID_SKIPPED)
    if "pixels" in merged.features and pixel_ref is not None:
        out["fd_pixels"] = _distance_to(merged.features["pixels"], pixel_ref, "pixel")
        out["pixel_reference"] = dict(path=str(pixel_ref), sha256=sha256_file(pixel_ref))
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoint evaluation.


def _one_step_samples(net_or_path, heldout: Heldout, *, batch: int, device: torch.device, desc: str, progress: bool,
                      precision: str = "fp32"):
    """One-step samples x = n - u(n, t_max, 0 | c) of a net for the held-out noise and labels."""
    net, info = load_net_and_info(net_or_path, device)
    expected = heldout.noise.shape[1:]
    actual = (net.img_channels, net.img_resolution, net.img_resolution)
    if actual != expected:
        raise ValueError(f"{info['path'] or desc}: net makes images {actual}, the held-out noise is {expected}")
    if heldout.labels.max() >= net.label_dim:
        raise ValueError(f"{info['path'] or desc}: label_dim {net.label_dim} too small for held-out labels")
    noise, labels = torch.from_numpy(heldout.noise), torch.from_numpy(heldout.labels)
    with accel.autocast(device, precision):
        samples = batched(lambda n, c: sampling.one_step(net, n, c), noise, labels, batch=batch, device=device,
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


def _to_signed(pixels: torch.Tensor) -> np.ndarray:
    """uint8 pixels -> [-1, 1] floats, as the grid takes them (exact on uint8 values)."""
    return (pixels.float() / 127.5 - 1).numpy()


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
    grid_min_px: int = 64,
    pixel_ref_stats=None,
    sampled: dict | None = None,
    vae_path=None,
    vae_batch: int | None = None,
    precision: str = "fp32",
    device=None,
    progress: bool = True,
) -> dict:
    """Evaluate a one-step checkpoint on held-out teacher couplings; write metrics JSON and a grid.

    Rows: the checkpoint's one-step samples; with `initial_path`, the untrained initial model's
    one-step samples (e.g. the teacher with fitted time embeddings, the stage-1 initialisation);
    with `include_teacher`, the teacher's single Euler step and its multi-step endpoints (whose
    error against themselves is 0 by definition; the row is there for its Fréchet distance).
    The pixel Fréchet distance is computed only for pixel-space nets (EDM2 StandardRGBEncoder).
    The grid of a latent net shows its samples decoded by the VAE at `vae_path` (only the grid's
    samples are decoded), or latent channels 0-2 without one.
    Grid (`figures.save_panels`): one panel per generator (``grid.panels`` of the JSON), each with
    the same held-out samples: `grid_per_class` per class for up to `grid_max_classes` classes
    (fewer when the panels would exceed `GRID_MAX_PIXELS`), classes as rows; images upscaled by
    nearest neighbour to at least `grid_min_px` pixels. The one-step nets run under `precision`.

    `pixel_ref_stats`: precomputed pixel statistics of the dataset (.npz) instead of reading
    `images_store` again. `sampled`: the result of `sampled_metrics` for this checkpoint; its FID
    becomes ``fid`` of the JSON and the whole dict ``sampled``. Without it (or when it has no FID)
    ``fid`` is None and ``notes`` say why. Returns the metrics dict.
    """
    heldout = load_heldout(heldout_path)
    teacher_sha = _check_teacher(teacher_path, heldout, heldout_path)
    device = resolve_device(device)
    precision = accel.resolve_precision(precision, device, "evaluate.precision")
    sampler = functools.partial(_one_step_samples, heldout=heldout, batch=batch, device=device, progress=progress,
                                precision=precision)
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
    if sampled is not None and net_info["sha256"] is not None and sampled["net_sha256"] != net_info["sha256"]:
        raise ValueError(f"the sampled metrics are of net sha256 {sampled['net_sha256']}, not of {net_path} "
                         f"({net_info['sha256']})")
    fid_value = None if sampled is None else sampled["fid"]
    notes = [FID_SKIPPED] if sampled is None else list(sampled["notes"])
    ref_stats = reference = None
    if pixel_space:
        if pixel_ref_stats is not None:
            ref_stats = fid.load_stats(pixel_ref_stats)
            reference = dict(stats=str(pixel_ref_stats), sha256=sha256_file(pixel_ref_stats),
                             pixel_resolution=pixel_resolution)
        else:
            ref_stats = reference_pixel_stats(images_store, max_ref_images, resolution=pixel_resolution,
                                              progress=progress)
            num_ref = len(reference_rows(load_images(images_store)[0].shape[0], max_ref_images))
            reference = dict(images_store=str(images_store), num_images=num_ref, pixel_resolution=pixel_resolution)
    else:
        shown = "decoded by the VAE (evaluate.vae)" if vae_path is not None else "latent channels 0-2"
        notes.append(f"pixel Fréchet distance of the held-out rows skipped: the net works in the latent space of "
                     f"{encoder}; the grid shows its samples {shown}")

    names = [k for k in columns if include_teacher or not k.startswith("teacher")]
    rows = [evaluate_generator(k, columns[k], heldout, ref_stats, nfe=nfe[k], resolution=pixel_resolution)
            for k in names]

    # One panel per generator, the same held-out samples in each: classes as rows, grid_per_class
    # samples as columns (a class with fewer held-out samples gets white cells).
    decode = not pixel_space and vae_path is not None
    tile_px = heldout.noise.shape[-1] * (vae_factor(vae_path) if decode else 1)
    max_classes = max(1, min(grid_max_classes, GRID_MAX_PIXELS // (tile_px**2 * grid_per_class * len(columns))))
    picked = grid_indices(heldout.labels, grid_per_class, max_classes)
    classes = sorted(set(heldout.labels[picked].tolist()))
    slots = [np.flatnonzero(heldout.labels[picked] == c) for c in classes]
    shown = {k: np.asarray(columns[k])[picked] for k in columns}
    if decode:
        decode_latents = vae.make_decoder(net_info["encoder"], vae_path, device, batch_size=vae_batch)  # loaded once
        shown = {k: _to_signed(decode_latents(torch.from_numpy(np.ascontiguousarray(v)))) for k, v in shown.items()}

    def panel(images: np.ndarray) -> np.ndarray:
        blank = np.ones_like(images[:1, :3])
        rows = [[images[i : i + 1, :3] for i in slot] + [blank] * (grid_per_class - len(slot)) for slot in slots]
        return np.concatenate([cell for row in rows for cell in row])

    width, height = save_panels(
        [(GRID_TITLES.get(k, k), panel(shown[k])) for k in columns], out_grid_png, per_row=grid_per_class,
        row_labels=[f"class {c}" for c in classes], min_px=grid_min_px,
    )

    metrics = dict(
        format=METRICS_FORMAT,
        rows=rows,
        num_samples=heldout.num_samples,
        seed=heldout.attrs["seed"],
        fid=fid_value,
        notes=notes,
        sampled=sampled,
        heldout=dict(path=str(heldout_path), sha256=sha256_file(heldout_path), attrs=heldout.attrs),
        reference=reference,
        checkpoints=shas,
        precision=accel.precision_record(device, precision),
        grid=dict(
            path=str(out_grid_png), panels=list(columns), layout="per panel: classes as rows, samples as columns",
            sample_index=picked.tolist(), labels=heldout.labels[picked].tolist(), size=[width, height],
            decoded_by=str(vae_path) if decode else None, tile_px=tile_px,
        ),
    )
    _write_json(out_json, metrics)
    return metrics
