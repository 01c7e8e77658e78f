"""Small helpers shared by several modules (in the spirit of EDM2's `torch_utils/misc.py`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def require_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """ValueError unless `value` is an integer (not a bool) in [lo, hi)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value >= hi):
        bounds = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two dicts."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))


def tail_mean(values: list[float]) -> float | None:
    """Mean over the last 10% of steps (None for no steps): one batch's loss is too noisy to
    summarise a run."""
    tail = values[-max(1, len(values) // 10):]
    return float(np.mean(tail)) if tail else None


def heun_nfe(num_steps: int) -> int:
    """Denoiser evaluations per net of the EDM Heun sampler: 2 per step, 1 for the last (Euler)."""
    return 2 * num_steps - 1


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], x / 127.5 - 1 (EDM2's StandardRGBEncoder)."""
    return torch.as_tensor(images).to(torch.float32) / 127.5 - 1


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace integer class labels by the null class -1 with probability p (CFG class dropout)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drop = (torch.rand(labels.shape[0], generator=generator, device=gen_device) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, -1), labels)


def shard_range(num_samples: int, shard: int, num_shards: int, chunk: int) -> tuple[int, int]:
    """[start, stop) of `shard` out of `num_shards`: whole generation chunks, split as evenly as possible.

    Every boundary is a multiple of `chunk` except the final stop (= `num_samples`).
    """
    for name, value in (("num_samples", num_samples), ("num_shards", num_shards), ("chunk", chunk)):
        require_int(name, value, 1)
    require_int("shard", shard, 0, num_shards)
    num_chunks = -(-num_samples // chunk)
    if num_shards > num_chunks:
        raise ValueError(
            f"{num_shards} shards for {num_chunks} chunks of {chunk} ({num_samples} samples): "
            "every shard needs at least one chunk; use fewer shards or a smaller chunk"
        )
    first, last = shard * num_chunks // num_shards, (shard + 1) * num_chunks // num_shards
    return first * chunk, min(last * chunk, num_samples)


def one_hot(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Integer class indices -> one-hot rows; index -1 is the null class (all zeros, for CFG).

    One-hot rows (floating point) are only shape-checked and cast: the path every net call takes,
    free of host synchronisation. Class indices are range-checked, which reads min/max back to the
    host (a sync on a GPU tensor): convert them once per batch, outside the per-step net calls
    (`sampling.edm_heun`, `meanflow_sample` and the training loss do), not inside every call.
    """
    if labels.dtype.is_floating_point:
        if labels.ndim != 2 or labels.shape[1] != label_dim:
            raise ValueError(f"one-hot class labels must have shape [N, {label_dim}], got {tuple(labels.shape)}")
        return labels.to(torch.float32)
    if labels.ndim != 1:
        raise ValueError(f"class indices must be a vector [N], got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < -1 or labels.max() >= label_dim):
        raise ValueError(f"class indices must lie in [-1, {label_dim - 1}] (-1 = null class)")
    # A comparison with the class range instead of boolean indexing (whose data-dependent shape is
    # another sync); -1 matches no class, so null rows stay zero.
    classes = torch.arange(label_dim, device=labels.device)
    return (labels.long()[:, None] == classes).to(torch.float32)
