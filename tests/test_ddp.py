"""Multi-process correctness of Re-MeanFlow training with real gloo process groups on the CPU.

Three launches of tests/ddp_worker.py, each shared by the tests that read it:

* `ddp_run`: `accelerate launch` (the workflow's `launch.accelerate_command`), 2 ranks, stage 1
  on heavily truncated couplings, checkpoints and EMA snapshots, every file write audited;
* `two_nodes`: 2 processes started as torchrun starts one process on each of two nodes (both
  LOCAL_RANK 0, no ACCELERATE_USE_CPU): the gradient-synchronisation checks, then a stage-2 run;
* the 1 -> 2 resume test's own launch;
* `tracked_run`: 2 ranks through the ranks' real entry point (`python -m remeanflow.train`) with
  TensorBoard and W&B (offline) as trackers.

Gradient synchronisation through the forward-mode JVP path (with the trap as a negative
control), 2 ranks x B = 1 rank x 2B, equal per-rank batches under truncation, randomness keyed by
the global rank, rank 0 as the only writer, snapshots, resume under another number of processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from remeanflow import checkpoints, launch, tracking, train, train_state
from remeanflow.coupling_set import open_couplings
from remeanflow.loader import CouplingStream

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import HYPER, global_inputs  # noqa: E402
from train_worker import (  # noqa: E402
    NUM_CLASSES, TRAIN_KW, hyperparameters, make_couplings, make_teacher, run_meanflow)

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parent.parent
PER_RANK = TRAIN_KW["batch_size"] // 2
# The modes that can run under DDP: the net's own tangent pass (v_hat through the wrapper's
# forward) and torch.func.jvp on the unwrapped module (u through the wrapper).
DDP_JVP_MODES = ("tangent", "forward")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {"root": root, "manifest": make_couplings(root / "normal"),
            "heavy": make_couplings(root / "heavy", quantile=0.3), "teacher": make_teacher(root / "teacher.pt")}


def worker_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def write_spec(root: Path, spec: dict) -> Path:
    (root / "record").mkdir(parents=True, exist_ok=True)
    path = root / "spec.json"
    path.write_text(json.dumps(dict(spec, record=str(root / "record")), default=str))
    return path


def accelerate_launch(root: Path, spec: dict, **env_vars: str) -> subprocess.CompletedProcess:
    """2 ranks under `accelerate launch`, exactly as the workflow launches training, in `root`."""
    cmd, env = launch.accelerate_command(2)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_vars)
    proc = subprocess.run([*cmd, str(WORKER), str(write_spec(root, spec))], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_launch(root: Path, spec: dict) -> None:
    """One process per simulated node, with the environment torchrun gives it there: the global
    RANK differs, LOCAL_RANK is 0 on both. No ACCELERATE_USE_CPU: `make_accelerator` must form
    the gloo group by itself on a machine without GPUs."""
    path, port = write_spec(root, spec), str(free_port())
    procs = []
    for rank in range(2):
        env = worker_env()
        env.pop("ACCELERATE_USE_CPU", None)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"node process failed ({p.returncode}):\n{out[-2000:]}\n{err[-6000:]}"


def records(root: Path) -> list[dict]:
    return [json.loads((root / "record" / f"rank{r}.json").read_text()) for r in range(2)]


def train_kw(manifest, init, root: Path, **overrides) -> dict:
    kw = dict(manifest=str(manifest), init=str(init), out_dir=str(root / "out"), work_dir=str(root / "work"), stage=1,
              iterations=4, checkpoint_every=2, **TRAIN_KW)
    kw.update(overrides)
    return kw


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ddp_run(data):
    root = data["root"] / "ddp_run"
    kw = train_kw(data["heavy"], data["teacher"], root, keep_checkpoints=1, snapshot_every=2)
    accelerate_launch(root, {"train": kw, "audit": [kw["work_dir"], kw["out_dir"]]})
    return {"root": root, "kw": kw, "records": records(root)}


@pytest.fixture(scope="module")
def two_nodes(data, ddp_run):
    root = data["root"] / "two_nodes"
    kw = train_kw(data["manifest"], ddp_run["root"] / "out" / "train_state.pt", root, stage=2, iterations=2,
                  w_max=2.5, grad_clip=1.0, class_dropout=0.5)
    spec = {"grads": {"init": str(data["teacher"]), "batch": PER_RANK, "jvp": list(DDP_JVP_MODES)}, "train": kw}
    two_node_launch(root, spec)
    grads = {jvp: [load(root / "record" / f"grads.rank{r}.{jvp}.pt") for r in range(2)] for jvp in DDP_JVP_MODES}
    return {"root": root, "kw": kw, "records": records(root), "grads": grads}


# ----------------------------------------------------------------------------------------------
# Gradients and steps.


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("jvp", DDP_JVP_MODES)
def test_gradients_are_all_reduced_through_the_jvp_path(two_nodes, jvp):
    g0, g1 = two_nodes["grads"][jvp]
    assert (g0["rank"], g1["rank"], g0["world"]) == (0, 1, 2)
    # The trap (u through the unwrapped module): each rank keeps its own gradient and the ranks'
    # weights drift apart after one step.
    scale = max(v.abs().max().item() for v in g0["trap_grads"].values())
    assert max_abs_diff(g0["trap_grads"], g1["trap_grads"]) > 1e-3 * scale
    assert max_abs_diff(g0["trap_params"], g1["trap_params"]) > 1e-5
    # The trainer: identical gradients on both ranks, equal to the mean of the local gradients
    # (the trap step's gradients were computed from the same weights and batches).
    assert g0["grads"].keys() == g0["trap_grads"].keys()
    for name, g in g0["grads"].items():
        assert torch.equal(g, g1["grads"][name]), name
        mean = (g0["trap_grads"][name] + g1["trap_grads"][name]) / 2
        torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-8, msg=name)
    assert max_abs_diff(g0["params"], g1["params"]) == 0


@pytest.mark.parametrize("jvp", DDP_JVP_MODES)
def test_two_ranks_take_the_same_step_as_one_rank_with_the_whole_batch(two_nodes, data, jvp):
    """Rank k of 2 trained on rows k*B:(k+1)*B of the batches `global_inputs` gives; one process
    trains on the whole batches with the same (t, r), labels and w_pi."""
    acc = train.make_accelerator("no")
    net = checkpoints.load_net(data["teacher"])["net"]
    ema = checkpoints.load_net(data["teacher"])["net"]
    trainer = train.build_trainer(acc, net, ema, hyperparameters(**{**HYPER, "jvp": jvp}))
    ref_rows = [train.train_step(trainer, global_inputs(1, 2 * PER_RANK), 1)]
    ref_grads = {n: p.grad.clone() for n, p in trainer.net.named_parameters() if p.grad is not None}
    ref_rows.append(train.train_step(trainer, global_inputs(2, 2 * PER_RANK), 2))
    ref_params = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}

    for rank in two_nodes["grads"][jvp]:
        for name, g in ref_grads.items():
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-5, atol=1e-8, msg=name)
        # Adam moves a weight by up to ~lr per step (and the trap's ranks differ by that much):
        # the same update, up to summation order (measured: ~7e-7 at lr 1e-3)
        assert max_abs_diff(rank["params"], ref_params) < 1e-2 * HYPER["lr"]
        for got, want in zip(rank["rows"], ref_rows):
            assert got["w_pi"] == want["w_pi"]
            for key in ("loss", "mse", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key


# ----------------------------------------------------------------------------------------------
# Data and randomness per rank.


def test_per_rank_batches_stay_equal_under_heavy_truncation(ddp_run, data):
    reader = open_couplings(data["heavy"])
    parts = [reader.read_chunk(i) for i in range(len(reader))]
    kept = set(np.concatenate([p["sample_id"][p["keep"]] for p in parts]).tolist())
    assert len(kept) < 0.35 * reader.total  # heavy: about 70% of the couplings dropped
    recs = ddp_run["records"]
    for rank, rec in enumerate(recs):
        assert [d["step"] for d in rec["draws"]] == [1, 2, 3, 4] and rec["num_processes"] == 2
        for d in rec["draws"]:
            assert d["rows"] == PER_RANK and len(d["sample_ids"]) == PER_RANK, (rank, d["step"])
            assert set(d["sample_ids"]) <= kept
    # The truncation hit the ranks' windows unequally, yet every batch had B rows.
    assert [d["kept_fraction"] for d in recs[0]["draws"]] != [d["kept_fraction"] for d in recs[1]["draws"]]
    streams = load(Path(ddp_run["kw"]["work_dir"]) / "ckpt-00000004.pt")["streams"]
    assert [(s["rank"], s["world_size"], s["batch_size"]) for s in streams] == [(0, 2, PER_RANK), (1, 2, PER_RANK)]


def test_per_rank_draws_are_keyed_by_the_global_rank(two_nodes):
    recs = two_nodes["records"]
    assert [r["env"]["LOCAL_RANK"] for r in recs] == ["0", "0"]  # two nodes: the local ranks coincide
    assert [(r["process_index"], r["local_process_index"], r["num_processes"]) for r in recs] == [(0, 0, 2), (1, 0, 2)]
    config = load(Path(two_nodes["kw"]["work_dir"]) / "ckpt-00000002.pt")["config"]
    w_max = two_nodes["kw"]["w_max"]
    for step in (1, 2):
        d0, d1 = (next(d for d in r["draws"] if d["step"] == step) for r in recs)
        assert (d0["rank_arg"], d1["rank_arg"]) == (0, 1)  # the loop passed the global rank
        assert d0["t"] != d1["t"] and d0["r"] != d1["r"]
        assert d0["global_rng"] != d1["global_rng"]
        assert not set(d0["sample_ids"]) & set(d1["sample_ids"])
        assert d0["w_pi"] == d1["w_pi"] == train.draw_w_pi(config["seed"], step, w_max)
        # Recomputing the draws with the global rank reproduces them; with the local rank (0 on
        # both nodes) the second node would repeat the first node's draws.
        for rank, d in enumerate((d0, d1)):
            batch = {"x": torch.zeros(PER_RANK, 2, 8, 8), "noise": torch.zeros(PER_RANK, 2, 8, 8),
                     "label": torch.tensor(d["stored_labels"]), "kept_fraction": 1.0}
            again = train.draw_step(config, batch, step, rank, "cpu")
            assert again.t.tolist() == d["t"] and again.r.tolist() == d["r"] and again.labels.tolist() == d["labels"]
        as_local = train.draw_step(config, batch, step, 0, "cpu")
        assert as_local.t.tolist() == d0["t"] != d1["t"]
    # class dropout (0.5 in this run) drew different rows on the two ranks
    drops = [[lab == -1 for d in r["draws"] for lab in d["labels"]] for r in recs]
    assert any(drops[0]) and any(drops[1]) and drops[0] != drops[1]


# ----------------------------------------------------------------------------------------------
# Files.


def test_only_rank_0_writes(ddp_run):
    work, out = Path(ddp_run["kw"]["work_dir"]), Path(ddp_run["kw"]["out_dir"])
    writes = [r["writes"] for r in ddp_run["records"]]
    assert writes[1] == [], f"rank 1 wrote: {writes[1][:10]}"
    written = {os.path.realpath(p) for op, p in writes[0] if op.startswith("open") or op in ("replace", "rename")}
    files = [p for d in (work, out) for p in d.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"ckpt-00000004.pt", "metrics.csv", "train_state.pt", "net_ema.pt",
                                       "ema-step-00000002.pt", "ema-step-00000004.pt"}
    for path in files:
        assert os.path.realpath(path) in written, f"{path} was not written by rank 0"
    assert not [p for p in files if ".tmp" in p.name]


def test_snapshots_are_kept_and_hold_the_ema(ddp_run):
    work, out = Path(ddp_run["kw"]["work_dir"]), Path(ddp_run["kw"]["out_dir"])
    assert sorted(p.name for p in work.glob("ckpt-*.pt")) == ["ckpt-00000004.pt"]  # keep_checkpoints=1 ...
    snaps = sorted((work / "snapshots").glob("ema-step-*.pt"))
    assert [p.name for p in snaps] == ["ema-step-00000002.pt", "ema-step-00000004.pt"]  # ... snapshots stay
    assert snaps[0] == train_state.snapshot_path(work, 2)
    ckpt = load(work / "ckpt-00000004.pt")
    first, last = (checkpoints.load_net(p) for p in snaps)
    for snap, step in ((first, 2), (last, 4)):
        assert snap["meta"] == dict(stage=1, step=step, seed=TRAIN_KW["seed"], ema_decay=TRAIN_KW["ema_decay"],
                                    config_hash=ckpt["config_hash"], num_processes=2)
    final = checkpoints.load_net(out / "net_ema.pt")["net"].state_dict()
    for k, v in last["net"].state_dict().items():
        assert torch.equal(v, final[k]) and torch.equal(v, ckpt["ema"][k]), k
    assert not all(torch.equal(v, last["net"].state_dict()[k]) for k, v in first["net"].state_dict().items())


# ----------------------------------------------------------------------------------------------
# Trackers.


@pytest.fixture(scope="module")
def tracked_run(data):
    """4 steps on 2 ranks with `train.trackers: [tensorboard, wandb]`, W&B offline, snapshots (and
    sample grids) at steps 2 and 4. W&B's own folders go under the run's root, not the home."""
    root = data["root"] / "tracked"
    kw = train_kw(data["manifest"], data["teacher"], root, snapshot_every=2, trackers=["tensorboard", "wandb"])
    wandb_dirs = {f"WANDB_{name}_DIR": str(root / f"wandb-{name.lower()}") for name in ("CONFIG", "CACHE", "DATA")}
    accelerate_launch(root, {"entry": kw}, WANDB_MODE="offline", **wandb_dirs)
    rows = pd.read_csv(Path(kw["out_dir"]) / "metrics.csv")
    assert rows["step"].tolist() == [1, 2, 3, 4]
    return {"root": root, "trackers": Path(kw["work_dir"]) / "trackers", "out": Path(kw["out_dir"]), "rows": rows,
            "records": records(root)}


def wandb_history(path: Path) -> list[dict]:
    """The history rows (`wandb.log` calls, one per step) of a W&B run file (`run-<id>.wandb`):
    LevelDB's log format (32 KiB blocks of records, each a 7-byte header: crc32, length, type
    FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B' file header, holding wandb's `Record` protobufs.
    W&B has no reader of its own for these files any more (it went into its Go core)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, payload, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_trackers_log_on_the_main_process_only_and_the_group_goes_once_after_the_outputs(tracked_run):
    closed = [r["closed"] for r in tracked_run["records"]]
    assert closed == [[["tensorboard", "wandb"]], [[]]]  # every rank finished; only rank 0 had trackers
    for rank in tracked_run["records"]:
        assert len(rank["destroyed"]) == 1 and not rank["initialized_after"]
        assert {"train_state.pt", "net_ema.pt", "metrics.csv"} <= set(rank["destroyed"][0])
    assert not (tracked_run["root"] / "wandb").exists()  # W&B wrote under the trackers folder, not the cwd


def test_tensorboard_events_hold_every_metric_once_per_step(tracked_run):
    from tensorboard.backend.event_processing import event_accumulator

    files = list((tracked_run["trackers"] / "stage1").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # one writer: the main process
    events = event_accumulator.EventAccumulator(str(files[0]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for column in train_state.METRICS_COLUMNS[1:]:
        logged = events.Scalars(column)
        assert [e.step for e in logged] == [1, 2, 3, 4], column
        assert [e.value for e in logged] == pytest.approx(tracked_run["rows"][column].tolist(), rel=1e-6), column
    assert [e.step for e in events.Images("one_step_samples")] == [2, 4]


def test_wandb_offline_run_holds_every_metric_once_per_step(tracked_run):
    (run,) = (tracked_run["trackers"] / "wandb").glob("offline-run-*")
    (run_file,) = run.glob("run-*.wandb")
    history = wandb_history(run_file)
    assert [row["_step"] for row in history] == [1, 2, 3, 4]
    for column in train_state.METRICS_COLUMNS[1:]:
        assert [row[column] for row in history] == pytest.approx(tracked_run["rows"][column].tolist(), rel=1e-6), column
    grids = [row["_step"] for row in history if "one_step_samples/_type" in row]
    assert grids == [2, 4]
    assert history[1]["one_step_samples/count"] == min(tracking.GRID_CLASSES, NUM_CLASSES) * tracking.GRID_PER_CLASS


# ----------------------------------------------------------------------------------------------
# Resume under another number of processes.


def first_unstarted_epoch(streams: list[dict]) -> int:
    """The documented rule, written out: the first epoch no saved rank had drawn from."""
    return max(s["epoch"] + (1 if s["window"] or s["offset"] else 0) for s in streams)


def expected_start(manifest, *, rank: int, world: int, epoch: int, take: int) -> tuple[list[int], tuple]:
    """The first `take` sample ids of (rank, world) in `epoch` and the position after them, read
    one coupling at a time by a fresh stream after skipping every kept coupling of the earlier epochs."""
    s = CouplingStream(manifest, batch_size=1, rank=rank, world_size=world, seed=TRAIN_KW["seed"],
                       window_chunks=TRAIN_KW["window_chunks"])
    earlier = sum(int(s.reader.read_chunk(int(i))["keep"].sum()) for e in range(epoch) for i in s.epoch_chunks(e))
    for _ in range(earlier):
        next(s)
    ids = [int(next(s)["sample_id"][0]) for _ in range(take)]
    return ids, (s.epoch, s.window, s.offset)


def assert_optimizer_continues(before: dict, after: dict) -> None:
    """One more Adam step on top of the saved moments: step + 1, and the second moment equals
    b2·v + (1 - b2)·g² for the gradient g that the first moment implies."""
    b1, b2 = TRAIN_KW.get("betas", (0.9, 0.99))
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys() and len(after["state"]) > 10
    for k, st in after["state"].items():
        prev = before["state"][k]
        assert int(st["step"]) == int(prev["step"]) + 1
        g = (st["exp_avg"] - b1 * prev["exp_avg"]) / (1 - b1)
        torch.testing.assert_close(st["exp_avg_sq"], b2 * prev["exp_avg_sq"] + (1 - b2) * g * g, rtol=1e-3, atol=1e-12)


def assert_ema_continues(data, before: dict, after: dict) -> None:
    """after's EMA = one EMA update of before's EMA towards after's model, bit for bit."""
    ema, net = (checkpoints.load_net(data["teacher"])["net"] for _ in range(2))
    ema.load_state_dict(before["ema"])
    net.load_state_dict(after["model"])
    train.update_ema(ema, net, TRAIN_KW["ema_decay"])
    for k, v in ema.state_dict().items():
        assert torch.equal(after["ema"][k], v), k


def test_resume_two_ranks_on_one(ddp_run, data, tmp_path, caplog, monkeypatch):
    shutil.copytree(ddp_run["kw"]["work_dir"], tmp_path / "work")
    saved = load(tmp_path / "work" / "ckpt-00000004.pt")
    assert saved["num_processes"] == 2 and len(saved["streams"]) == 2
    epoch = first_unstarted_epoch(saved["streams"])

    # Nothing left to train: the outputs are the checkpoint's model and EMA, exactly.
    kw = train_kw(data["heavy"], data["teacher"], tmp_path, snapshot_every=2)
    with caplog.at_level(logging.WARNING, logger="remeanflow.loader"):
        same = run_meanflow(**kw)
    assert same["steps_run"] == 0 and same["resumed_from"] == 4 and same["world_size"] == 1
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "saved by 2 process(es), resumed by 1" in warning and f"every process starts at epoch {epoch}" in warning
    state = load(tmp_path / "out" / "train_state.pt")
    assert state["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(state[part][k], v) for k, v in saved[part].items()), part

    # One more step on one process with the whole global batch, from the start of that epoch.
    draws = []
    draw_step = train.draw_step

    def recording(config, batch, step, rank, device):
        draws.append(batch["sample_id"].tolist())
        return draw_step(config, batch, step, rank, device)

    monkeypatch.setattr(train, "draw_step", recording)
    more = run_meanflow(**dict(kw, iterations=5))
    assert more["steps_run"] == 1 and more["resumed_from"] == 4
    after = load(tmp_path / "work" / "ckpt-00000005.pt")
    assert after["step"] == 5 and after["num_processes"] == 1
    ids, position = expected_start(data["heavy"], rank=0, world=1, epoch=epoch, take=TRAIN_KW["batch_size"])
    assert draws == [ids]
    (stream,) = after["streams"]
    assert (stream["batch_size"], stream["world_size"]) == (TRAIN_KW["batch_size"], 1)
    assert (stream["epoch"], stream["window"], stream["offset"]) == position
    assert_optimizer_continues(saved["optimizer"], after["optimizer"])
    assert_ema_continues(data, saved, after)
    assert torch.equal(after["metrics"][:4], saved["metrics"]) and after["metrics"][:, 0].tolist() == [1, 2, 3, 4, 5]
    assert (tmp_path / "work" / "snapshots" / "ema-step-00000004.pt").exists()  # copied, kept


def test_resume_one_rank_on_two(data, tmp_path):
    kw = train_kw(data["manifest"], data["teacher"], tmp_path, iterations=2)
    run_meanflow(**kw)
    saved = load(tmp_path / "work" / "ckpt-00000002.pt")
    assert saved["num_processes"] == 1
    epoch = first_unstarted_epoch(saved["streams"])

    proc = accelerate_launch(tmp_path / "launch", {"train": dict(kw, iterations=3)})
    assert "saved by 1 process(es), resumed by 2" in proc.stderr
    after = load(tmp_path / "work" / "ckpt-00000003.pt")
    assert after["step"] == 3 and after["num_processes"] == 2
    layout = [(s["rank"], s["world_size"], s["batch_size"]) for s in after["streams"]]
    assert layout == [(0, 2, PER_RANK), (1, 2, PER_RANK)]
    for rank, rec in enumerate(records(tmp_path / "launch")):
        (draw,) = rec["draws"]
        assert draw["step"] == 3 and draw["rank_arg"] == rank
        ids, position = expected_start(data["manifest"], rank=rank, world=2, epoch=epoch, take=PER_RANK)
        assert draw["sample_ids"] == ids
        s = after["streams"][rank]
        assert (s["epoch"], s["window"], s["offset"]) == position
    assert_optimizer_continues(saved["optimizer"], after["optimizer"])
    assert_ema_continues(data, saved, after)
    assert after["metrics"][:, 0].tolist() == [1, 2, 3] and torch.equal(after["metrics"][:2], saved["metrics"])
