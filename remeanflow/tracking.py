"""Experiment trackers during training (config `train.trackers`: TensorBoard, W&B, ... through
accelerate's tracker interface): every metric the metrics CSV gets, per step, and a grid of
one-step samples of the EMA net at each snapshot.

Logs go under the stage's work folder (`<work_dir>/trackers/`), which Snakemake does not own: a
resumed or extended stage keeps appending to the same run's logs. Logging changes no result.

With several processes only the main one logs (accelerate opens the trackers there alone). The
trackers close at the end of the loop, but not through `accelerator.end_training()`: that also
destroys the process group, which the ranks still need to write and await the final outputs (a
2-rank run died in its last barrier so); the rank's entry point destroys it once, at its end
(`launch.end_rank`). docs/tracking.md: how to enable them, W&B offline and `wandb sync`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from . import networks, sampling
from .inception import to_uint8

GRID_CLASSES = 8  # classes in the tracked sample grid (the first ones of the net's label set)
GRID_PER_CLASS = 2
GRID_SEED = 1_000_003  # the evaluation's default seed: noise that no training coupling uses


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as the flat scalar dict trackers accept (nested keys joined by '/', lists
    and other values as strings)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start(accelerator: Accelerator, stage: int, config: dict[str, Any]) -> None:
    """Open the trackers of the accelerator (`train.make_accelerator(trackers=...)`) for one stage.
    W&B writes its run (`WANDB_MODE=offline`: the whole run) into `<logging_dir>/wandb/` like the
    other trackers' logs, not into the current directory, its default."""
    if accelerator.is_main_process:
        Path(accelerator.logging_dir).mkdir(parents=True, exist_ok=True)  # W&B does not create it
    accelerator.init_trackers(f"stage{stage}", config=flat_config(config),
                              init_kwargs={"wandb": {"dir": str(accelerator.logging_dir)}})


@torch.no_grad()
def sample_grid(ema: networks.Precond, device) -> np.ndarray:
    """One-step samples of the EMA net for fixed noise: [N, H, W, 3] uint8, GRID_PER_CLASS
    consecutive samples per class. Nets with other than 1 or 3 channels (latent nets: decoding
    needs the VAE, which training does not load) show their first channels, as the evaluation
    grid does: channels 0-2, or channel 0 as grey."""
    classes = torch.arange(min(GRID_CLASSES, max(ema.label_dim, 1))).repeat_interleave(GRID_PER_CLASS)
    shape = (ema.img_channels, ema.img_resolution, ema.img_resolution)
    noise = sampling.per_sample_noise(GRID_SEED, range(classes.numel()), shape)
    x = sampling.one_step(ema, noise.to(device), classes.to(device) if ema.label_dim else None).float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    pixels = to_uint8(x).permute(0, 2, 3, 1).numpy()
    return np.repeat(pixels, 3, axis=3) if pixels.shape[3] == 1 else pixels


def finish(accelerator: Accelerator) -> None:
    """Close the trackers (none: nothing to do). Not `accelerator.end_training()`, which also
    destroys the process group that the ranks still need for the final outputs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def log_grid(accelerator: Accelerator, ema: networks.Precond, step: int) -> None:
    """The EMA net's sample grid to every tracker that takes images (main process)."""
    grid = sample_grid(ema, accelerator.device)
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            # TensorBoard needs the layout; W&B passes keywords on to `wandb.log`, which refuses it.
            layout = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"one_step_samples": grid}, step=step, **layout)
