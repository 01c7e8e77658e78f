"""One rank of the multi-process tests in test_ddp.py (real gloo process groups on the CPU).

Usage: python ddp_worker.py SPEC.json, started by `accelerate launch` (launch.accelerate_command)
or by the test itself as the processes of two simulated one-process nodes (RANK, WORLD_SIZE,
LOCAL_RANK=0, MASTER_ADDR/PORT set as torchrun sets them on each node). SPEC keys:

* record: folder for this rank's records, `rank<R>.json` (and `grads.rank<R>.pt`);
* grads: {"init": net.pt, "batch": B, "jvp": [modes]} -- the gradient-synchronisation checks, for
  each JVP mode: one step through a trainer whose model is the unwrapped module (the trap: no
  all-reduce), then the same step and a second one through the real (DDP-wrapped) trainer, each
  rank on its slice of `global_inputs` (recorded in `grads.rank<R>.<mode>.pt`);
* train: keyword arguments of `train.train_meanflow`, run after the grads checks;
* audit: folders in which every file-system write of this process is recorded;
* entry: keyword arguments as for `train`, run instead through the ranks' real entry point,
  `python -m remeanflow.train <spec>` (`run_entry_point`); nothing else runs then.

The records hold what the loop drew at every step (by wrapping `train.draw_step`), the writes
seen by `WriteAudit`, the process's rank as accelerate sees it and the launcher's environment.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import RUN_KEYS, hyperparameters, run_meanflow, train_settings  # noqa: E402

# The trainer of the grads checks: stage 2 (the CFG target's extra forwards go through the
# model too), no clipping (a clip would apply to each rank's own norm in the trap step).
HYPER = dict(stage=2, batch_size=8, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, ema_decay=0.9,
             grad_clip=None, class_dropout=0.1, w_max=3.0, time_sampler={"ratio_r_neq_t": 0.5}, p=0.5, c=1e-2,
             jvp="tangent", seed=3)


def global_inputs(step: int, n: int, shape=(2, 8, 8), num_classes: int = 4):
    """A fixed global batch of `n` rows for `step` (independent of any rank): couplings, labels
    with some null rows, (t, r) with half of the rows r != t, and a stage-2 guidance scale."""
    from remeanflow import meanflow, train

    g = torch.Generator().manual_seed(1000 + step)
    x = 0.5 * torch.randn(n, *shape, generator=g)
    noise = torch.randn(n, *shape, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[::5] = -1
    t, r = meanflow.sample_t_r(n, g, ratio_r_neq_t=0.5)
    return train.StepInputs(x=x, noise=noise, labels=labels, t=t, r=r, w_pi=1.5 + 0.25 * step)


def rows(inputs, lo: int, hi: int):
    """Rows lo:hi of a StepInputs (the share of one rank)."""
    from remeanflow import train

    return train.StepInputs(x=inputs.x[lo:hi], noise=inputs.noise[lo:hi], labels=inputs.labels[lo:hi],
                            t=inputs.t[lo:hi], r=inputs.r[lo:hi], w_pi=inputs.w_pi)


def gradients(trainer) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in trainer.net.named_parameters() if p.grad is not None}


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.net.named_parameters()}


def grads_checks(spec: dict, record: Path) -> None:
    from remeanflow import train

    acc = train.make_accelerator("no")
    for jvp in spec.get("jvp", [HYPER["jvp"]]):
        grads_check(acc, spec, jvp, record)


def grads_check(acc, spec: dict, jvp: str, record: Path) -> None:
    from remeanflow import checkpoints, train

    rank, batch = acc.process_index, spec["batch"]
    net = checkpoints.load_net(spec["init"])["net"]
    trainer = train.build_trainer(acc, net, copy.deepcopy(net), hyperparameters(**{**HYPER, "jvp": jvp}))
    world = acc.num_processes
    mine = [rows(global_inputs(step, world * batch), rank * batch, (rank + 1) * batch) for step in (1, 2)]

    start_params = copy.deepcopy(trainer.net.state_dict())
    start_optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    trap = dataclasses.replace(trainer, model=trainer.net)  # u through the unwrapped module
    trap_row = train.train_step(trap, mine[0], 1)
    out = dict(rank=rank, world=world, trap_row=trap_row, trap_grads=gradients(trainer),
               trap_params=parameters(trainer))

    trainer.net.load_state_dict(start_params)
    trainer.optimizer.load_state_dict(start_optimizer)
    out["rows"] = [train.train_step(trainer, mine[0], 1)]
    out["grads"] = gradients(trainer)
    out["rows"].append(train.train_step(trainer, mine[1], 2))
    out["params"] = parameters(trainer)
    torch.save(out, record / f"grads.rank{rank}.{jvp}.pt")


class WriteAudit:
    """Records every file-system write this process makes under `roots`: files opened for
    writing, renames (both ends), unlinks, mkdir/rmdir -- through the Python calls the library
    uses (open/io.open, os.replace/rename/unlink/remove/mkdir/rmdir; pathlib and os.makedirs go
    through these)."""

    def __init__(self, roots: list[str]):
        self.roots = [os.path.realpath(r) for r in roots]
        self.events: list[tuple[str, str]] = []
        if self.roots:
            self._install()

    def note(self, op: str, path) -> None:
        if isinstance(path, int):  # a file descriptor
            return
        p = os.path.realpath(os.fspath(path))
        if any(p == r or p.startswith(r + os.sep) for r in self.roots):
            self.events.append((op, p))

    def _install(self) -> None:
        real_open = builtins.open

        def audited_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self.note(f"open:{mode}", file)
            return real_open(file, mode, *args, **kwargs)

        builtins.open = io.open = audited_open
        for name in ("replace", "rename"):
            def two(src, dst, *args, _real=getattr(os, name), _name=name, **kwargs):
                self.note(f"{_name}:src", src)
                self.note(_name, dst)
                return _real(src, dst, *args, **kwargs)

            setattr(os, name, two)
        for name in ("unlink", "remove", "mkdir", "rmdir"):
            def one(path, *args, _real=getattr(os, name), _name=name, **kwargs):
                self.note(_name, path)
                return _real(path, *args, **kwargs)

            setattr(os, name, one)


def record_draws(draws: list[dict]) -> None:
    """Wrap `train.draw_step` (the loop calls it by its module name) to record every step's draws."""
    from remeanflow import train

    draw_step = train.draw_step

    def recording(config, batch, step, rank, device):
        inputs = draw_step(config, batch, step, rank, device)
        rng = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()
        draws.append(dict(step=step, rank_arg=rank, rows=int(inputs.x.shape[0]), sample_ids=batch["sample_id"].tolist(),
                          stored_labels=batch["label"].tolist(), labels=inputs.labels.tolist(), t=inputs.t.tolist(),
                          r=inputs.r.tolist(), w_pi=inputs.w_pi, kept_fraction=inputs.kept_fraction, global_rng=rng))
        return inputs

    train.draw_step = recording


def run_entry_point(kw: dict, record: Path) -> None:
    """`python -m remeanflow.train <spec>` in this rank, as `launch.launch_module` starts it (`kw`:
    flat keywords, as `train_worker.run_meanflow` takes them). Records the trackers this rank
    closed and, for every destroy_process_group call, the output files that existed then; written
    to `rank<R>.json` once the entry point has returned (the process group is gone by then)."""
    import runpy

    from remeanflow import tracking

    rank = int(os.environ["RANK"])
    run = {k: kw.pop(k) for k in list(kw) if k in RUN_KEYS}
    spec_path = record / f"entry.rank{rank}.json"
    spec_path.write_text(json.dumps({**run, "settings": train_settings(run.get("stage", 1), **kw).to_dict()}))

    closed, destroyed = [], []
    finish, destroy = tracking.finish, torch.distributed.destroy_process_group

    def recording_finish(accelerator):
        closed.append([tracker.name for tracker in accelerator.trackers])
        finish(accelerator)

    def recording_destroy(*args, **kwargs):
        out = Path(run["out_dir"])
        destroyed.append(sorted(p.name for p in out.iterdir()) if out.is_dir() else [])
        destroy(*args, **kwargs)

    tracking.finish, torch.distributed.destroy_process_group = recording_finish, recording_destroy
    sys.argv = ["remeanflow.train", str(spec_path)]
    runpy.run_module("remeanflow.train", run_name="__main__", alter_sys=True)
    (record / f"rank{rank}.json").write_text(json.dumps(dict(
        closed=closed, destroyed=destroyed, initialized_after=torch.distributed.is_initialized())))


def main() -> None:
    from accelerate import PartialState

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    record = Path(spec["record"])
    if spec.get("entry"):
        return run_entry_point(spec["entry"], record)
    audit = WriteAudit(spec.get("audit", []))
    draws: list[dict] = []
    record_draws(draws)

    if spec.get("grads"):
        grads_checks(spec["grads"], record)
    summary = None
    if spec.get("train"):
        summary = run_meanflow(**spec["train"])

    state = PartialState()
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    (record / f"rank{state.process_index}.json").write_text(json.dumps(dict(
        process_index=state.process_index, local_process_index=state.local_process_index,
        num_processes=state.num_processes, env=env, draws=draws, writes=audit.events, summary=summary,
    ), default=str))
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
