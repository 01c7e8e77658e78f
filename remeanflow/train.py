"""Re-MeanFlow training: the MeanFlow objective on rectified couplings, stage 1 and stage 2.

Re-MeanFlow (arXiv 2511.23342, section 4; DESIGN §3 "MeanFlow loss", "Training") retrains an
EDM2 teacher, whose t/r time embeddings were fitted first (`time_embedding`), as a one-step
average-velocity model u(x_t, t, r | c):

* stage 1: target v_hat = v (w = w_pi = 1), no gradient clipping;
* stage 2: starts from stage 1's model and EMA, draws one guidance scale w_pi ~ U(1, w_max) per
  step, (w, k) = `cfg_weights(w_pi)`, the CFG target of MeanFlow §4.2, grad-norm clip 1.0.

Both: Adam (paper: lr 1e-4, betas (0.9, 0.99), no weight decay), EMA of the weights with decay
0.9999 per step, class dropout 0.1 to the null class, the adaptive loss weight of MeanFlow §4.3.

Determinism and resume. Every random draw of step s on the process of GLOBAL rank r
(`accelerator.process_index`, unique across nodes; the local rank repeats on every node) comes
from generators keyed by (seed, s, r) -- (t, r) from `sample_t_r`, class dropout from
`drop_labels`, and any global-RNG use such as dropout layers -- except w_pi, keyed by (seed, s)
so that all processes use the same guidance scale (`draw_step`). The data order is the position
of `loader.CouplingStream`. A checkpoint therefore only needs weights, EMA, optimiser, step and
stream positions, and a run killed at any time and restarted from its newest checkpoint
reproduces the uninterrupted run bit for bit (on the CPU, where kernels are deterministic).

Processes. Built on `accelerate.Accelerator` (`make_accelerator`): a plain single process when
not launched; under `accelerate launch` with W processes `batch_size` is the GLOBAL batch (W must
divide it) and each process draws batch_size / W couplings from its own share of the chunks
(equal per-rank batches whatever truncation dropped, `loader`). The DDP-wrapped model is the
`model_fn` of the loss, so backward all-reduces (averages) the gradients: jvp="tangent" passes
v_hat through the wrapper's forward, and for jvp="forward" its unwrapped module is the
`tangent_fn` of the forward-mode JVP (DESIGN §3 "JVP": `torch.func.jvp` cannot go through DDP;
calling the unwrapped module for u as well would silently skip the all-reduce). Equal
per-rank batches make the average of the per-rank mean losses the mean over the global batch,
so W processes x B couplings take the same step as one process x W·B (`train_step`). Only the
main process writes files (`_require_main`).

Resuming under another number of processes. Model, EMA, optimiser, step and metrics carry over
exactly and the global batch stays `batch_size` (per process batch_size / W_new; refused if W_new
does not divide it). The coupling stream cannot continue bit-exactly: rank r of W_new reads other
chunks than rank r of W_old. Every new rank starts at the first window of the first epoch none of
the saved ranks had started (`loader.first_unstarted_epoch`), so each coupling is still drawn
exactly once per epoch and the couplings the old ranks had not yet drawn from their epochs in
progress are skipped (usually less than one epoch; `loader`, "Another layout"). Per-step draws
are keyed by the new ranks. A warning says so; the run is from then on no longer bit-identical to
an uninterrupted one.

Snapshots. With `snapshot_every` N, the EMA net at every step divisible by N is kept as
work_dir/snapshots/ema-step-XXXXXXXX.pt (`checkpoints.save_net` format, never pruned), so that
intermediate points of a run can be evaluated later.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import tqdm
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from . import accel, checkpoints, networks
from .couplings import CouplingReader, open_couplings
from .fileio import atomic_path, json_sha256, sha256_file
from .loader import CouplingStream, check_fingerprint_subset, first_unstarted_epoch, keyed_seed
from .meanflow import cfg_weights, drop_labels, sample_t_r
from .misc import diff_keys, require_int, tail_mean

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "remeanflow.train-checkpoint/1"
TRAIN_STATE_FORMAT = "remeanflow.train-state/1"
METRICS_COLUMNS = ("step", "loss", "mse", "w_pi", "lr", "grad_norm", "samples_per_s", "kept_fraction")
MIXED_PRECISION = ("auto", "no", "bf16")
# Parameters that do not enter u(x_t, t, r | c): the teacher's ln(sigma)/4 embedding (replaced by
# emb_noise_t/emb_noise_r) and EDM2's log-variance head (a diffusion-loss weight). They are frozen:
# they get no gradient, and DDP would otherwise wait forever for their all-reduce. (Forced weight
# normalisation still projects them onto the unit-RMS sphere, which changes no function value.)
FROZEN = ("unet.emb_noise.weight", "logvar_linear.weight")
# Purposes of the keyed generators (see loader.keyed_seed).
_STEP_RNG, _GLOBAL_RNG, _W_PI = 11, 12, 13
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
SNAPSHOT_DIR = "snapshots"
# Settings recorded with a run that say how it was laid out over processes, not what it computes:
# a checkpoint made under another layout may resume (module docstring). Older checkpoints kept
# the number of processes inside their configuration.
_LAYOUT_CONFIG_KEYS = ("num_processes",)


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; nothing was written to the output folder."""


# ----------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class _Start:
    """What a run starts from: the net to train, its EMA, and what describes them."""

    net: networks.Precond
    ema: networks.Precond
    encoder: dict[str, Any]
    source: str  # "net" (stage 1: a project net checkpoint) or "train_state" (stage 2)


def _load_start(init, stage: int) -> _Start:
    """Stage 1: a `checkpoints.save_net` file (the teacher with fitted t/r embeddings); the EMA
    starts as a copy of it. Stage 2: a stage-1 `train_state.pt`; training continues from its
    model and its EMA (the optimiser starts fresh: the stage-2 target is a different objective,
    and Adam's moments re-adapt within ~1/(1 - beta2) = 100 steps)."""
    if stage == 1:
        loaded = checkpoints.load_net(init)
        net, encoder = loaded["net"], loaded["encoder"]
        return _Start(net=net, ema=copy.deepcopy(net), encoder=encoder, source="net")
    obj = torch.load(init, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{init}: not a Re-MeanFlow train_state.pt (format {TRAIN_STATE_FORMAT!r} expected); "
                         "stage 2 starts from stage 1's out_dir/train_state.pt")
    net, ema = (_net_from_state(init, obj["init_kwargs"], obj[key], key) for key in ("model", "ema"))
    return _Start(net=net, ema=ema, encoder=obj["encoder"], source="train_state")


def _net_from_state(path, init_kwargs: dict, state_dict: dict, what: str) -> networks.Precond:
    net = networks.Precond(**init_kwargs)
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: '{what}' does not match init_kwargs (missing {missing}, unexpected {unexpected})")
    return net


def _prepare_for_training(net: networks.Precond) -> list[torch.nn.Parameter]:
    """Train mode; every parameter trainable except `FROZEN`; returns the trainable ones."""
    net.train()
    for name, param in net.named_parameters():
        param.requires_grad_(name not in FROZEN)
    return [p for p in net.parameters() if p.requires_grad]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay · theta_ema + (1 - decay) · theta, in float32 (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Processes.


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """The Accelerator of one training process: a single process, or one rank of a launched run.

    mixed_precision: "auto" (bf16 on CUDA, none on the CPU), "no" or "bf16". `cpu=True` where
    there is no GPU: without it accelerate ignores the launcher's process group on a GPU-less
    machine and every launched process trains alone as "process 0 of 1" (each writing the same
    outputs). The launcher's WORLD_SIZE is checked against what accelerate set up, so that such a
    silent split is an error.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes}: "
            "each process would train alone on the whole run; check the launcher (`accelerate launch --multi_gpu` "
            "or torchrun) and the accelerate configuration it applies"
        )
    return accelerator


def _require_main(accelerator: Accelerator, what: object) -> None:
    """Every file of a run is written by the main process; another rank writing is a bug (two
    processes renaming onto one path can leave either's file, or a mix of checkpoint parts)."""
    if not accelerator.is_main_process:
        raise RuntimeError(f"process {accelerator.process_index} tried to write {what}: only the main process writes")


# ----------------------------------------------------------------------------------------------
# Randomness of one step.


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for the (t, r) and class-dropout draws of `step` on process `rank`
    (CPU, so that the draws are the same on every device type)."""
    return torch.Generator().manual_seed(keyed_seed(_STEP_RNG, seed, step, rank))


def draw_w_pi(seed: int, step: int, w_max: float) -> float:
    """Stage-2 guidance scale w_pi ~ U(1, w_max) of `step`, the same on every process."""
    u = torch.rand([], generator=torch.Generator().manual_seed(keyed_seed(_W_PI, seed, step)), dtype=torch.float64)
    return 1.0 + (w_max - 1.0) * float(u)


@dataclasses.dataclass
class StepInputs:
    """Everything random that enters one step on one process, drawn already."""

    x: torch.Tensor  # [B, C, H, W] teacher endpoints
    noise: torch.Tensor  # [B, C, H, W] their coupled noise
    labels: torch.Tensor  # [B] int64, class-dropped (-1 = null)
    t: torch.Tensor  # [B]
    r: torch.Tensor  # [B]
    w_pi: float  # stage-2 guidance scale (1.0 in stage 1), the same on every process
    kept_fraction: float = 1.0  # of the coupling windows the batch came from (logged only)


def draw_step(config: dict[str, Any], batch: dict[str, Any], step: int, rank: int, device) -> StepInputs:
    """The random draws of `step` on the process of global rank `rank` for a `CouplingStream` batch.

    (t, r) (`sample_t_r` with config["time_sampler"]) and class dropout come from
    `step_generator(seed, step, rank)`, w_pi from `draw_w_pi(seed, step, w_max)` (stage 2); the
    global torch RNG (e.g. dropout layers) is re-seeded with a (seed, step, rank) key. `rank`
    must be the global rank: the local rank repeats on every node, which would give the
    processes of different nodes the same draws.
    """
    seed = config["seed"]
    torch.manual_seed(keyed_seed(_GLOBAL_RNG, seed, step, rank))
    gen = step_generator(seed, step, rank)
    x = batch["x"].to(device)
    t, r = sample_t_r(x.shape[0], gen, device=device, **config["time_sampler"])
    labels = drop_labels(batch["label"], config["class_dropout"], gen).to(device)
    w_pi = draw_w_pi(seed, step, config["w_max"]) if config["stage"] == 2 else 1.0
    return StepInputs(x=x, noise=batch["noise"].to(device), labels=labels, t=t, r=r, w_pi=w_pi,
                      kept_fraction=float(batch["kept_fraction"]))


# ----------------------------------------------------------------------------------------------
# Configuration and checkpoints.


def _time_sampler_keys() -> set[str]:
    return set(inspect.signature(sample_t_r).parameters) - {"batch", "generator", "device"}


def hyperparameters(
    *,
    stage: int,
    batch_size: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    ema_decay: float,
    grad_clip: float | None,
    class_dropout: float,
    w_max: float | None,
    time_sampler: dict[str, Any],
    p: float,
    c: float,
    jvp: str,
    seed: int,
    compile: str | None = None,
) -> dict[str, Any]:
    """The checked settings of the optimisation itself (see `train_meanflow`), as plain JSON
    values: what `build_trainer`, `draw_step` and `train_step` read."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    require_int("batch_size", batch_size, 1)
    if stage == 2 and (w_max is None or not w_max >= 1):
        raise ValueError(f"stage 2 needs w_max >= 1 (the CFG scale is drawn from U(1, w_max)), got {w_max!r}")
    if stage == 1 and w_max is not None:
        raise ValueError("w_max is a stage-2 setting (stage 1 trains without guidance, w = w_pi = 1)")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    if not 0 <= class_dropout < 1:
        raise ValueError(f"class_dropout must lie in [0, 1), got {class_dropout!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
    unknown = set(time_sampler) - _time_sampler_keys()
    if unknown:
        raise ValueError(f"time_sampler: unknown keys {sorted(unknown)}; known: {sorted(_time_sampler_keys())}")
    accel.check_loss_settings(jvp, compile)
    return json.loads(json.dumps(dict(
        stage=stage, batch_size=batch_size, lr=lr, betas=list(betas), eps=eps, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, class_dropout=class_dropout, w_max=w_max,
        time_sampler=dict(time_sampler), p=p, c=c, jvp=jvp, seed=seed, compile=compile,
    )))


def _check_layout(config: dict[str, Any], world: int) -> None:
    """What the number of processes must satisfy (checked again when resuming under another)."""
    if config["batch_size"] % world:
        raise ValueError(f"batch_size {config['batch_size']} is the global batch and must be divisible by the number "
                         f"of processes ({world})")
    if config["jvp"] == "forward-fused" and world > 1:
        raise ValueError("jvp='forward-fused' runs torch.func.jvp on the model, which cannot go through DDP; "
                         "use 'forward' (or 'autograd') with several processes")


def _checkpoint_paths(work_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in work_dir, newest first."""
    found = [(int(m.group(1)), p) for p in work_dir.glob("ckpt-*.pt") if (m := _CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _remove_stale_temporaries(work_dir: Path) -> None:
    """A checkpoint write killed mid-way leaves `atomic_path`'s hidden temporary; drop them."""
    for p in work_dir.glob(".ckpt-*.pt.tmp*"):
        p.unlink(missing_ok=True)


def _newest_checkpoint(work_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that loads, and its content; unreadable ones are skipped with a warning."""
    for _, path in _checkpoint_paths(work_dir):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file raises many types; an older checkpoint will do
            warnings.warn(f"{path}: unreadable checkpoint skipped ({type(e).__name__}: {e})")
            continue
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            return path, obj
        warnings.warn(f"{path}: not a training checkpoint (format {CHECKPOINT_FORMAT!r} expected); skipped")
    return None, None


def _find_resume_checkpoint(accelerator: Accelerator, work_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The main process picks the checkpoint, so that every process resumes the same one."""
    path, obj = _newest_checkpoint(work_dir) if accelerator.is_main_process else (None, None)
    picked = broadcast_object_list([None if path is None else str(path)])[0]
    if picked is None:
        return None, None
    if obj is None:
        obj = torch.load(picked, map_location="cpu", weights_only=True)
    return Path(picked), obj


def _config_diff(obj: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Hyperparameters (and init/coupling identity) that differ between a checkpoint and this run.
    The layout (number of processes) may differ: `_open_stream` handles that."""
    saved = {k: v for k, v in obj["config"].items() if k not in _LAYOUT_CONFIG_KEYS}
    if json_sha256(saved) == json_sha256(config):
        return []
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}" for k in diff_keys(saved, config)]


def _check_resumable(path: Path, obj: dict[str, Any], config: dict[str, Any], iterations: int) -> None:
    """Refuse a checkpoint made with other hyperparameters (named), or past the end of this run."""
    diff = _config_diff(obj, config)
    if diff:
        raise ValueError(
            f"{path}: this work_dir was trained with different settings ({'; '.join(diff)}); refusing to resume. "
            "Use another work_dir (or delete this one) to start over."
        )
    if obj["step"] > iterations:
        raise ValueError(f"{path}: checkpoint at step {obj['step']} is past iterations={iterations}")


def _archive_stale_work_dir(accelerator: Accelerator, work_dir: Path, obj: dict[str, Any], diff: list[str]) -> None:
    """Move a work_dir made with other settings aside (never deleted: its checkpoints and snapshots
    stay auditable) so that this run starts fresh. Used by the workflow, where a rerun with changed
    inputs or parameters is Snakemake's decision, not a resume."""
    stale = work_dir.with_name(f"{work_dir.name}.stale-{str(obj.get('config_hash', 'unknown'))[:12]}")
    if accelerator.is_main_process:
        if stale.exists():
            shutil.rmtree(stale)
        work_dir.rename(stale)
        work_dir.mkdir(parents=True)
        log.warning("%s was trained with other settings (%s): moved to %s, starting fresh",
                    work_dir, "; ".join(diff), stale)
    accelerator.wait_for_everyone()


def _prune_checkpoints(work_dir: Path, keep: int) -> None:
    for _, path in _checkpoint_paths(work_dir)[keep:]:
        path.unlink(missing_ok=True)


def _open_stream(reader: CouplingReader, config: dict[str, Any], accelerator: Accelerator,
                 ckpt_path: Path | None, ckpt: dict[str, Any] | None) -> CouplingStream:
    """This process's coupling stream: fresh, at its saved position, or -- when the checkpoint
    was written by another number of processes -- at the start of the first epoch no saved rank
    had started (module docstring, "Resuming under another number of processes")."""
    world, rank = accelerator.num_processes, accelerator.process_index
    kw = dict(batch_size=config["batch_size"] // world, rank=rank, world_size=world, seed=config["seed"],
              window_chunks=config["window_chunks"])
    if ckpt is None:
        return CouplingStream(reader, **kw)
    saved = ckpt["streams"]
    if len(saved) == world:
        return CouplingStream(reader, **kw, state=saved[rank])
    stream = CouplingStream(reader, **kw, relayout=saved)
    if accelerator.is_main_process:
        log.warning(
            "%s: saved by %d process(es), resumed by %d. Model, EMA, optimiser and step %d carry over exactly and the "
            "global batch stays %d (%d per process); the coupling stream cannot continue bit-exactly under another "
            "layout, so every process starts at epoch %d (saved ranks were at epochs %s): the couplings not yet drawn "
            "from the epochs in progress are skipped and the run is no longer bit-identical to an uninterrupted one.",
            ckpt_path, len(saved), world, ckpt["step"], config["batch_size"], config["batch_size"] // world,
            first_unstarted_epoch(saved), [s["epoch"] for s in saved],
        )
    return stream


# ----------------------------------------------------------------------------------------------
# Metrics.


class _Metrics:
    """Per-step rows; a live CSV copy in work_dir (appended every step, rank 0 only).

    The rows up to a checkpoint are stored *in* that checkpoint, so a resume never depends on
    what a killed process managed to append: the live CSV is rewritten from them, dropping any
    rows past the resumed step.
    """

    def __init__(self, path: Path, rows: list[list[float]], enabled: bool):
        self.path, self.rows, self.enabled = path, rows, enabled
        self._file = None
        if enabled:
            _write_csv(path, rows)
            self._file = open(path, "a", newline="")
            self._writer = csv.writer(self._file)

    def append(self, row: dict[str, float]) -> None:
        values = [row[k] for k in METRICS_COLUMNS]
        self.rows.append(values)
        if self._file is not None:
            self._writer.writerow(_csv_values(values))
            self._file.flush()

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.float64).reshape(-1, len(METRICS_COLUMNS))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _csv_values(values: list[float]) -> list[Any]:
    return [int(values[0]), *(float(v) for v in values[1:])]  # repr of a float round-trips exactly


def _write_csv(path: Path, rows: list[list[float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_COLUMNS)
        writer.writerows(_csv_values(r) for r in rows)


# ----------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass
class Trainer:
    """What one optimiser step works on (one per process)."""

    accelerator: Accelerator
    net: networks.Precond  # unwrapped
    model: torch.nn.Module  # what accelerate prepared (a DDP wrapper under several processes)
    ema: networks.Precond
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    config: dict[str, Any]  # `hyperparameters` (plus anything else of the run)

    @functools.cached_property
    def loss_fn(self):
        """The MeanFlow loss of this trainer (`accel.meanflow_loss_fn`): u through `model` (DDP
        all-reduces its gradient), the torch.func.jvp tangent of jvp="forward" through the
        unwrapped `net`, compiled with the `compile` backend (None: eager). Built on first use,
        from this trainer's own fields (a `dataclasses.replace` copy builds its own)."""
        return accel.meanflow_loss_fn(self.net, jvp=self.config["jvp"], backend=self.config["compile"],
                                      model_fn=self.model, tangent_fn=self.net)


def build_trainer(accelerator: Accelerator, net: networks.Precond, ema: networks.Precond,
                  config: dict[str, Any]) -> Trainer:
    """Train mode with `FROZEN` excluded, Adam (config lr/betas/eps/weight_decay), the EMA in
    float32 on the device, and the net and optimiser prepared by accelerate (DDP when launched)."""
    params = _prepare_for_training(net)
    ema = ema.to(accelerator.device, torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=config["lr"], betas=tuple(config["betas"]), eps=config["eps"],
                                 weight_decay=config["weight_decay"])
    model, optimizer = accelerator.prepare(net, optimizer)
    return Trainer(accelerator=accelerator, net=accelerator.unwrap_model(model), model=model, ema=ema,
                   optimizer=optimizer, params=params, config=config)


def train_step(trainer: Trainer, inputs: StepInputs, step: int, *, fail: bool = False) -> dict[str, float]:
    """One optimiser step on this process's share of the batch; returns the step's metrics
    (every column of METRICS_COLUMNS but samples_per_s, averaged over processes where they differ).

    Raises NonFiniteError on a NaN/inf loss or gradient norm, on every process alike. `fail` is a
    TESTING HOOK that makes the loss NaN.
    """
    cfg, acc = trainer.config, trainer.accelerator
    w = cfg_weights(inputs.w_pi)[0] if cfg["stage"] == 2 else 1.0

    trainer.net.normalize_weights_()  # forced weight normalisation (EDM2 Eq. 47), outside the forward
    # Mixed precision: `accelerator.prepare` made the net's own forward autocast with float32
    # outputs, so both the wrapped model and its module run in bf16 while the loss arithmetic
    # (x_t, targets, adaptive weight) stays in float32 (`Trainer.loss_fn` adds no autocast).
    terms = trainer.loss_fn(inputs.x, inputs.noise, inputs.labels, inputs.t, inputs.r, w=w, w_pi=inputs.w_pi,
                            p=cfg["p"], c=cfg["c"])
    loss = terms.loss * float("nan") if fail else terms.loss

    # One collective for everything logged; every process sees the same values and so takes the
    # same branch below (a process raising alone would leave the others hanging in backward).
    kept = torch.tensor(inputs.kept_fraction, device=acc.device)
    loss_v, mse_v, kept_v = acc.reduce(
        torch.stack([loss.detach().float(), terms.mse.float(), kept]), reduction="mean"
    ).tolist()
    if not math.isfinite(loss_v):
        raise NonFiniteError(f"non-finite loss ({loss_v}) at step {step}")

    trainer.optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    if cfg["grad_clip"] is not None:
        grad_norm = acc.clip_grad_norm_(trainer.params, cfg["grad_clip"])  # returns the pre-clip norm
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.params if p.grad is not None])
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) at step {step}")
    trainer.optimizer.step()
    update_ema(trainer.ema, trainer.net, cfg["ema_decay"])
    return dict(step=step, loss=loss_v, mse=mse_v, w_pi=inputs.w_pi, lr=trainer.optimizer.param_groups[0]["lr"],
                grad_norm=grad_norm, kept_fraction=kept_v)


# ----------------------------------------------------------------------------------------------
# Files (main process only).


def _ema_meta(trainer: Trainer, step: int) -> dict[str, Any]:
    cfg = trainer.config
    return dict(stage=cfg["stage"], step=step, seed=cfg["seed"], ema_decay=cfg["ema_decay"],
                config_hash=json_sha256(cfg), num_processes=trainer.accelerator.num_processes)


def _save_checkpoint(trainer: Trainer, stream: CouplingStream, work_dir: Path, step: int, metrics: _Metrics,
                     keep: int) -> None:
    """Checkpoint `step` (rank 0 writes; every process contributes its stream position)."""
    acc, cfg = trainer.accelerator, trainer.config
    streams = gather_object([stream.state_dict()])  # collective: all processes call it
    if acc.is_main_process:
        path = work_dir / f"ckpt-{step:08d}.pt"
        ckpt = dict(
            format=CHECKPOINT_FORMAT, step=step, config=cfg, config_hash=json_sha256(cfg),
            num_processes=acc.num_processes, model=_state_dict_cpu(trainer.net), ema=_state_dict_cpu(trainer.ema),
            optimizer=trainer.optimizer.state_dict(), streams=streams, metrics=metrics.tensor(),
        )
        checkpoints.atomic_torch_save(ckpt, path)
        _prune_checkpoints(work_dir, keep)
    acc.wait_for_everyone()


def snapshot_path(work_dir, step: int) -> Path:
    """Where `train_meanflow(snapshot_every=...)` keeps the EMA net of `step`."""
    return Path(work_dir) / SNAPSHOT_DIR / f"ema-step-{step:08d}.pt"


def _save_snapshot(trainer: Trainer, work_dir: Path, step: int, encoder: dict) -> None:
    """The EMA net of `step` in `save_net` format (atomic; a rerun of the step rewrites it identically)."""
    path = snapshot_path(work_dir, step)
    _require_main(trainer.accelerator, path)
    checkpoints.save_net(path, trainer.ema, encoder, meta=_ema_meta(trainer, step))


def _write_outputs(trainer: Trainer, out_dir: Path, step: int, metrics: _Metrics, encoder: dict) -> dict[str, str]:
    """train_state.pt (the stage-2 init format), net_ema.pt (save_net format), metrics.csv."""
    paths = {name: out_dir / name for name in ("train_state.pt", "net_ema.pt", "metrics.csv")}
    _require_main(trainer.accelerator, out_dir)
    cfg = trainer.config
    _write_csv(paths["metrics.csv"], metrics.rows)
    checkpoints.save_net(paths["net_ema.pt"], trainer.ema, encoder, meta=_ema_meta(trainer, step))
    checkpoints.atomic_torch_save(
        dict(format=TRAIN_STATE_FORMAT, stage=cfg["stage"], step=step, config=cfg, config_hash=json_sha256(cfg),
             num_processes=trainer.accelerator.num_processes, init_kwargs=dict(trainer.net.init_kwargs),
             encoder=encoder, model=_state_dict_cpu(trainer.net), ema=_state_dict_cpu(trainer.ema)),
        paths["train_state.pt"],
    )
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------------------
# The loop.


def _check_data_fits_net(reader: CouplingReader, net: networks.Precond, init) -> None:
    m = reader.manifest
    expected = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(m["shape"]) != expected:
        raise ValueError(f"{reader.manifest_path}: couplings are {m['shape']} but the net in {init} expects {expected}")
    if m["num_classes"] > net.label_dim:
        raise ValueError(f"{reader.manifest_path}: {m['num_classes']} classes but the net in {init} has "
                         f"label_dim {net.label_dim}")


def train_meanflow(
    *,
    manifest,
    init,
    out_dir,
    work_dir,
    stage: int,
    iterations: int,
    batch_size: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ema_decay: float = 0.9999,
    grad_clip: float | None = None,
    class_dropout: float = 0.1,
    w_max: float | None = None,
    time_sampler: dict[str, Any] | None = None,
    p: float = 0.5,
    c: float = 1e-2,
    jvp: str = "tangent",
    compile: str | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    snapshot_every: int | None = None,
    seed: int = 0,
    window_chunks: int = 4,
    expected_fingerprint: dict[str, Any] | None = None,
    mixed_precision: str = "auto",
    progress: bool = True,
    on_stale_work_dir: str = "refuse",
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Train for exactly `iterations` steps in total (resuming from work_dir); see the module docstring.

    manifest: coupling manifest (`couplings.merge_shards`). init: stage 1, a `checkpoints.save_net`
    file; stage 2, stage 1's `out_dir/train_state.pt`. batch_size: the global batch. time_sampler:
    keyword arguments of `meanflow.sample_t_r` (a, p_mean, p_std, high_t, high_r, ratio_r_neq_t,
    ...). p, c: adaptive loss weight; jvp: `meanflow.jvp_t` mode. compile: torch.compile backend
    of the loss ("inductor"; None: eager), forward, tangent and backward as graphs; the first step
    compiles, and compiled steps round differently from eager ones, so it is part of the
    configuration hash. grad_clip: max gradient norm
    (paper: stage 2 1.0, stage 1 None). mixed_precision "auto": bf16 on CUDA, none on the CPU.
    expected_fingerprint: keys the couplings' fingerprint must have (e.g. the teacher checksum).

    work_dir holds `ckpt-<step>.pt` every `checkpoint_every` steps and at the end (the newest
    `keep_checkpoints` are kept) and a live `metrics.csv`. On start the newest loadable checkpoint
    is resumed if its configuration hash equals this run's; otherwise a ValueError names the
    differing settings (on_stale_work_dir="refuse", the default for library use) or the stale
    work_dir is moved to `<work_dir>.stale-<hash>` and training starts fresh ("archive", what the
    workflow passes: Snakemake reruns a job only when its inputs or parameters changed). The hash covers everything that shapes the trajectory: the hyperparameters,
    seed, window_chunks, resolved mixed precision, the init file's sha256 and the coupling set
    (fingerprint/index hash, count, truncation threshold) -- not `iterations` (a finished run can be
    extended), checkpointing, snapshots, progress, the testing hook, nor the number of processes (a
    checkpoint resumes under another one; module docstring). snapshot_every N (None: off): the EMA
    net of every step divisible by N goes to `snapshot_path(work_dir, step)`, `save_net` format with
    meta stage, step, seed, ema_decay, config_hash, num_processes; never pruned.

    Outputs, written only after the last step, atomically, by the main process: out_dir/
    `train_state.pt` (model, EMA, step, config), `net_ema.pt` (the EMA net, `save_net` format,
    meta as for snapshots) and `metrics.csv` (one row per step 1..iterations: METRICS_COLUMNS).
    A NaN/inf loss or gradient norm raises NonFiniteError naming the step; out_dir is untouched
    and work_dir keeps the last good checkpoint. `fail_at_step` is a TESTING HOOK: it makes the
    loss NaN at that step.

    Returns a summary: steps, resumed_from, seconds, seconds_per_step, final_loss (mean of the
    last 10% of steps), world_size, paths (main process; other processes get paths = {}).
    """
    if on_stale_work_dir not in ("refuse", "archive"):
        raise ValueError(f"on_stale_work_dir must be 'refuse' or 'archive', got {on_stale_work_dir!r}")
    accelerator = make_accelerator(mixed_precision)
    world = accelerator.num_processes
    hyper = hyperparameters(
        stage=stage, batch_size=batch_size, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, class_dropout=class_dropout, w_max=w_max,
        time_sampler=dict(time_sampler or {}), p=p, c=c, jvp=jvp, seed=seed, compile=compile,
    )
    _check_layout(hyper, world)
    for name, value in (("iterations", iterations), ("checkpoint_every", checkpoint_every),
                        ("keep_checkpoints", keep_checkpoints)):
        require_int(name, value, 1)
    if snapshot_every is not None:
        require_int("snapshot_every", snapshot_every, 1)
    out_dir, work_dir = Path(out_dir), Path(work_dir)

    reader = open_couplings(manifest)
    if expected_fingerprint is not None:
        check_fingerprint_subset(reader, expected_fingerprint)  # before anything expensive
    start = _load_start(init, stage)
    _check_data_fits_net(reader, start.net, init)
    config = dict(
        hyper, window_chunks=window_chunks, mixed_precision=accelerator.mixed_precision, init_sha256=sha256_file(init),
        couplings=dict(fingerprint_hash=reader.manifest["fingerprint_hash"], index_hash=reader.manifest["index_hash"],
                       total=reader.total, threshold=reader.threshold),
    )

    if accelerator.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(work_dir)
    ckpt_path, ckpt = _find_resume_checkpoint(accelerator, work_dir)
    if ckpt is not None and on_stale_work_dir == "archive" and (diff := _config_diff(ckpt, config)):
        _archive_stale_work_dir(accelerator, work_dir, ckpt, diff)
        ckpt_path, ckpt = None, None
    if ckpt is not None:
        _check_resumable(ckpt_path, ckpt, config, iterations)
        start.net.load_state_dict(ckpt["model"])
        start.ema.load_state_dict(ckpt["ema"])
    resumed_from = int(ckpt["step"]) if ckpt is not None else None
    stream = _open_stream(reader, config, accelerator, ckpt_path, ckpt)

    trainer = build_trainer(accelerator, start.net, start.ema, config)
    if ckpt is not None:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    metrics = _Metrics(work_dir / "metrics.csv", ckpt["metrics"].tolist() if ckpt is not None else [],
                       enabled=accelerator.is_main_process)

    first = (resumed_from or 0) + 1
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=iterations, initial=first - 1, desc=f"re-meanflow stage {stage}", unit="step",
                    disable=not (progress and accelerator.is_main_process))
    try:
        for step in range(first, iterations + 1):
            started = time.perf_counter()
            inputs = draw_step(config, next(stream), step, accelerator.process_index, accelerator.device)
            row = train_step(trainer, inputs, step, fail=step == fail_at_step)
            row["samples_per_s"] = batch_size / (time.perf_counter() - started)
            metrics.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if step % checkpoint_every == 0 or step == iterations:
                _save_checkpoint(trainer, stream, work_dir, step, metrics, keep_checkpoints)
            if snapshot_every is not None and step % snapshot_every == 0 and accelerator.is_main_process:
                _save_snapshot(trainer, work_dir, step, start.encoder)
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - t0

    paths: dict[str, str] = {}
    if accelerator.is_main_process:
        paths = _write_outputs(trainer, out_dir, iterations, metrics, start.encoder)
    accelerator.wait_for_everyone()
    steps_run = iterations - first + 1
    return dict(
        stage=stage, steps=iterations, steps_run=steps_run, resumed_from=resumed_from, seconds=seconds,
        seconds_per_step=seconds / steps_run if steps_run else None,
        final_loss=tail_mean([r[1] for r in metrics.rows]), world_size=world, rank=accelerator.process_index,
        paths=paths,
    )


if __name__ == "__main__":  # one rank of `launch.launch_module("remeanflow.train", spec, N)`
    import sys

    from .launch import read_spec

    spec = read_spec(sys.argv)
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    train_meanflow(**spec)
