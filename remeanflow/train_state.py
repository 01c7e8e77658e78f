"""What a Re-MeanFlow training run starts from and what it writes (the loop is in `train`).

Start (`load_start`). Stage 1 starts from a `checkpoints.save_net` file (the teacher with fitted
t/r embeddings); stage 2 from stage 1's `train_state.pt` (its model and EMA, and with
`train.carry_optimizer` its Adam state, `carry_optimizer`). The couplings must fit that net
(`check_data_fits_net`).

Checkpoints. work_dir holds `ckpt-<step>.pt` (CHECKPOINT_FORMAT: weights, EMA, optimiser, step,
every process's coupling-stream position, the metrics rows so far, the configuration and its
hash), of which the newest `keep` are kept. Every random draw of a step is keyed by (seed, step,
rank) and the data order is the stream position, so this is all a resume needs
(`find_resume_checkpoint`, `check_resumable`); a checkpoint that does not load or does not match
its content digest (`checkpoints.verify_content`) is skipped with a warning for the newest one
that does. A checkpoint made with other settings is refused
with the differing settings named (`config_diff`), or its work_dir moved aside
(`archive_stale_work_dir`). The layout (number of processes) is not part of that comparison: a
checkpoint resumes under another one (`loader.open_stream`).

Snapshots. With `snapshot_every` N, the EMA net at every step divisible by N is kept as
work_dir/snapshots/ema-step-XXXXXXXX.pt (`snapshot_path`; `checkpoints.save_net` format, never
pruned), so that intermediate points of a run can be evaluated later.

Outputs (`write_outputs`): out_dir/train_state.pt (TRAIN_STATE_FORMAT, the stage-2 init, with
the optimiser state since stage 2 can carry it; older files without it load all the same),
net_ema.pt (`save_net` format) and metrics.csv (METRICS_COLUMNS; a live copy in work_dir is
`Metrics`). Only the main process writes files (`_require_main`). Every .pt file is written by
`checkpoints.atomic_torch_save`: canonical, so that a resumed run writes the same bytes as an
uninterrupted one, and with a content digest that every load checks.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from . import checkpoints, networks
from .coupling_set import CouplingReader
from .fileio import atomic_path, json_sha256
from .loader import CouplingStream
from .misc import diff_keys

if TYPE_CHECKING:
    from .train import Trainer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "remeanflow.train-checkpoint/1"
TRAIN_STATE_FORMAT = "remeanflow.train-state/1"
METRICS_COLUMNS = ("step", "loss", "mse", "w_pi", "lr", "grad_norm", "samples_per_s", "kept_fraction")
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
SNAPSHOT_DIR = "snapshots"
# Settings recorded with a run that say how it was laid out over processes, not what it computes:
# a checkpoint made under another layout may resume (module docstring). Older checkpoints kept
# the number of processes inside their configuration.
_LAYOUT_CONFIG_KEYS = ("num_processes",)
REDO_STAGE1 = ("Delete it and rerun stage 1 (snakemake --forcerun train_stage1; it resumes from its newest "
               "verified checkpoint).")


# ----------------------------------------------------------------------------------------------
# Start.


@dataclasses.dataclass
class Start:
    """What a run starts from: the net to train, its EMA, and what describes them."""

    net: networks.Precond
    ema: networks.Precond
    encoder: dict[str, Any]
    source: str  # "net" (stage 1: a project net checkpoint) or "train_state" (stage 2)
    optimizer: dict[str, Any] | None = None  # stage 2: stage 1's final Adam state_dict, where saved


def load_start(init, stage: int) -> Start:
    """Stage 1: a `checkpoints.save_net` file (the teacher with fitted t/r embeddings); the EMA
    starts as a copy of it. Stage 2: a stage-1 `train_state.pt`; training continues from its
    model and its EMA, and `optimizer` holds its Adam state (None in files written before it was
    saved) for `carry_optimizer`."""
    if stage == 1:
        loaded = checkpoints.load_net(init)
        net, encoder = loaded["net"], loaded["encoder"]
        return Start(net=net, ema=copy.deepcopy(net), encoder=encoder, source="net")
    obj = checkpoints.torch_load(init)
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{init}: not a Re-MeanFlow train_state.pt (format {TRAIN_STATE_FORMAT!r} expected); "
                         "stage 2 starts from stage 1's out_dir/train_state.pt")
    checkpoints.verify_content(init, obj, REDO_STAGE1)
    net, ema = (_net_from_state(init, obj["init_kwargs"], obj[key], key) for key in ("model", "ema"))
    return Start(net=net, ema=ema, encoder=obj["encoder"], source="train_state", optimizer=obj.get("optimizer"))


def carry_optimizer(optimizer: torch.optim.Optimizer, start: Start, init) -> None:
    """Continue stage 1's Adam in stage 2 (`train.carry_optimizer`): its per-parameter state
    (exp_avg, exp_avg_sq, step) from stage 1's train_state.pt, under the hyperparameters
    `optimizer` was built with (lr, betas, eps, weight decay of this stage's settings).

    The official code runs both stages in one process with one Adam, so its stage 2 starts with
    stage 1's moments and bias-correction step count; the paper's numbers come from that.
    `torch.optim.Optimizer.load_state_dict` would also restore the saved hyperparameters, so the
    saved param_groups are replaced by this optimiser's own (same parameter order: same net).
    """
    saved = start.optimizer
    if saved is None:
        raise ValueError(f"config key train.carry_optimizer is true but {init} holds no optimiser state (written "
                         "before train_state.pt kept it): rerun stage 1, or set train.carry_optimizer: false")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved["param_groups"], groups)):
        raise ValueError(f"{init}: its optimiser state has {[len(g['params']) for g in saved['param_groups']]} "
                         f"parameters per group, this stage's Adam {[len(g['params']) for g in groups]}; "
                         "cannot carry it (config key train.carry_optimizer)")
    for ids, params in zip((g["params"] for g in saved["param_groups"]), (g["params"] for g in groups)):
        for i, param in zip(ids, params):
            state = saved["state"].get(i, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state and tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"{init}: optimiser state {name} of parameter {i} has shape "
                                     f"{tuple(state[name].shape)}, the parameter {tuple(param.shape)}; cannot carry "
                                     "it (config key train.carry_optimizer)")
    own = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({
        "state": saved["state"],
        "param_groups": [dict(mine, params=list(theirs["params"])) for mine, theirs in zip(own, saved["param_groups"])],
    })


def _net_from_state(path, init_kwargs: dict, state_dict: dict, what: str) -> networks.Precond:
    net = networks.Precond(**init_kwargs)
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: '{what}' does not match init_kwargs (missing {missing}, unexpected {unexpected})")
    return net


def check_data_fits_net(reader: CouplingReader, net: networks.Precond, init) -> None:
    """Refuse couplings of another image shape, or with more classes than the net knows."""
    m = reader.manifest
    expected = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(m["shape"]) != expected:
        raise ValueError(f"{reader.manifest_path}: couplings are {m['shape']} but the net in {init} expects {expected}")
    if m["num_classes"] > net.label_dim:
        raise ValueError(f"{reader.manifest_path}: {m['num_classes']} classes but the net in {init} has "
                         f"label_dim {net.label_dim}")


# ----------------------------------------------------------------------------------------------
# Finding, resuming, archiving and pruning checkpoints.


def _checkpoint_paths(work_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in work_dir, newest first."""
    found = [(int(m.group(1)), p) for p in work_dir.glob("ckpt-*.pt") if (m := _CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def remove_stale_temporaries(work_dir: Path) -> None:
    """A checkpoint write killed mid-way leaves `atomic_path`'s hidden temporary; drop them."""
    for p in work_dir.glob(".ckpt-*.pt.tmp*"):
        p.unlink(missing_ok=True)


def _newest_checkpoint(work_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that loads and matches its content digest, and its content;
    unreadable, damaged and unverifiable ones are skipped with a warning in the log (the rule's
    log file, where a user looks; an older one will do)."""
    for _, path in _checkpoint_paths(work_dir):
        try:
            obj = checkpoints.torch_load(path)
        except Exception as e:  # a damaged file raises many types; an older checkpoint will do
            log.warning("%s: unreadable checkpoint skipped (%s: %s)", path, type(e).__name__, e)
            continue
        if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
            log.warning("%s: not a training checkpoint (format %r expected); skipped", path, CHECKPOINT_FORMAT)
            continue
        try:
            return path, checkpoints.verify_content(path, obj, "Skipped: resuming from an older verified checkpoint, "
                                                    "or from the start if there is none.")
        except checkpoints.ContentDigestError as e:
            log.warning("%s", e)
    return None, None


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint the main process picked, verified again by this process (it reads its own copy)."""
    return checkpoints.verify_content(path, checkpoints.torch_load(path), "Delete it and rerun to resume from an "
                                      "older checkpoint.")


def find_resume_checkpoint(accelerator: Accelerator, work_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The main process picks the checkpoint, so that every process resumes the same one."""
    path, obj = _newest_checkpoint(work_dir) if accelerator.is_main_process else (None, None)
    picked = broadcast_object_list([None if path is None else str(path)])[0]
    if picked is None:
        return None, None
    if obj is None:
        obj = _load_checkpoint(Path(picked))
    return Path(picked), obj


def config_diff(obj: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Hyperparameters (and init/coupling identity) that differ between a checkpoint and this run.
    The layout (number of processes) may differ: `loader.open_stream` handles that."""
    saved = {k: v for k, v in obj["config"].items() if k not in _LAYOUT_CONFIG_KEYS}
    if json_sha256(saved) == json_sha256(config):
        return []
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}" for k in diff_keys(saved, config)]


def check_resumable(path: Path, obj: dict[str, Any], config: dict[str, Any], iterations: int) -> None:
    """Refuse a checkpoint made with other hyperparameters (named), or past the end of this run."""
    diff = config_diff(obj, config)
    if diff:
        raise ValueError(
            f"{path}: this work_dir was trained with different settings ({'; '.join(diff)}); refusing to resume. "
            "Use another work_dir (or delete this one) to start over."
        )
    if obj["step"] > iterations:
        raise ValueError(f"{path}: checkpoint at step {obj['step']} is past iterations={iterations}")


def archive_stale_work_dir(accelerator: Accelerator, work_dir: Path, obj: dict[str, Any], diff: list[str]) -> None:
    """Move a work_dir made with other settings aside (never deleted: its checkpoints and snapshots
    stay auditable) so that this run starts fresh. Used by the workflow, where a rerun with changed
    inputs or parameters is Snakemake's decision, not a resume."""
    # the step keeps two archives of one configuration apart (e.g. iterations lowered twice)
    stale = work_dir.with_name(f"{work_dir.name}.stale-{str(obj.get('config_hash', 'unknown'))[:12]}"
                               f"-step{int(obj['step']):08d}")
    if accelerator.is_main_process:
        if stale.exists():  # the very same checkpoint archived before: nothing of it would be lost
            shutil.rmtree(stale)
        work_dir.rename(stale)
        work_dir.mkdir(parents=True)
        log.warning("%s was trained with other settings or past this run's end (%s): moved to %s, starting fresh",
                    work_dir, "; ".join(diff), stale)
    accelerator.wait_for_everyone()


def _prune_checkpoints(work_dir: Path, keep: int) -> None:
    for _, path in _checkpoint_paths(work_dir)[keep:]:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Metrics.


class Metrics:
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
# Files (main process only).


def _require_main(accelerator: Accelerator, what: object) -> None:
    """Every file of a run is written by the main process; another rank writing is a bug (two
    processes renaming onto one path can leave either's file, or a mix of checkpoint parts)."""
    if not accelerator.is_main_process:
        raise RuntimeError(f"process {accelerator.process_index} tried to write {what}: only the main process writes")


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _optimizer_state_cpu(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state_dict with its tensors copied to the CPU (a train_state.pt loads anywhere)."""
    sd = optimizer.state_dict()
    state = {i: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return dict(sd, state=state)


def _ema_meta(trainer: Trainer, step: int) -> dict[str, Any]:
    cfg = trainer.config
    return dict(stage=cfg["stage"], step=step, seed=cfg["seed"], ema_decay=cfg["ema_decay"],
                config_hash=json_sha256(cfg), num_processes=trainer.accelerator.num_processes)


def save_checkpoint(trainer: Trainer, stream: CouplingStream, work_dir: Path, step: int, metrics: Metrics,
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
    """Where `train.train_meanflow(snapshot_every=...)` keeps the EMA net of `step`."""
    return Path(work_dir) / SNAPSHOT_DIR / f"ema-step-{step:08d}.pt"


def save_snapshot(trainer: Trainer, work_dir: Path, step: int, encoder: dict) -> None:
    """The EMA net of `step` in `save_net` format (atomic; a rerun of the step rewrites it identically)."""
    path = snapshot_path(work_dir, step)
    _require_main(trainer.accelerator, path)
    checkpoints.save_net(path, trainer.ema, encoder, meta=_ema_meta(trainer, step))


def write_outputs(trainer: Trainer, out_dir: Path, step: int, metrics: Metrics, encoder: dict) -> dict[str, str]:
    """train_state.pt (the stage-2 init format, with the optimiser state), net_ema.pt (save_net
    format), metrics.csv."""
    paths = {name: out_dir / name for name in ("train_state.pt", "net_ema.pt", "metrics.csv")}
    _require_main(trainer.accelerator, out_dir)
    cfg = trainer.config
    _write_csv(paths["metrics.csv"], metrics.rows)
    checkpoints.save_net(paths["net_ema.pt"], trainer.ema, encoder, meta=_ema_meta(trainer, step))
    checkpoints.atomic_torch_save(
        dict(format=TRAIN_STATE_FORMAT, stage=cfg["stage"], step=step, config=cfg, config_hash=json_sha256(cfg),
             num_processes=trainer.accelerator.num_processes, init_kwargs=dict(trainer.net.init_kwargs),
             encoder=encoder, model=_state_dict_cpu(trainer.net), ema=_state_dict_cpu(trainer.ema),
             optimizer=_optimizer_state_cpu(trainer.optimizer)),
        paths["train_state.pt"],
    )
    return {k: str(v) for k, v in paths.items()}
