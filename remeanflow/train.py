"""Re-MeanFlow training: the MeanFlow objective on rectified couplings, stage 1 and stage 2.

Re-MeanFlow (arXiv 2511.23342, section 4; docs/method.md, "MeanFlow loss" and "Training")
retrains an EDM2 teacher, whose t/r time embeddings were fitted first (`time_embedding`), as a
one-step average-velocity model u(x_t, t, r | c):

* stage 1: target v_hat = v (w = w_pi = 1), no gradient clipping;
* stage 2: starts from stage 1's model and EMA (and Adam state, `train.carry_optimizer`), draws
  one guidance scale w_pi ~ U(1, w_max) per step, (w, k) = `cfg_weights(w_pi)`, the CFG target of
  MeanFlow §4.2 (null-class rows: `train.null_target`), grad-norm clip 1.0.

Both: Adam (paper: lr 1e-4, betas (0.9, 0.99), no weight decay), EMA of the weights with decay
0.9999 per step, class dropout 0.1 to the null class, the adaptive loss weight of MeanFlow §4.3.

This module holds the loop (`train_meanflow`) and one step (`draw_step`, `train_step`); what a
run starts from and what it writes -- checkpoints, resume, snapshots, outputs, metrics -- is in
`train_state`, each process's coupling stream in `loader`.

Determinism and resume. Every random draw of step s on the process of GLOBAL rank r
(`accelerator.process_index`, unique across nodes; the local rank repeats on every node) comes
from generators keyed by (seed, s, r) -- (t, r) from `sample_t_r`, class dropout from
`misc.drop_labels`, and any global-RNG use such as dropout layers -- except w_pi, keyed by (seed, s)
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
`tangent_fn` of the forward-mode JVP (docs/method.md, "JVP": `torch.func.jvp` cannot go through
DDP; calling the unwrapped module for u as well would silently skip the all-reduce). Equal
per-rank batches make the average of the per-rank mean losses the mean over the global batch,
so W processes x B couplings take the same step as one process x W·B (`train_step`). Only the
main process writes files.

Resuming under another number of processes. Model, EMA, optimiser, step and metrics carry over
exactly and the global batch stays `batch_size` (refused if W_new does not divide it); the
coupling stream cannot continue bit-exactly and restarts at the first epoch no saved rank had
started (`loader.open_stream`, "Another layout" in `loader`). A warning says so; the run is from
then on no longer bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import tqdm
from accelerate import Accelerator

from . import data_stream, networks, tracking, train_loss, train_state
from .coupling_set import open_couplings
from .fileio import sha256_file
from .loader import check_fingerprint_subset, keyed_seed, open_stream
from .meanflow import cfg_weights, sample_t_r
from .misc import drop_labels, require_int, tail_mean
from .settings import TrainSettings, build

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "bf16")
# Parameters that do not enter u(x_t, t, r | c): the teacher's ln(sigma)/4 embedding (replaced by
# emb_noise_t/emb_noise_r) and EDM2's log-variance head (a diffusion-loss weight). They are frozen:
# they get no gradient, and DDP would otherwise wait forever for their all-reduce. (Forced weight
# normalisation still projects them onto the unit-RMS sphere, which changes no function value.)
FROZEN = ("unet.emb_noise.weight", "logvar_linear.weight")
# Purposes of the keyed generators (see loader.keyed_seed).
_STEP_RNG, _GLOBAL_RNG, _W_PI = 11, 12, 13


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; nothing was written to the output folder."""


# ----------------------------------------------------------------------------------------------
# Models.


def prepare_for_training(net: networks.Precond) -> list[torch.nn.Parameter]:
    """Train mode; every parameter trainable except `FROZEN`; returns the trainable ones."""
    net.train()
    for name, param in net.named_parameters():
        param.requires_grad_(name not in FROZEN)
    return [p for p in net.parameters() if p.requires_grad]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay · theta_ema + (1 - decay) · theta, in float32 (buffers are copied).

    One fused `torch._foreach_lerp_` over all parameters and one `_foreach_copy_` over the
    buffers: a per-tensor loop launched ~200 small kernels per step on a GPU. The arithmetic is
    `lerp_`'s, bit-identical to the loop (tests/test_step_overhead.py)."""
    ema_params, params = list(ema.parameters()), list(net.parameters())  # no_grad: no detach needed
    ema_buffers, buffers = list(ema.buffers()), list(net.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError(f"EMA and net differ in structure: {len(ema_params)} vs {len(params)} parameters, "
                         f"{len(ema_buffers)} vs {len(buffers)} buffers")
    params = [p if p.dtype == q.dtype else p.to(q.dtype) for p, q in zip(params, ema_params)]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1 - decay)
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)


# ----------------------------------------------------------------------------------------------
# Processes.


def make_accelerator(mixed_precision: str = "auto", trackers: tuple[str, ...] = (), logging_dir=None) -> Accelerator:
    """The Accelerator of one training process: a single process, or one rank of a launched run.

    mixed_precision: "auto" (bf16 on CUDA, none on the CPU), "no" or "bf16". `cpu=True` where
    there is no GPU: without it accelerate ignores the launcher's process group on a GPU-less
    machine and every launched process trains alone as "process 0 of 1" (each writing the same
    outputs). The launcher's WORLD_SIZE is checked against what accelerate set up, so that such a
    silent split is an error. `trackers` (accelerate's names) log under `logging_dir`.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=list(trackers) or None, project_dir=logging_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes}: "
            "each process would train alone on the whole run; check the launcher (`accelerate launch --multi_gpu` "
            "or torchrun) and the accelerate configuration it applies"
        )
    return accelerator


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
    labels: torch.Tensor  # [B] int64, class-dropped (-1 = null), on the host (or one-hot rows [B, label_dim])
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
    x = to_device(batch["x"], device)
    t, r = (to_device(v, device) for v in sample_t_r(x.shape[0], gen, device="cpu", **config["time_sampler"]))
    # Labels stay on the host: `queue_step` turns them into one-hot rows there, where one_hot's
    # range check costs no device sync.
    labels = drop_labels(batch["label"], config["class_dropout"], gen)
    w_pi = draw_w_pi(seed, step, config["w_max"]) if config["stage"] == 2 else 1.0
    return StepInputs(x=x, noise=to_device(batch["noise"], device), labels=labels, t=t, r=r, w_pi=w_pi,
                      kept_fraction=float(batch["kept_fraction"]))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: a plain copy from pageable memory to a GPU
    waits for everything queued on the stream, so CUDA copies go through pinned memory,
    non-blocking (the caching host allocator keeps the pinned block until the copy is done).
    Other devices: a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Configuration.


def hyperparameters(settings: TrainSettings, stage: int, seed: int) -> dict[str, Any]:
    """The settings of one stage's optimisation as plain JSON values: what `build_trainer`,
    `draw_step` and `train_step` read, and what a checkpoint's configuration hash covers. The
    settings' own bounds were checked when they were built; the jvp/compile pairing here."""
    own = settings.stage(stage)
    train_loss.check_loss_settings(settings.jvp, settings.compile)
    # Settings that only act in stage 2 stay out of stage 1's configuration, so that they neither
    # change its checkpoints' hash nor make a finished stage 1 look stale.
    stage2_only = dict(null_target=settings.null_target, carry_optimizer=settings.carry_optimizer) if stage == 2 else {}
    return dict(
        stage=stage, batch_size=settings.batch_size, lr=settings.lr, betas=list(settings.betas), eps=settings.eps,
        weight_decay=settings.weight_decay, ema_decay=settings.ema_decay, grad_clip=own.grad_clip,
        class_dropout=settings.class_dropout, w_max=own.w_max, time_sampler=settings.time_sampler.to_dict(),
        p=settings.p, c=settings.c, jvp=settings.jvp, seed=seed, compile=settings.compile, **stage2_only,
    )


def check_layout(config: dict[str, Any], world: int) -> None:
    """What the number of processes must satisfy (checked again when resuming under another)."""
    if config["batch_size"] % world:
        raise ValueError(f"batch_size {config['batch_size']} is the global batch and must be divisible by the number "
                         f"of processes ({world})")
    if config["jvp"] == "forward-fused" and world > 1:
        raise ValueError("jvp='forward-fused' runs torch.func.jvp on the model, which cannot go through DDP; "
                         "use 'forward' (or 'autograd') with several processes")
    if config.get("compile") is not None and world > 1:
        # The compiled loss would trace the DDP wrapper's forward, which Dynamo cannot capture.
        raise ValueError(f"train.compile={config['compile']!r} with {world} processes: torch.compile cannot trace "
                         "the DDP-wrapped model inside the loss; train several processes eagerly (train.compile: "
                         "null) or one process compiled")


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
        """The MeanFlow loss of this trainer (`train_loss.meanflow_loss_fn`): u through `model` (DDP
        all-reduces its gradient), the torch.func.jvp tangent of jvp="forward" through the
        unwrapped `net`, compiled with the `compile` backend (None: eager). Built on first use,
        from this trainer's own fields (a `dataclasses.replace` copy builds its own)."""
        return train_loss.meanflow_loss_fn(self.net, jvp=self.config["jvp"], backend=self.config["compile"],
                                      model_fn=self.model, tangent_fn=self.net,
                                      null_target=self.config.get("null_target", "official"))


def build_trainer(accelerator: Accelerator, net: networks.Precond, ema: networks.Precond,
                  config: dict[str, Any]) -> Trainer:
    """Train mode with `FROZEN` excluded, Adam (config lr/betas/eps/weight_decay), the EMA in
    float32 on the device, and the net and optimiser prepared by accelerate (DDP when launched)."""
    params = prepare_for_training(net)
    ema = ema.to(accelerator.device, torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=config["lr"], betas=tuple(config["betas"]), eps=config["eps"],
                                 weight_decay=config["weight_decay"])
    model, optimizer = accelerator.prepare(net, optimizer)
    return Trainer(accelerator=accelerator, net=accelerator.unwrap_model(model), model=model, ema=ema,
                   optimizer=optimizer, params=params, config=config)


@dataclasses.dataclass
class PendingMetrics:
    """The metrics of a queued step, still on the device: reading them (`read_metrics`) waits for
    the step to finish, so the loop reads them only after the next step is queued."""

    step: int
    reduced: torch.Tensor  # [3]: loss, mse, kept_fraction, averaged over processes
    grad_norm: torch.Tensor  # 0-dim, before clipping
    w_pi: float
    lr: float


def queue_step(trainer: Trainer, inputs: StepInputs, step: int, *, fail: bool = False) -> PendingMetrics:
    """One optimiser step on this process's share of the batch, queued without reading anything
    back to the host (on a GPU the CPU runs ahead and queues the next step while this one runs).

    A NaN/inf loss or gradient norm is only seen by `read_metrics`, after the optimiser step: the
    caller must read a step's metrics before anything of that step is saved (`train_meanflow` does).
    `fail` is a TESTING HOOK that makes the loss NaN.
    """
    cfg, acc = trainer.config, trainer.accelerator
    w = cfg_weights(inputs.w_pi)[0] if cfg["stage"] == 2 else 1.0
    labels = inputs.labels
    if labels is not None and not labels.dtype.is_floating_point:
        labels = networks.one_hot(labels, trainer.net.label_dim)  # once per step, on the host (`draw_step`)
    labels = to_device(labels, acc.device) if labels is not None else None

    trainer.net.normalize_weights_()  # forced weight normalisation (EDM2 Eq. 47), outside the forward
    # Mixed precision: `accelerator.prepare` made the net's own forward autocast with float32
    # outputs, so both the wrapped model and its module run in bf16 while the loss arithmetic
    # (x_t, targets, adaptive weight) stays in float32 (`Trainer.loss_fn` adds no autocast).
    terms = trainer.loss_fn(inputs.x, inputs.noise, labels, inputs.t, inputs.r, w=w, w_pi=inputs.w_pi,
                            p=cfg["p"], c=cfg["c"])
    loss = terms.loss * float("nan") if fail else terms.loss

    # One collective for everything logged; every process reads the same values and so raises
    # alike in `read_metrics`. torch.full, not torch.tensor: a filled scalar needs no host copy.
    kept = torch.full([], inputs.kept_fraction, dtype=torch.float32, device=acc.device)
    reduced = acc.reduce(torch.stack([loss.detach().float(), terms.mse.float(), kept]), reduction="mean")

    trainer.optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    if cfg["grad_clip"] is not None:
        grad_norm = acc.clip_grad_norm_(trainer.params, cfg["grad_clip"])  # returns the pre-clip norm
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.params if p.grad is not None])
    trainer.optimizer.step()
    update_ema(trainer.ema, trainer.net, cfg["ema_decay"])
    return PendingMetrics(step=step, reduced=reduced, grad_norm=grad_norm.detach(), w_pi=inputs.w_pi,
                          lr=trainer.optimizer.param_groups[0]["lr"])


def read_metrics(pending: PendingMetrics) -> dict[str, float]:
    """A queued step's metrics as floats (every column of `train_state.METRICS_COLUMNS` but
    samples_per_s); waits for that step. Raises NonFiniteError on a NaN/inf loss or gradient norm,
    on every process alike (the values are the all-reduced ones)."""
    loss_v, mse_v, kept_v = pending.reduced.tolist()
    if not math.isfinite(loss_v):
        raise NonFiniteError(f"non-finite loss ({loss_v}) at step {pending.step}")
    grad_norm = float(pending.grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) at step {pending.step}")
    return {"step": pending.step, "loss": loss_v, "mse": mse_v, "w_pi": pending.w_pi, "lr": pending.lr,
            "grad_norm": grad_norm, "kept_fraction": kept_v}


def train_step(trainer: Trainer, inputs: StepInputs, step: int, *, fail: bool = False) -> dict[str, float]:
    """One optimiser step and its metrics, read at once (`queue_step` + `read_metrics`; the loop
    reads them one step late instead). Raises NonFiniteError on a NaN/inf loss or gradient norm."""
    return read_metrics(queue_step(trainer, inputs, step, fail=fail))


# ----------------------------------------------------------------------------------------------
# The loop.


def train_meanflow(
    settings: TrainSettings,  # the `train` config section: both stages' settings
    *,
    stage: int,  # 1 (plain target) or 2 (CFG target); its own settings are settings.stage(stage)
    manifest,  # coupling manifest (`coupling_set.merge_shards`); unused with settings.source "data"
    init,  # stage 1: a `checkpoints.save_net` file; stage 2: stage 1's out_dir/train_state.pt
    out_dir,  # where the outputs go, written only after the last step
    work_dir,  # checkpoints, snapshots and the live metrics.csv; resumed from
    seed: int = 0,  # keys every random draw (`draw_step`) and the coupling order
    expected_fingerprint: dict[str, Any] | None = None,  # keys the couplings' fingerprint must have
    keep_checkpoints: int = 2,  # newest checkpoints kept in work_dir
    mixed_precision: str = "auto",  # "auto": bf16 on CUDA, none on the CPU; "no"; "bf16"
    progress: bool = True,  # tqdm bar on the main process
    on_stale_work_dir: str = "refuse",  # "refuse" or "archive" a work_dir made with other settings
    fail_at_step: int | None = None,  # TESTING HOOK: the loss becomes NaN at this step
    images=None,  # settings.source "data" only: the image store it reads (`data_stream`)
) -> dict[str, Any]:
    """Train stage `stage` for exactly `settings.stage(stage).iterations` steps in total, resuming
    from work_dir; see the module docstring.

    work_dir holds `ckpt-<step>.pt` every `checkpoint_every` steps and at the end (the newest
    `keep_checkpoints` are kept) and a live `metrics.csv` (`train_state`). On start the newest
    checkpoint that loads and matches its content digest is resumed if its configuration hash
    equals this run's; otherwise a ValueError names the differing settings
    (on_stale_work_dir="refuse", the default for library use) or the stale work_dir is moved to
    `<work_dir>.stale-<hash>` and training starts fresh ("archive", what the workflow passes:
    Snakemake reruns a job only when its inputs or parameters changed). The hash covers
    everything that shapes the trajectory: `hyperparameters`, window_chunks, resolved mixed
    precision, the init file's sha256 and the coupling set (fingerprint/index hash, count,
    truncation threshold) -- not `iterations` (a finished run can be extended), checkpointing,
    snapshots, progress, the testing hook, nor the number of processes (a checkpoint resumes
    under another one; module docstring). With `snapshot_every` N the EMA net
    of every step divisible by N goes to `train_state.snapshot_path(work_dir, step)`, never pruned.

    Outputs, written only after the last step, atomically, by the main process: out_dir/
    `train_state.pt` (model, EMA, step, config), `net_ema.pt` (the EMA net, `save_net` format) and
    `metrics.csv` (one row per step 1..iterations: `train_state.METRICS_COLUMNS`). A NaN/inf loss
    or gradient norm raises NonFiniteError naming the step; out_dir is untouched and work_dir keeps
    the last good checkpoint.

    Returns a summary: steps, resumed_from, seconds, seconds_per_step, final_loss (mean of the
    last 10% of steps), world_size, paths (main process; other processes get paths = {}).
    """
    if on_stale_work_dir not in ("refuse", "archive"):
        raise ValueError(f"on_stale_work_dir must be 'refuse' or 'archive', got {on_stale_work_dir!r}")
    accelerator = make_accelerator(mixed_precision, settings.trackers, Path(work_dir) / "trackers")
    world = accelerator.num_processes
    hyper = hyperparameters(settings, stage, seed)
    check_layout(hyper, world)
    require_int("keep_checkpoints", keep_checkpoints, 1)
    iterations, batch_size = settings.stage(stage).iterations, settings.batch_size
    checkpoint_every, snapshot_every = settings.checkpoint_every, settings.snapshot_every
    out_dir, work_dir = Path(out_dir), Path(work_dir)

    # The one difference of the data-trained baseline (ablations): images with fresh noise, no
    # truncation and no coupling fingerprint, through a stream with the coupling stream's interface.
    data = settings.source == "data"
    reader = data_stream.open_images(images) if data else open_couplings(manifest)
    if expected_fingerprint is not None and not data:
        check_fingerprint_subset(reader, expected_fingerprint)  # before anything expensive
    start = train_state.load_start(init, stage)
    train_state.check_data_fits_net(reader, start.net, init)
    config = dict(
        hyper, window_chunks=settings.window_chunks, mixed_precision=accelerator.mixed_precision, init_sha256=sha256_file(init),
        couplings=reader.identity() if data else dict(
            fingerprint_hash=reader.manifest["fingerprint_hash"], index_hash=reader.manifest["index_hash"],
            total=reader.total, threshold=reader.threshold),
    )

    if accelerator.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        train_state.remove_stale_temporaries(work_dir)
    ckpt_path, ckpt = train_state.find_resume_checkpoint(accelerator, work_dir)
    if ckpt is not None and on_stale_work_dir == "archive":
        diff = train_state.config_diff(ckpt, config)
        if ckpt["step"] > iterations:  # a lowered `iterations`: its run is not a prefix of this one
            diff.append(f"iterations lowered to {iterations}, below the checkpoint's step {ckpt['step']}")
        if diff:
            train_state.archive_stale_work_dir(accelerator, work_dir, ckpt, diff)
            ckpt_path, ckpt = None, None
    if ckpt is not None:
        train_state.check_resumable(ckpt_path, ckpt, config, iterations)
        start.net.load_state_dict(ckpt["model"])
        start.ema.load_state_dict(ckpt["ema"])
    resumed_from = int(ckpt["step"]) if ckpt is not None else None
    if accelerator.is_main_process:
        if resumed_from is None:
            log.info("stage %d: training from the start for %d steps (work folder %s)", stage, iterations, work_dir)
        else:
            log.info("stage %d: resuming from %s at step %d of %d", stage, ckpt_path, resumed_from, iterations)
    open_batches = data_stream.open_stream if data else open_stream
    stream = open_batches(reader, batch_size=config["batch_size"], seed=config["seed"],
                         window_chunks=config["window_chunks"], rank=accelerator.process_index, world=world,
                         saved_streams=ckpt["streams"] if ckpt is not None else None, ckpt_path=ckpt_path,
                         step=ckpt["step"] if ckpt is not None else None)

    trainer = build_trainer(accelerator, start.net, start.ema, config)
    if ckpt is not None:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])  # a carried state went on inside it
    elif config.get("carry_optimizer"):
        train_state.carry_optimizer(trainer.optimizer, start, init)
    metrics = train_state.Metrics(work_dir / "metrics.csv", ckpt["metrics"].tolist() if ckpt is not None else [],
                                  enabled=accelerator.is_main_process)
    if settings.trackers:
        tracking.start(accelerator, stage, config)

    first = (resumed_from or 0) + 1
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=iterations, initial=first - 1, desc=f"re-meanflow stage {stage}", unit="step",
                    disable=not (progress and accelerator.is_main_process))

    def record(pending: PendingMetrics, seconds: float) -> None:
        row = read_metrics(pending)  # raises NonFiniteError
        row["samples_per_s"] = batch_size / seconds
        metrics.append(row)
        accelerator.log(row, step=pending.step)  # a no-op without trackers
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

    # A step's metrics are read one step late, once the next step is queued (reading waits for the
    # device), and at once on a step that saves anything, so that no NaN step is ever saved.
    pending, pending_started = None, 0.0
    try:
        for step in range(first, iterations + 1):
            started = time.perf_counter()
            inputs = draw_step(config, next(stream), step, accelerator.process_index, accelerator.device)
            queued = queue_step(trainer, inputs, step, fail=step == fail_at_step)
            if pending is not None:
                record(pending, started - pending_started)
            pending, pending_started = queued, started
            snapshot = snapshot_every is not None and step % snapshot_every == 0
            if step % checkpoint_every == 0 or step == iterations or snapshot:
                record(pending, time.perf_counter() - started)
                pending = None
            if step % checkpoint_every == 0 or step == iterations:
                train_state.save_checkpoint(trainer, stream, work_dir, step, metrics, keep_checkpoints)
            if snapshot_every is not None and step % snapshot_every == 0 and accelerator.is_main_process:
                train_state.save_snapshot(trainer, work_dir, step, start.encoder)
                if settings.trackers:
                    tracking.log_grid(accelerator, trainer.ema, step)
    finally:
        bar.close()
        metrics.close()
        tracking.finish(accelerator)
        if hasattr(stream, "close"):  # a window still being prefetched is waited for, not left running
            stream.close()
    seconds = time.perf_counter() - t0

    paths: dict[str, str] = {}
    if accelerator.is_main_process:
        paths = train_state.write_outputs(trainer, out_dir, iterations, metrics, start.encoder)
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

    from .launch import end_rank, read_spec

    spec = read_spec(sys.argv)
    train_meanflow(build(TrainSettings, spec.pop("settings")), **spec)  # ends in a barrier after the outputs
    end_rank()
