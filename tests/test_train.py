"""Re-MeanFlow training loop: learning, exact length, outputs, kill/resume bit-exactness, config
guard, NaN guard, EMA snapshots, stage 2 (CFG scale, clipping), argument checks, and a 2-process
DDP run (the multi-process checks proper are in test_ddp.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from remeanflow import checkpoints, meanflow, networks, train, train_state
from remeanflow.couplings import FingerprintMismatchError
from remeanflow.fileio import sha256_file

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import TRAIN_KW, make_couplings, make_teacher, run_meanflow  # noqa: E402

WORKER = Path(__file__).with_name("train_worker.py")
REPO = Path(__file__).resolve().parent.parent
STAGE1_STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "manifest": make_couplings(root / "couplings"), "teacher": make_teacher(root / "teacher.pt")}


@pytest.fixture(scope="module")
def stage1(data):
    """One stage-1 run of STAGE1_STEPS steps, shared by the tests that only read it."""
    root = data["root"] / "stage1"
    summary = run_meanflow(
        manifest=data["manifest"], init=data["teacher"], out_dir=root / "out", work_dir=root / "work", stage=1,
        iterations=STAGE1_STEPS, checkpoint_every=10, **TRAIN_KW,
    )
    return {"root": root, "summary": summary}


def run_kw(data, root: Path, **overrides) -> dict:
    kw = dict(manifest=data["manifest"], init=data["teacher"], out_dir=root / "out", work_dir=root / "work",
              stage=1, iterations=6, checkpoint_every=2, **TRAIN_KW)
    kw.update(overrides)
    return kw


def eval_loss(net: networks.Precond, manifest) -> float:
    """MeanFlow loss of a fixed batch of 32 couplings at fixed (t, r): a noise-free learning signal."""
    from remeanflow.coupling_set import open_couplings

    reader = open_couplings(manifest)
    parts = [reader.read_chunk(i) for i in range(4)]
    x, noise, labels = (torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in ("endpoint", "noise", "label"))
    x, noise, labels = x.float(), noise.float(), labels.long()
    t, r = meanflow.sample_t_r(32, torch.Generator().manual_seed(123), ratio_r_neq_t=0.5)
    net.normalize_weights_()
    return meanflow.meanflow_loss(net, x, noise, labels, t, r).item()


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def start_worker(data, root: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(data["manifest"]), str(data["teacher"]), str(root / "out"),
           str(root / "work"), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"


def ckpt_steps(work: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in work.glob("ckpt-*.pt"))


def metrics_steps(path: Path) -> list[int]:
    """Steps of the live metrics CSV (a killed writer may leave a torn last line)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines if line.count(",") == len(train_state.METRICS_COLUMNS) - 1]


# ----------------------------------------------------------------------------------------------


def test_stage1_learns_stops_exactly_and_writes_outputs(data, stage1):
    root, summary = stage1["root"], stage1["summary"]
    metrics = pd.read_csv(root / "out" / "metrics.csv")
    assert list(metrics.columns) == list(train_state.METRICS_COLUMNS)
    assert metrics["step"].tolist() == list(range(1, STAGE1_STEPS + 1))
    assert (metrics["w_pi"] == 1.0).all() and (metrics["lr"] == TRAIN_KW["lr"]).all()
    assert metrics["kept_fraction"].between(0.5, 1.0).all() and (metrics["kept_fraction"] < 1).any()
    assert summary["steps"] == STAGE1_STEPS and summary["resumed_from"] is None
    assert summary["final_loss"] == pytest.approx(metrics["loss"].tail(4).mean())

    teacher = checkpoints.load_net(data["teacher"])["net"]
    ema = checkpoints.load_net(root / "out" / "net_ema.pt")
    assert ema["meta"]["stage"] == 1 and ema["meta"]["step"] == STAGE1_STEPS and ema["meta"]["seed"] == TRAIN_KW["seed"]
    state = load_state(root / "out" / "train_state.pt")
    assert state["format"] == train_state.TRAIN_STATE_FORMAT and state["step"] == STAGE1_STEPS and state["stage"] == 1
    for k, v in state["ema"].items():
        assert torch.equal(v, ema["net"].state_dict()[k]), k
    model = networks.Precond(**state["init_kwargs"])
    model.load_state_dict(state["model"])

    # It learned: a fixed batch's loss dropped, for the trained model and for its EMA.
    before = eval_loss(teacher, data["manifest"])
    assert eval_loss(model, data["manifest"]) < 0.8 * before
    assert eval_loss(ema["net"], data["manifest"]) < 0.9 * before  # the EMA (decay 0.9) lags the model
    # The frozen teacher embedding / log-variance head did not learn (forced weight normalisation
    # only projects them onto the sphere, which the forward does anyway); trained weights did.
    for name in train.FROZEN:
        want = networks.normalize(teacher.state_dict()[name])
        torch.testing.assert_close(state["model"][name], want, rtol=0, atol=1e-6), name
    assert not torch.equal(state["model"]["unet.emb_noise_t.weight"], teacher.state_dict()["unet.emb_noise_t.weight"])
    assert not torch.equal(state["model"]["unet.out_gain"], state["ema"]["unet.out_gain"])

    # Checkpoints: every 10 steps, the newest 2 kept; the last one holds the final state.
    assert ckpt_steps(root / "work") == [30, 40]
    last = load_state(root / "work" / "ckpt-00000040.pt")
    assert all(torch.equal(last["ema"][k], v) for k, v in state["ema"].items())
    assert last["metrics"].shape == (STAGE1_STEPS, len(train_state.METRICS_COLUMNS))


def test_rerun_after_the_end_trains_nothing_and_extending_resumes(data, stage1, tmp_path):
    shutil.copytree(stage1["root"] / "work", tmp_path / "work")
    again = run_meanflow(**run_kw(data, tmp_path, iterations=STAGE1_STEPS, checkpoint_every=10))
    assert again["steps_run"] == 0 and again["resumed_from"] == STAGE1_STEPS
    a, b = load_state(tmp_path / "out" / "train_state.pt"), load_state(stage1["root"] / "out" / "train_state.pt")
    assert all(torch.equal(a["ema"][k], v) for k, v in b["ema"].items())
    longer = run_meanflow(**run_kw(data, tmp_path, iterations=STAGE1_STEPS + 3, checkpoint_every=10))
    assert longer["steps_run"] == 3 and longer["resumed_from"] == STAGE1_STEPS
    assert pd.read_csv(tmp_path / "out" / "metrics.csv")["step"].tolist() == list(range(1, STAGE1_STEPS + 4))


def test_resume_with_changed_hyperparameters_is_refused(data, stage1, tmp_path):
    shutil.copytree(stage1["root"] / "work", tmp_path / "work")
    with pytest.raises(ValueError, match=r"different settings \(lr: 0.001 -> 0.002\); refusing to resume"):
        run_meanflow(**run_kw(data, tmp_path, iterations=STAGE1_STEPS + 1, lr=2e-3))
    with pytest.raises(ValueError, match=r"ema_decay: 0.9 -> 0.8; seed: 3 -> 4"):
        run_meanflow(**run_kw(data, tmp_path, iterations=STAGE1_STEPS + 1, ema_decay=0.8, seed=4))
    assert not (tmp_path / "out").exists()
    assert ckpt_steps(tmp_path / "work") == [30, 40]


def test_stale_work_dir_is_archived_when_asked(data, stage1, tmp_path):
    """What the workflow does when Snakemake reruns a stage with changed settings: the old work_dir
    is moved aside, not resumed and not deleted, and training starts from step 1."""
    shutil.copytree(stage1["root"] / "work", tmp_path / "work")
    summary = run_meanflow(**run_kw(data, tmp_path, iterations=3, lr=2e-3, on_stale_work_dir="archive"))
    assert summary["resumed_from"] is None and summary["steps"] == 3
    stale = list(tmp_path.glob("work.stale-*"))
    assert len(stale) == 1 and ckpt_steps(stale[0]) == [30, 40]
    assert ckpt_steps(tmp_path / "work")[-1] == 3
    with pytest.raises(ValueError, match="on_stale_work_dir"):
        run_meanflow(**run_kw(data, tmp_path, iterations=3, on_stale_work_dir="delete"))


def test_lowered_iterations_archive_and_train_fresh_and_resumes_are_logged(data, stage1, tmp_path, caplog):
    """`iterations` below a finished run's checkpoint: refused for library use; the workflow
    ("archive") moves the work folder aside and trains fresh, like any other settings change."""
    shutil.copytree(stage1["root"] / "work", tmp_path / "work")
    with pytest.raises(ValueError, match="checkpoint at step 40 is past iterations=4"):
        run_meanflow(**run_kw(data, tmp_path, iterations=4))
    with caplog.at_level("INFO", logger="remeanflow"):
        summary = run_meanflow(**run_kw(data, tmp_path, iterations=4, on_stale_work_dir="archive"))
    assert summary["resumed_from"] is None and summary["steps_run"] == 4
    stale = list(tmp_path.glob("work.stale-*-step00000040"))
    assert len(stale) == 1 and ckpt_steps(stale[0]) == [30, 40]
    assert "iterations lowered to 4, below the checkpoint's step 40" in caplog.text
    assert "training from the start for 4 steps" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="remeanflow"):
        longer = run_meanflow(**run_kw(data, tmp_path, iterations=6, on_stale_work_dir="archive"))
    assert longer["resumed_from"] == 4 and longer["steps_run"] == 2
    assert "resuming from" in caplog.text and "at step 4 of 6" in caplog.text


def test_trackers_get_every_metric_and_the_snapshot_grids(data, tmp_path):
    """train.trackers: [tensorboard]; read back with TensorBoard's own event-file reader."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    plain = run_meanflow(**run_kw(data, tmp_path / "plain", iterations=4, snapshot_every=2))
    tracked = run_meanflow(**run_kw(data, tmp_path / "tracked", iterations=4, snapshot_every=2,
                                    trackers=("tensorboard",)))
    assert plain["final_loss"] == tracked["final_loss"]  # logging changes no result
    runs = [p.parent for p in (tmp_path / "tracked" / "work" / "trackers").rglob("events.out.tfevents.*")]
    events = event_accumulator.EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    rows = pd.read_csv(tmp_path / "tracked" / "out" / "metrics.csv")
    for column in train_state.METRICS_COLUMNS[1:]:
        logged = events.Scalars(column)
        assert [e.step for e in logged] == [1, 2, 3, 4], column
        assert [e.value for e in logged] == pytest.approx(rows[column].tolist(), rel=1e-6), column
    images = events.Images("one_step_samples")
    assert [e.step for e in images] == [2, 4] and images[0].width > 0


def test_kill_and_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    """SIGKILL a worker between checkpoints (after it logged steps past the last one), rerun it to
    the end: EMA, model and logged losses equal an uninterrupted run's exactly."""
    iterations = 12
    ref = run_meanflow(**run_kw(data, tmp_path / "ref", iterations=iterations, checkpoint_every=3))

    run = tmp_path / "killed"
    proc = start_worker(data, run, "--iterations", str(iterations), "--checkpoint-every", "3", "--sleep", "0.25")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            steps = ckpt_steps(run / "work")
            if steps and max(metrics_steps(run / "work" / "metrics.csv"), default=0) > steps[-1]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"worker ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = ckpt_steps(run / "work")[-1]
    assert 3 <= killed_at < iterations
    assert max(metrics_steps(run / "work" / "metrics.csv")) > killed_at  # rows the rerun must drop
    assert not (run / "out").exists() or not any((run / "out").iterdir()), "outputs written before the end"

    summary_path = tmp_path / "summary.json"
    finish(start_worker(data, run, "--iterations", str(iterations), "--checkpoint-every", "3",
                        "--summary", str(summary_path)))
    assert json.loads(summary_path.read_text())["resumed_from"] == killed_at

    got, want = load_state(run / "out" / "train_state.pt"), load_state(tmp_path / "ref" / "out" / "train_state.pt")
    for part in ("ema", "model"):
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{part}.{k} differs after kill/resume"
    m_got, m_want = pd.read_csv(run / "out" / "metrics.csv"), pd.read_csv(tmp_path / "ref" / "out" / "metrics.csv")
    assert m_got["step"].tolist() == list(range(1, iterations + 1))  # no duplicates, no gaps
    cols = ["loss", "mse", "grad_norm", "kept_fraction"]
    assert m_got[cols].equals(m_want[cols])
    assert metrics_steps(run / "work" / "metrics.csv") == list(range(1, iterations + 1))
    assert ref["steps_run"] == iterations


def test_nan_loss_stops_without_outputs_and_keeps_the_last_checkpoint(data, tmp_path):
    kw = run_kw(data, tmp_path, iterations=5, checkpoint_every=2)
    with pytest.raises(train.NonFiniteError, match=r"non-finite loss \(nan\) at step 3") as info:
        run_meanflow(**kw, fail_at_step=3)
    assert isinstance(info.value, FloatingPointError)
    assert not (tmp_path / "out").exists()
    assert ckpt_steps(tmp_path / "work") == [2]
    assert load_state(tmp_path / "work" / "ckpt-00000002.pt")["step"] == 2
    # The same run without the fault resumes from that checkpoint and finishes.
    done = run_meanflow(**kw)
    assert done["resumed_from"] == 2 and (tmp_path / "out" / "net_ema.pt").exists()


def test_snapshots_keep_the_ema_of_every_nth_step(data, tmp_path):
    kw = run_kw(data, tmp_path / "a", iterations=4, checkpoint_every=3, keep_checkpoints=1, snapshot_every=2)
    run_meanflow(**kw)
    work = tmp_path / "a" / "work"
    snaps = sorted((work / "snapshots").glob("*.pt"))
    assert snaps == [train_state.snapshot_path(work, 2), train_state.snapshot_path(work, 4)]
    assert [p.name for p in snaps] == ["ema-step-00000002.pt", "ema-step-00000004.pt"]
    # Step 2's snapshot is the EMA a 2-step run ends with; step 4's is this run's final EMA.
    run_meanflow(**run_kw(data, tmp_path / "b", iterations=2))
    config_hash = load_state(tmp_path / "a" / "out" / "train_state.pt")["config_hash"]
    for path, step, final in ((snaps[0], 2, tmp_path / "b"), (snaps[1], 4, tmp_path / "a")):
        snap = checkpoints.load_net(path)
        assert snap["meta"] == dict(stage=1, step=step, seed=TRAIN_KW["seed"], ema_decay=TRAIN_KW["ema_decay"],
                                    config_hash=config_hash, num_processes=1)
        want = checkpoints.load_net(final / "out" / "net_ema.pt")["net"].state_dict()
        assert all(torch.equal(v, want[k]) for k, v in snap["net"].state_dict().items()), path
        assert Path(f"{path}.sha256").read_text().split()[0] == sha256_file(path)
    first = sha256_file(snaps[0])

    # Extending the run adds snapshots; the earlier ones stay as they were (never pruned).
    run_meanflow(**dict(kw, iterations=6))
    assert sorted(p.name for p in (work / "snapshots").glob("*.pt"))[-1] == "ema-step-00000006.pt"
    assert len(list((work / "snapshots").glob("*.pt"))) == 3 and sha256_file(snaps[0]) == first
    assert ckpt_steps(work) == [6]
    with pytest.raises(ValueError, match="TrainSettings.snapshot_every = 0: must be >= 1"):
        run_meanflow(**run_kw(data, tmp_path / "c", snapshot_every=0))
    assert not (tmp_path / "c").exists()


def test_stage2_draws_w_pi_and_clips_gradients(data, stage1, tmp_path):
    init = stage1["root"] / "out" / "train_state.pt"
    # a fresh Adam: stage 1's carried moments would move the weights whatever the clipped gradient
    kw = dict(run_kw(data, tmp_path, stage=2, init=init, iterations=4, w_max=2.5, grad_clip=1e-12), ema_decay=0.0,
              carry_optimizer=False)
    summary = run_meanflow(**kw)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert metrics["w_pi"].between(1.0, 2.5).all() and metrics["w_pi"].nunique() == 4
    assert metrics["w_pi"].tolist() == [train.draw_w_pi(TRAIN_KW["seed"], s, 2.5) for s in range(1, 5)]
    assert (metrics["grad_norm"] > 1e-6).all()  # the logged norm is the one before clipping
    assert summary["stage"] == 2 and checkpoints.load_net(tmp_path / "out" / "net_ema.pt")["meta"]["stage"] == 2

    # Clipping to 1e-12 makes Adam's steps ~1e-4 of their unclipped size (the gradient falls
    # far below eps): the model barely leaves its stage-1 start, unlike an unclipped run.
    state = load_state(init)
    net = networks.Precond(**state["init_kwargs"])
    net.load_state_dict(state["model"])
    net.normalize_weights_()  # the first step's projection is not an optimiser update
    start = net.state_dict()
    clipped = load_state(tmp_path / "out" / "train_state.pt")["model"]
    free = tmp_path / "free"
    run_meanflow(**dict(kw, out_dir=free / "out", work_dir=free / "work", grad_clip=None))
    unclipped = load_state(free / "out" / "train_state.pt")["model"]

    def moved(sd):
        return max((sd[k] - start[k]).abs().max().item() for k in start)

    assert moved(unclipped) > 1e-4 and moved(clipped) < 1e-3 * moved(unclipped)


def test_compiled_loss_takes_the_same_steps(data, stage1, tmp_path):
    # Stage 2 draws a new w' every step; the compiled loss must neither recompile for each one
    # nor change the trajectory. The "eager" backend captures the same graphs as inductor but
    # runs them op by op, so the steps agree with the eager loop to rounding.
    init = stage1["root"] / "out" / "train_state.pt"
    kw = run_kw(data, tmp_path / "eager", stage=2, init=init, iterations=4, w_max=2.5, grad_clip=1.0)
    run_meanflow(**kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_meanflow(**dict(kw, out_dir=tmp_path / "compiled" / "out", work_dir=tmp_path / "compiled" / "work",
                                compile="eager"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager, compiled = (pd.read_csv(tmp_path / run / "out" / "metrics.csv") for run in ("eager", "compiled"))
    assert compiled["w_pi"].nunique() == 4 and compiled["w_pi"].tolist() == eager["w_pi"].tolist()
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(compiled[column], eager[column], rtol=1e-5, err_msg=column)
    a, b = (load_state(tmp_path / run / "out" / "train_state.pt")["config"] for run in ("eager", "compiled"))
    assert (a["compile"], b["compile"]) == (None, "eager")  # part of the configuration (and its hash)


def test_stage2_starts_from_stage1_model_and_ema(stage1):
    state = load_state(stage1["root"] / "out" / "train_state.pt")
    start = train_state.load_start(stage1["root"] / "out" / "train_state.pt", stage=2)
    assert all(torch.equal(start.net.state_dict()[k], v) for k, v in state["model"].items())
    assert all(torch.equal(start.ema.state_dict()[k], v) for k, v in state["ema"].items())
    with pytest.raises(ValueError, match="not a Re-MeanFlow train_state.pt"):
        train_state.load_start(stage1["root"] / "out" / "net_ema.pt", stage=2)


def test_stage2_carries_stage1_adam_state_under_its_own_hyperparameters(data, stage1, tmp_path):
    """train.carry_optimizer: stage 2's first step continues stage 1's Adam (moments and step
    count) with stage 2's lr and betas; false: a fresh Adam from zero moments."""
    init = stage1["root"] / "out" / "train_state.pt"
    saved = load_state(init)["optimizer"]
    # train_state.pt keeps stage 1's final Adam state: that of its last checkpoint, step 40
    last = load_state(stage1["root"] / "work" / "ckpt-00000040.pt")["optimizer"]
    assert saved["state"].keys() == last["state"].keys() and len(saved["state"]) > 10
    for i, state in saved["state"].items():
        assert float(state["step"]) == STAGE1_STEPS
        assert all(torch.equal(state[k], last["state"][i][k]) for k in ("exp_avg", "exp_avg_sq")), i
    assert saved["param_groups"][0]["lr"] == TRAIN_KW["lr"] and tuple(saved["param_groups"][0]["betas"]) == (0.9, 0.99)

    lr, (b1, b2) = 5e-4, (0.8, 0.95)  # stage 2's own, unlike stage 1's
    kw = run_kw(data, tmp_path / "carry", stage=2, init=init, iterations=1, checkpoint_every=1, w_max=2.5,
                grad_clip=None, lr=lr, betas=(b1, b2))
    run_meanflow(**kw, carry_optimizer=True)
    run_meanflow(**dict(kw, out_dir=tmp_path / "fresh" / "out", work_dir=tmp_path / "fresh" / "work"),
                 carry_optimizer=False)
    carried, fresh = (load_state(tmp_path / run / "work" / "ckpt-00000001.pt") for run in ("carry", "fresh"))
    assert carried["config"]["carry_optimizer"] is True and fresh["config"]["carry_optimizer"] is False
    for ckpt in (carried, fresh):
        group = ckpt["optimizer"]["param_groups"][0]
        assert group["lr"] == lr and tuple(group["betas"]) == (b1, b2)
    assert (pd.read_csv(tmp_path / "carry" / "out" / "metrics.csv")["lr"] == lr).all()

    # Both runs take the same first gradient g (same start, batch and draws). A fresh Adam after
    # one step holds (1 - b1) g and (1 - b2) g^2 at step 1; the carried one, by hand from stage 1's
    # saved moments m, s: b1 m + (1 - b1) g and b2 s + (1 - b2) g^2 at step 41.
    for i, state in saved["state"].items():
        f, c = fresh["optimizer"]["state"][i], carried["optimizer"]["state"][i]
        assert float(f["step"]) == 1 and float(c["step"]) == STAGE1_STEPS + 1
        g = f["exp_avg"].double() / (1 - b1)
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
        # float32 rounding of the terms (they may cancel): a few ulps of the largest of them
        ulps = 1e-6 * float(torch.cat([m.flatten(), g.flatten()]).abs().max())
        torch.testing.assert_close(f["exp_avg_sq"].double(), (1 - b2) * g * g, rtol=1e-5, atol=ulps ** 2)
        torch.testing.assert_close(c["exp_avg"].double(), b1 * m + (1 - b1) * g, rtol=1e-5, atol=ulps)
        torch.testing.assert_close(c["exp_avg_sq"].double(), b2 * v + (1 - b2) * g * g, rtol=1e-5,
                                   atol=1e-6 * float(torch.cat([v.flatten(), (g * g).flatten()]).max()))
    assert any(state["exp_avg"].abs().max() > 0 for state in saved["state"].values())
    assert not torch.equal(carried["model"]["unet.out_gain"], fresh["model"]["unet.out_gain"])

    # a stage-1 train_state.pt written before it kept the optimiser: a clear error naming the key
    old = load_state(init)
    del old["optimizer"], old[checkpoints.CONTENT_KEY]
    old_init = tmp_path / "old_train_state.pt"
    checkpoints.atomic_torch_save(old, old_init)  # a valid file (digest included) of that older layout
    with pytest.raises(ValueError, match=r"config key train.carry_optimizer is true but .*old_train_state.pt holds "
                                         r"no optimiser state"):
        run_meanflow(**dict(kw, init=old_init, out_dir=tmp_path / "old" / "out", work_dir=tmp_path / "old" / "work"))
    assert not (tmp_path / "old" / "out").exists()


def test_stage2_null_target_reaches_the_loss_and_only_stage2_records_it(data, stage1, tmp_path):
    init = stage1["root"] / "out" / "train_state.pt"
    # step 1 draws w' <= 2 (w = 1: both null-row targets are v), step 2 w' > 2 (w = w' - 1 > 1: they differ)
    w_pi = [train.draw_w_pi(TRAIN_KW["seed"], step, 3.0) for step in (1, 2)]
    assert w_pi[0] <= 2 < w_pi[1]
    kw = run_kw(data, tmp_path / "official", stage=2, init=init, iterations=2, w_max=3.0, grad_clip=None,
                class_dropout=0.5, carry_optimizer=False)
    run_meanflow(**kw)  # the class default: official
    run_meanflow(**dict(kw, out_dir=tmp_path / "plain" / "out", work_dir=tmp_path / "plain" / "work"),
                 null_target="plain")
    official, plain = (pd.read_csv(tmp_path / run / "out" / "metrics.csv") for run in ("official", "plain"))
    assert official["w_pi"].tolist() == plain["w_pi"].tolist() == w_pi
    assert official["loss"][0] == plain["loss"][0] and official["loss"][1] != plain["loss"][1]
    configs = {run: load_state(tmp_path / run / "out" / "train_state.pt")["config"] for run in ("official", "plain")}
    assert configs["official"]["null_target"] == "official" and configs["plain"]["null_target"] == "plain"
    # stage 1's configuration (and so its checkpoints' hash) has neither stage-2 key
    stage1_config = load_state(init)["config"]
    assert "null_target" not in stage1_config and "carry_optimizer" not in stage1_config


def test_bad_arguments_fail_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="train.stage1.w_max must be null"):
        run_meanflow(**run_kw(data, tmp_path, w_max=2.0))
    with pytest.raises(ValueError, match="train.stage2.w_max must be a number >= 1"):
        run_meanflow(**run_kw(data, tmp_path, stage=2))
    with pytest.raises(ValueError, match=r"TrainSettings.compile = 'inductr': must be one of"):
        run_meanflow(**run_kw(data, tmp_path, compile="inductr"))
    with pytest.raises(ValueError, match="jvp='autograd' .* cannot be captured"):
        run_meanflow(**run_kw(data, tmp_path, compile="inductor", jvp="autograd"))
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        run_meanflow(**run_kw(data, tmp_path, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="global batch and must be divisible by the number of processes \\(3\\)"):
        train.check_layout(dict(batch_size=8, jvp="forward"), 3)
    with pytest.raises(ValueError, match="train.compile='inductor' with 2 processes: torch.compile cannot trace"):
        train.check_layout(dict(batch_size=8, jvp="tangent", compile="inductor"), 2)
    train.check_layout(dict(batch_size=8, jvp="tangent", compile="inductor"), 1)
    other = tmp_path / "other.pt"
    checkpoints.save_net(other, networks.build("tiny", img_resolution=16))
    with pytest.raises(ValueError, match=r"couplings are \[2, 8, 8\] but the net in .*other.pt expects \[2, 16, 16\]"):
        run_meanflow(**run_kw(data, tmp_path, init=other))
    with pytest.raises(FingerprintMismatchError, match="'teacher_sha256' is 'a+' in the couplings but '0'"):
        run_meanflow(**run_kw(data, tmp_path, expected_fingerprint={"teacher_sha256": "0"}))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_process_ddp_run_keeps_ranks_in_sync(data, tmp_path):
    """Real 2-rank CPU DDP (gloo) through accelerate launch: global batch 8 = 2 x 4, and both
    ranks end with identical weights (gradients were all-reduced through the DDP wrapper)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(WORKER), str(data["manifest"]), str(data["teacher"]), str(tmp_path / "out"), str(tmp_path / "work"),
           "--iterations", "4", "--checkpoint-every", "2", "--summary", str(tmp_path / "summary.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"summary.json.rank{r}").read_text()) for r in range(2)]
    assert [s["world_size"] for s in ranks] == [2, 2]
    assert ranks[0]["model_sha256"] == ranks[1]["model_sha256"]
    assert pd.read_csv(tmp_path / "out" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    streams = load_state(tmp_path / "work" / "ckpt-00000004.pt")["streams"]
    assert [s["rank"] for s in streams] == [0, 1] and all(s["batch_size"] == 4 for s in streams)
