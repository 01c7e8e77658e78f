"""Re-MeanFlow training: the MeanFlow objective on rectified couplings, stage 1 and stage 2.

Re-MeanFlow (arXiv 2511.23342, section 4; DESIGN §3 "MeanFlow loss", "Training") retrains an
EDM2 teacher, whose t/r time embeddings were fitted first (`time_embedding`), as a one-step
average-velocity model u(x_t, t, r | c):

* stage 1: target v_hat = v (w = w_pi = 1), no gradient clipping;
* stage 2: starts from stage 1's model and EMA, draws one guidance scale w_pi ~ U(1, w_max) per
  step, (w, k) = `cfg_weights(w_pi)`, the CFG target of MeanFlow §4.2, grad-norm clip 1.0.

Both: Adam (paper: lr 1e-4, betas (0.9, 0.99), no weight decay), EMA of the weights with decay
0.9999 per step, class dropout 0.1 to the null class, the adaptive loss weight of MeanFlow §4.3.

Determinism and resume. Every random draw of step s on process (rank) r comes from generators
keyed by (seed, s, r) -- (t, r) from `sample_t_r`, class dropout from `drop_labels`, and any
global-RNG use such as dropout layers -- except w_pi, keyed by (seed, s) so that all processes
use the same guidance scale. The data order is the position of `loader.CouplingStream`. A
checkpoint therefore only needs weights, EMA, optimiser, step and stream positions, and a run
killed at any time and restarted from its newest checkpoint reproduces the uninterrupted run bit
for bit (on the CPU, where kernels are deterministic).

Processes. Built on `accelerate.Accelerator`: a plain single process when not launched; under
`accelerate launch` with W processes `batch_size` is the GLOBAL batch (W must divide it) and each
process draws batch_size / W couplings from its own share of the chunks. The DDP-wrapped model is
the `model_fn` of the loss (so gradients are all-reduced) and its unwrapped module the
`tangent_fn` of the forward-mode JVP (DESIGN §3 "JVP": `torch.func.jvp` cannot go through DDP).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import tqdm
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from . import checkpoints, networks
from .fileio import atomic_path, json_sha256, sha256_file
from .couplings import CouplingReader, _diff_keys, _require_int, open_couplings
from .loader import CouplingStream, check_fingerprint_subset, keyed_seed
from .meanflow import JVP_MODES, cfg_weights, drop_labels, meanflow_loss_terms, sample_t_r

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
# Randomness of one step.


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for the (t, r) and class-dropout draws of `step` on process `rank`
    (CPU, so that the draws are the same on every device type)."""
    return torch.Generator().manual_seed(keyed_seed(_STEP_RNG, seed, step, rank))


def draw_w_pi(seed: int, step: int, w_max: float) -> float:
    """Stage-2 guidance scale w_pi ~ U(1, w_max) of `step`, the same on every process."""
    u = torch.rand([], generator=torch.Generator().manual_seed(keyed_seed(_W_PI, seed, step)), dtype=torch.float64)
    return 1.0 + (w_max - 1.0) * float(u)


# ----------------------------------------------------------------------------------------------
# Configuration and checkpoints.


def _time_sampler_keys() -> set[str]:
    return set(inspect.signature(sample_t_r).parameters) - {"batch", "generator", "device"}


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


def _check_resumable(path: Path, obj: dict[str, Any], config: dict[str, Any], iterations: int) -> None:
    """Refuse a checkpoint made with other hyperparameters (named), or past the end of this run."""
    if obj["config_hash"] != json_sha256(config):
        saved = obj["config"]
        diff = [f"{k}: {saved.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}"
                for k in _diff_keys(saved, config)]
        raise ValueError(
            f"{path}: this work_dir was trained with different settings ({'; '.join(diff)}); refusing to resume. "
            "Use another work_dir (or delete this one) to start over."
        )
    if obj["step"] > iterations:
        raise ValueError(f"{path}: checkpoint at step {obj['step']} is past iterations={iterations}")


def _prune_checkpoints(work_dir: Path, keep: int) -> None:
    for _, path in _checkpoint_paths(work_dir)[keep:]:
        path.unlink(missing_ok=True)


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


def _tail_mean(values: list[float]) -> float | None:
    """Mean over the last 10% of steps: one batch's loss is too noisy to summarise a run."""
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail) if tail else None


# ----------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Run:
    accelerator: Accelerator
    net: networks.Precond  # unwrapped
    model: torch.nn.Module  # what accelerate prepared (a DDP wrapper under several processes)
    ema: networks.Precond
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    stream: CouplingStream
    config: dict[str, Any]
    loss_kw: dict[str, Any]


def _train_step(run: _Run, step: int, fail_at_step: int | None) -> dict[str, float]:
    """One optimiser step; returns its metrics row. Raises NonFiniteError on NaN/inf."""
    cfg, acc = run.config, run.accelerator
    rank, device = acc.process_index, acc.device
    start = time.perf_counter()
    torch.manual_seed(keyed_seed(_GLOBAL_RNG, cfg["seed"], step, rank))  # e.g. dropout layers
    gen = step_generator(cfg["seed"], step, rank)

    batch = next(run.stream)
    x, noise = batch["x"].to(device), batch["noise"].to(device)
    t, r = sample_t_r(x.shape[0], gen, device=device, **cfg["time_sampler"])
    labels = drop_labels(batch["label"], cfg["class_dropout"], gen).to(device)
    w_pi = draw_w_pi(cfg["seed"], step, cfg["w_max"]) if cfg["stage"] == 2 else 1.0
    w = cfg_weights(w_pi)[0] if cfg["stage"] == 2 else 1.0

    run.net.normalize_weights_()  # forced weight normalisation (EDM2 Eq. 47), outside the forward
    # Mixed precision: `accelerator.prepare` made the net's own forward autocast with float32
    # outputs, so both the wrapped model and its module run in bf16 while the loss arithmetic
    # (x_t, targets, adaptive weight) stays in float32.
    terms = meanflow_loss_terms(
        None, x, noise, labels, t, r, w=w, w_pi=w_pi, model_fn=run.model, tangent_fn=run.net, **run.loss_kw
    )
    loss = terms.loss
    if step == fail_at_step:
        loss = loss * float("nan")  # testing hook: a non-finite loss at this step

    # One collective for everything logged; every process sees the same values and so takes the
    # same branch below (a process raising alone would leave the others hanging in backward).
    loss_v, mse_v, kept_v = acc.reduce(
        torch.stack([loss.detach().float(), terms.mse.float(), torch.tensor(batch["kept_fraction"], device=device)]),
        reduction="mean",
    ).tolist()
    if not math.isfinite(loss_v):
        raise NonFiniteError(f"non-finite loss ({loss_v}) at step {step}")

    run.optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    if cfg["grad_clip"] is not None:
        grad_norm = acc.clip_grad_norm_(run.params, cfg["grad_clip"])  # returns the pre-clip norm
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) at step {step}")
    run.optimizer.step()
    update_ema(run.ema, run.net, cfg["ema_decay"])

    seconds = time.perf_counter() - start
    return dict(step=step, loss=loss_v, mse=mse_v, w_pi=w_pi, lr=run.optimizer.param_groups[0]["lr"],
                grad_norm=grad_norm, samples_per_s=cfg["batch_size"] / seconds, kept_fraction=kept_v)


def _save_checkpoint(run: _Run, work_dir: Path, step: int, metrics: _Metrics, keep: int) -> None:
    """Checkpoint `step` (rank 0 writes; every process contributes its stream position)."""
    streams = gather_object([run.stream.state_dict()])  # collective: all processes call it
    if run.accelerator.is_main_process:
        ckpt = dict(
            format=CHECKPOINT_FORMAT, step=step, config=run.config, config_hash=json_sha256(run.config),
            model=_state_dict_cpu(run.net), ema=_state_dict_cpu(run.ema), optimizer=run.optimizer.state_dict(),
            streams=streams, metrics=metrics.tensor(),
        )
        checkpoints.atomic_torch_save(ckpt, work_dir / f"ckpt-{step:08d}.pt")
        _prune_checkpoints(work_dir, keep)
    run.accelerator.wait_for_everyone()


def _write_outputs(run: _Run, out_dir: Path, step: int, metrics: _Metrics, encoder: dict) -> dict[str, str]:
    """train_state.pt (the stage-2 init format), net_ema.pt (save_net format), metrics.csv."""
    paths = {name: out_dir / name for name in ("train_state.pt", "net_ema.pt", "metrics.csv")}
    cfg = run.config
    _write_csv(paths["metrics.csv"], metrics.rows)
    checkpoints.save_net(paths["net_ema.pt"], run.ema, encoder,
                         meta=dict(stage=cfg["stage"], step=step, seed=cfg["seed"], ema_decay=cfg["ema_decay"],
                                   config_hash=json_sha256(cfg)))
    checkpoints.atomic_torch_save(
        dict(format=TRAIN_STATE_FORMAT, stage=cfg["stage"], step=step, config=cfg, config_hash=json_sha256(cfg),
             init_kwargs=dict(run.net.init_kwargs), encoder=encoder,
             model=_state_dict_cpu(run.net), ema=_state_dict_cpu(run.ema)),
        paths["train_state.pt"],
    )
    return {k: str(v) for k, v in paths.items()}


def _validate(stage, iterations, batch_size, world, w_max, grad_clip, class_dropout, ema_decay, time_sampler, jvp,
              checkpoint_every, keep_checkpoints) -> None:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    for name, value in (("iterations", iterations), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every), ("keep_checkpoints", keep_checkpoints)):
        _require_int(name, value, 1)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the number of "
                         f"processes ({world})")
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
    if jvp not in JVP_MODES:
        raise ValueError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
    if jvp == "forward-fused" and world > 1:
        raise ValueError("jvp='forward-fused' runs torch.func.jvp on the model, which cannot go through DDP; "
                         "use 'forward' (or 'autograd') with several processes")


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
    jvp: str = "forward",
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    seed: int = 0,
    window_chunks: int = 4,
    expected_fingerprint: dict[str, Any] | None = None,
    mixed_precision: str = "auto",
    progress: bool = True,
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Train for exactly `iterations` steps in total (resuming from work_dir); see the module docstring.

    manifest: coupling manifest (`couplings.merge_shards`). init: stage 1, a `checkpoints.save_net`
    file; stage 2, stage 1's `out_dir/train_state.pt`. batch_size: the global batch. time_sampler:
    keyword arguments of `meanflow.sample_t_r` (a, p_mean, p_std, high_t, high_r, ratio_r_neq_t,
    ...). p, c: adaptive loss weight; jvp: `meanflow.jvp_t` mode. grad_clip: max gradient norm
    (paper: stage 2 1.0, stage 1 None). mixed_precision "auto": bf16 on CUDA, none on the CPU.
    expected_fingerprint: keys the couplings' fingerprint must have (e.g. the teacher checksum).

    work_dir holds `ckpt-<step>.pt` every `checkpoint_every` steps and at the end (the newest
    `keep_checkpoints` are kept) and a live `metrics.csv`. On start the newest loadable checkpoint
    is resumed if its configuration hash equals this run's; otherwise a ValueError names the
    differing settings. The hash covers everything that shapes the trajectory: the hyperparameters,
    seed, window_chunks, resolved mixed precision, number of processes, the init file's sha256 and
    the coupling set (fingerprint/index hash, count, truncation threshold) -- not `iterations` (a
    finished run can be extended), checkpointing, progress or the testing hook.

    Outputs, written only after the last step, atomically, by the main process: out_dir/
    `train_state.pt` (model, EMA, step, config), `net_ema.pt` (the EMA net, `save_net` format,
    meta stage/step/seed) and `metrics.csv` (one row per step 1..iterations: METRICS_COLUMNS).
    A NaN/inf loss or gradient norm raises NonFiniteError naming the step; out_dir is untouched
    and work_dir keeps the last good checkpoint. `fail_at_step` is a TESTING HOOK: it makes the
    loss NaN at that step.

    Returns a summary: steps, resumed_from, seconds, seconds_per_step, final_loss (mean of the
    last 10% of steps), world_size, paths (main process; other processes get paths = {}).
    """
    time_sampler = dict(time_sampler or {})
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    _validate(stage, iterations, batch_size, world, w_max, grad_clip, class_dropout, ema_decay, time_sampler, jvp,
              checkpoint_every, keep_checkpoints)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    reader = open_couplings(manifest)
    if expected_fingerprint is not None:
        check_fingerprint_subset(reader, expected_fingerprint)  # before anything expensive
    start = _load_start(init, stage)
    _check_data_fits_net(reader, start.net, init)
    config = json.loads(json.dumps(dict(
        stage=stage, batch_size=batch_size, lr=lr, betas=list(betas), eps=eps, weight_decay=weight_decay,
        ema_decay=ema_decay, grad_clip=grad_clip, class_dropout=class_dropout, w_max=w_max, time_sampler=time_sampler,
        p=p, c=c, jvp=jvp, seed=seed, window_chunks=window_chunks, mixed_precision=mixed_precision,
        num_processes=world, init_sha256=sha256_file(init),
        couplings=dict(fingerprint_hash=reader.manifest["fingerprint_hash"], index_hash=reader.manifest["index_hash"],
                       total=reader.total, threshold=reader.threshold),
    )))

    if accelerator.is_main_process:
        _remove_stale_temporaries(work_dir)
    ckpt_path, ckpt = _find_resume_checkpoint(accelerator, work_dir)
    if ckpt is not None:
        _check_resumable(ckpt_path, ckpt, config, iterations)
        start.net.load_state_dict(ckpt["model"])
        start.ema.load_state_dict(ckpt["ema"])
    resumed_from = int(ckpt["step"]) if ckpt is not None else None
    stream = CouplingStream(reader, batch_size=batch_size // world, rank=rank, world_size=world, seed=seed,
                            window_chunks=window_chunks, state=ckpt["streams"][rank] if ckpt is not None else None)

    params = _prepare_for_training(start.net)
    ema = start.ema.to(accelerator.device, torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(start.net, optimizer)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    run = _Run(accelerator=accelerator, net=accelerator.unwrap_model(model), model=model, ema=ema,
               optimizer=optimizer, params=params, stream=stream, config=config, loss_kw=dict(p=p, c=c, jvp=jvp))
    metrics = _Metrics(work_dir / "metrics.csv", ckpt["metrics"].tolist() if ckpt is not None else [],
                       enabled=accelerator.is_main_process)

    first = (resumed_from or 0) + 1
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=iterations, initial=first - 1, desc=f"re-meanflow stage {stage}", unit="step",
                    disable=not (progress and accelerator.is_main_process))
    try:
        for step in range(first, iterations + 1):
            row = _train_step(run, step, fail_at_step)
            metrics.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if step % checkpoint_every == 0 or step == iterations:
                _save_checkpoint(run, work_dir, step, metrics, keep_checkpoints)
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - t0

    paths: dict[str, str] = {}
    if accelerator.is_main_process:
        paths = _write_outputs(run, out_dir, iterations, metrics, start.encoder)
    accelerator.wait_for_everyone()
    steps_run = iterations - first + 1
    return dict(
        stage=stage, steps=iterations, steps_run=steps_run, resumed_from=resumed_from, seconds=seconds,
        seconds_per_step=seconds / steps_run if steps_run else None,
        final_loss=_tail_mean([r[1] for r in metrics.rows]), world_size=world, rank=rank, paths=paths,
    )



if __name__ == "__main__":  # one rank of `launch.launch_module("remeanflow.train", spec, N)`
    import sys

    from .launch import read_spec

    spec = read_spec(sys.argv)
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    train_meanflow(**spec)
