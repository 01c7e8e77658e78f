"""`python -m remeanflow status`: stage states, coupling shard counts, training progress and the
time left, from hand-made run folders (fast) and from copies of the real tiny run made to look
killed mid-shard and mid-training."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
import zarr

from remeanflow import couplings as C
from remeanflow import reflow_index as R
from remeanflow import status as S
from remeanflow.provenance import sidecar_path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY, deep_update  # noqa: E402
from couplings_worker import SHARD_KW, toy_generate  # noqa: E402

METRICS_HEADER = ["step", "loss", "mse", "w_pi", "lr", "grad_norm", "samples_per_s", "kept_fraction"]


def cli(argv: list[str]) -> int:
    """`python -m remeanflow status ...` as the lead wires it: `add_parser` on a subparsers object."""
    parser = argparse.ArgumentParser(prog="remeanflow")
    S.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def status_json(capsys, *argv: str) -> dict:
    assert cli(["status", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def output(run: Path, rel: str, sidecar: dict | None = None, content: str = "x") -> Path:
    """A finished output: the file and its provenance sidecar (`sidecar`, or a stand-in)."""
    path = run / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    sidecar_path(path).write_text(json.dumps(sidecar or {"rule": "test"}))
    return path


def bare(run: Path, rel: str, content: str = "x") -> Path:
    """An output written without its sidecar yet (the job has not finished)."""
    path = run / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def write_metrics(path: Path, steps: int, samples_per_s: float = 100.0, partial_line: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRICS_HEADER)
        for s in range(1, steps + 1):
            w.writerow([s, 1.0 / s, 2.0 / s, 1.0, 1e-3, 0.5, samples_per_s, 1.0])
        if partial_line:
            f.write(f"{steps + 1},0.12")  # a row being written when the status is taken


def by_key(status: dict) -> dict:
    return {s["key"]: s for s in status["stages"]}


def training(status: dict, stage: str) -> dict:
    return next(t for t in status["training"] if t["stage"] == stage)


def tiny_config(tmp_path: Path, **overrides) -> dict:
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(deep_update(TINY, overrides)))
    return S.load_config([f])


@pytest.fixture
def run(tmp_path):
    path = tmp_path / "work" / "results" / "tiny"
    (path / "logs").mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------
# Stage states from files.


def test_a_fresh_run_is_all_pending(run):
    st = S.collect(run)
    assert st["summary"] == {"done": 0, "running": 0, "pending": len(st["stages"])} and not st["complete"]
    keys = [s["key"] for s in st["stages"]]
    assert keys == ["dataset", "teacher", "reflow_index", "couplings", "couplings_merge", "time_embedding", "stage1",
                    "stage2", "eval_inputs", "eval_stage1", "eval_stage2", "report"]
    assert [t["stage"] for t in st["training"]] == ["stage1", "stage2"]
    assert all(t["iterations"] is None and t["step"] is None for t in st["training"])


def test_done_needs_the_sidecar_and_temporaries_mean_running(run):
    output(run, "time_emb/fit.json")
    bare(run, "time_emb/net.pt")  # written, sidecar not yet: the job is finishing
    st = by_key(S.collect(run))["time_embedding"]
    assert st["state"] == "running" and st["missing"] == ["time_emb/net.pt"]
    assert any("sidecar not yet" in e for e in st["evidence"])
    sidecar_path(run / "time_emb/net.pt").write_text("{}")
    assert by_key(S.collect(run))["time_embedding"]["state"] == "done"

    # atomic_path's temporary of an output being written
    (run / "reflow").mkdir()
    (run / "reflow" / f".manifest.json.tmp{os.getpid()}").write_text("{")
    merge = by_key(S.collect(run))["couplings_merge"]
    assert merge["state"] == "running" and "temporary" in merge["evidence"][0]


def test_logs_recent_failed_and_idle(run):
    log = run / "logs" / "reflow_index.log"
    log.write_text("===== attempt started x (pid 1) =====\nINFO remeanflow: rule reflow_index started\n")
    assert by_key(S.collect(run))["reflow_index"]["state"] == "running"  # being written now
    old = time.time() - 2 * S.RECENT_LOG_S
    os.utime(log, (old, old))
    assert by_key(S.collect(run))["reflow_index"]["state"] == "pending"  # an old log is no work in progress
    log.write_text(log.read_text() + "ERROR remeanflow: rule reflow_index failed\n")
    st = by_key(S.collect(run))["reflow_index"]
    assert st["state"] == "pending" and "failed" in st["notes"][0]

    # running work not updated for long: flagged idle
    work = run / "train" / "work" / "stage1"
    write_metrics(work / "metrics.csv", 3)
    hour_ago = time.time() - 3600
    os.utime(work / "metrics.csv", (hour_ago, hour_ago))
    st = by_key(S.collect(run))["stage1"]
    assert st["state"] == "running" and st["updated_age_s"] == pytest.approx(3600, abs=60)
    assert any("no update for 1h 00m" in n for n in st["notes"])


def test_snakemake_incomplete_markers_locks_and_log(run):
    workdir = run.parent.parent
    smk = workdir / ".snakemake"
    key = "results/tiny/train/stage2/metrics.csv"
    marker = smk / "incomplete" / base64.urlsafe_b64encode(key.encode()).decode()
    marker.parent.mkdir(parents=True)
    marker.write_text('{"external_jobid": null}')
    # a long path: Snakemake splits the encoded name into '@'-prefixed folders
    long_key = "results/tiny/eval/stage1-step00000004/shards/shard-00000.npz"
    enc = base64.urlsafe_b64encode(long_key.encode()).decode()
    split = smk / "incomplete" / ("@" + enc[:10]) / ("@" + enc[10:30]) / enc[30:]
    split.parent.mkdir(parents=True)
    split.write_text("{}")
    assert S.decode_marker(smk / "incomplete", split) == long_key
    other = smk / "incomplete" / base64.urlsafe_b64encode(b"results/other/x.pt").decode()
    other.write_text("{}")  # another run's output: not this run's business
    (smk / "locks").mkdir()
    (smk / "locks" / "0.output.lock").write_text(f"{workdir}/results/tiny/train/stage2/metrics.csv\n")
    (smk / "log").mkdir()
    cfg_file = workdir / "my.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    (smk / "log" / "2026-01-01T000000.000000.snakemake.log").write_text(
        f"  Command: snakemake --cores 2 --configfile {cfg_file}\n"
        f"  Config file(s): [PosixPath('{cfg_file}'), '{S.REPO_CONFIG}']\n"
        "rule train_stage2:\n    output: results/tiny/train/stage2/metrics.csv\n13 of 25 steps (52%) done\n")
    (run / "eval" / "stage1-step00000004" / "shards").mkdir(parents=True)

    st = S.collect(run)
    assert st["snakemake"]["incomplete"] == [long_key[len("results/tiny/"):], key[len("results/tiny/"):]]
    assert st["snakemake"]["locked"] and st["snakemake"]["steps_done"] == 13 and st["snakemake"]["steps_total"] == 25
    assert "running" in st["snakemake"]["outcome"]
    stages = by_key(st)
    assert stages["stage2"]["state"] == "running" and "incomplete" in stages["stage2"]["evidence"][0]
    assert stages["eval_stage1-step00000004"]["state"] == "running"
    assert stages["eval_stage1"]["state"] == "pending"  # eval/stage1 is not eval/stage1-step...
    # the config files that Snakemake's log names are this run's configuration
    assert st["config"].startswith("my.yaml + config.yaml (from Snakemake's log")
    assert training(st, "stage2")["iterations"] == 6 and training(st, "stage2")["iterations_source"] == "config"
    text = S.format_text(st)
    assert "13 of 25 jobs done" in text and "locks held" in text


# ----------------------------------------------------------------------------------------------
# Coupling shards.


def make_index(run: Path, num_samples: int = 60) -> Path:
    index = run / "reflow" / "index.zarr"
    R.build_index(index, mode="random", num_samples=num_samples, num_classes=4, seed=0)
    sidecar_path(index).write_text("{}")
    return index


def test_shard_counts_from_completion_masks(run, tmp_path):
    index = make_index(run)  # 60 samples in chunks of 4: shard 0 of 2 has 7 chunks, shard 1 has 8
    done = run / "reflow" / "couplings" / "shard-00000.zarr"
    C.create_shard_store(done, index_store=index, shard=0, num_shards=2, **SHARD_KW)
    C.generate_shard(done, toy_generate, progress=False)
    sidecar_path(done).write_text("{}")
    work = run / "reflow" / "work" / "shard-00001.zarr"
    C.create_shard_store(work, index_store=index, shard=1, num_shards=2, **SHARD_KW)
    C.generate_shard(work, toy_generate, rank=0, world_size=3, progress=False)  # chunks 0, 3, 6: a killed job
    assert C.completion_mask(work).sum() == 3

    st = S.collect(run)  # no config: the shard count comes from the stores
    shards = {r["shard"]: r for r in st["shards"]}
    assert (shards[0]["state"], shards[0]["chunks_done"], shards[0]["chunks_total"], shards[0]["where"]) == \
        ("done", 7, 7, "couplings")
    assert (shards[1]["state"], shards[1]["chunks_done"], shards[1]["chunks_total"], shards[1]["where"]) == \
        ("running", 3, 8, "work")
    stage = by_key(st)["couplings"]
    assert stage["state"] == "running" and stage["detail"] == "shards 1/2, chunks 10/15"
    assert stage["missing"] == ["reflow/couplings/shard-00001.zarr"]
    assert by_key(st)["couplings_merge"]["state"] == "pending"

    # with a config of 3 shards, the third is pending and its total comes from the index
    cfg = tiny_config(tmp_path, couplings={"num_shards": 3, "batch": 4})
    st = S.collect(run, cfg)
    assert [(r["shard"], r["state"], r["chunks_done"], r["chunks_total"]) for r in st["shards"]][2] == \
        (2, "pending", 0, 5)
    text = S.format_text(st)
    assert "00001  running  3/8     work" in text and "00002  pending  0/5" in text


def test_a_damaged_store_is_reported_not_fatal(run):
    make_index(run)
    bad = run / "reflow" / "work" / "shard-00000.zarr"
    bad.mkdir(parents=True)
    (bad / "zarr.json").write_text("{not json")
    st = S.collect(run)
    (row,) = st["shards"]
    assert row["state"] == "running" and row["error"] and row["chunks_done"] is None
    assert "?/?" in S.format_text(st)


# ----------------------------------------------------------------------------------------------
# Training.


def test_training_progress_iterations_and_time_left(run, tmp_path):
    work = run / "train" / "work" / "stage1"
    for step in (40, 50):
        (work / f"ckpt-{step:08d}.pt").parent.mkdir(parents=True, exist_ok=True)
        (work / f"ckpt-{step:08d}.pt").write_bytes(b"")
    write_metrics(work / "metrics.csv", 57, samples_per_s=100.0, partial_line=True)

    # no config, no log: iterations unknown, no time left
    st = S.collect(run)
    t = training(st, "stage1")
    assert (t["state"], t["step"], t["checkpoint_step"], t["iterations"], t["eta_s"]) == ("running", 57, 50, None, None)
    assert t["last_loss"] == pytest.approx(1 / 57) and t["samples_per_s"] == pytest.approx(100.0)
    assert any("iterations unknown" in n for n in by_key(st)["stage1"]["notes"])
    assert "unknown" in S.format_text(st)

    # with the config: 300 iterations, batch 8 at 100 samples/s = 0.08 s per step
    cfg = tiny_config(tmp_path, train={"stage1": {"iterations": 300}})
    t = training(S.collect(run, cfg), "stage1")
    assert (t["iterations"], t["iterations_source"], t["remaining_steps"]) == (300, "config", 243)
    assert t["step_s"] == pytest.approx(0.08) and t["eta_s"] == pytest.approx(243 * 0.08)

    # the running job's log says what it trains to: it wins over the config (and the difference is named)
    (run / "logs" / "train_stage1.log").write_text(
        "===== attempt started a (pid 1) =====\n... stage 1: training from the start for 100 steps (work ...)\n"
        "===== attempt started b (pid 2) =====\n"
        "... INFO remeanflow.train: stage 1: resuming from x/ckpt-00000050.pt at step 50 of 400\n")
    st = S.collect(run, cfg)
    t = training(st, "stage1")
    assert (t["iterations"], t["iterations_source"]) == (400, "log")
    assert any("configuration says 300 iterations, the job's log 400" in n for n in by_key(st)["stage1"]["notes"])
    assert by_key(st)["stage1"]["detail"] == "step 57/400, checkpoint 50"


def test_time_left_from_checkpoint_times_without_batch_size(run):
    work = run / "train" / "work" / "stage2"
    write_metrics(work / "metrics.csv", 20)
    now = time.time()
    for step, age in ((10, 30.0), (20, 10.0)):  # 10 steps in 20 s
        p = work / f"ckpt-{step:08d}.pt"
        p.write_bytes(b"not a checkpoint")  # unreadable: no batch size from it either
        os.utime(p, (now - age, now - age))
    (run / "logs" / "train_stage2.log").write_text("stage 2: training from the start for 50 steps (work folder w)\n")
    t = training(S.collect(run, now=now), "stage2")
    assert t["step_time_source"] == "checkpoint times" and t["step_s"] == pytest.approx(2.0)
    assert t["remaining_steps"] == 30 and t["eta_s"] == pytest.approx(60.0)


def test_a_finished_stage_reads_its_sidecar(run):
    sidecar = {"config": {"train": {"batch_size": 8, "stage1": {"iterations": 12}}}}
    for name in ("train_state.pt", "net_ema.pt"):
        output(run, f"train/stage1/{name}", sidecar)
    write_metrics(run / "train" / "stage1" / "metrics.csv", 12, samples_per_s=50.0)
    sidecar_path(run / "train" / "stage1" / "metrics.csv").write_text(json.dumps(sidecar))
    st = S.collect(run)
    t = training(st, "stage1")
    assert (t["state"], t["step"], t["iterations"], t["iterations_source"], t["remaining_steps"]) == \
        ("done", 12, 12, "sidecar", 0)
    assert t["batch_size"] == 8 and t["batch_size_source"] == "sidecar"
    # stage 2 has started (a checkpoint): running; what depends on stage 1 is not
    (run / "train" / "work" / "stage2").mkdir(parents=True)
    (run / "train" / "work" / "stage2" / "ckpt-00000004.pt").write_bytes(b"")
    assert by_key(S.collect(run))["stage2"]["state"] == "running"


# ----------------------------------------------------------------------------------------------
# Command line.


def test_command_line(run, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="remeanflow")
    S.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--help"])
    help_text = capsys.readouterr().out
    assert "Summarise where a run" in help_text and "--configfile" in help_text and "--json" in help_text

    monkeypatch.chdir(run.parent.parent)  # the workflow's working directory
    st = status_json(capsys)  # the only run under results/
    assert st["run_dir"] == "results/tiny" and set(st) >= {"stages", "shards", "training", "summary", "snakemake"}
    assert cli(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run: results/tiny") and "STAGE" in out and "TIME LEFT" in out

    (run.parent / "other").mkdir()
    assert cli(["status"]) == 2
    err = capsys.readouterr().err
    assert "several runs" in err and "results/other" in err and "results/tiny" in err
    assert cli(["status", "results"]) == 2  # the folder of the runs, not a run
    assert "holds runs, not a run; name one: results/tiny" in capsys.readouterr().err
    assert cli(["status", "results/nope"]) == 2

    # --configfile takes several files; a run folder after it is still the run folder
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_name": "tiny", "train": {"stage1": {"iterations": 77}}}))
    st = status_json(capsys, "--configfile", str(cfg), "results/tiny")
    assert st["run_dir"] == "results/tiny" and training(st, "stage1")["iterations"] == 77
    st = status_json(capsys, "--configfile", str(cfg))  # the run is <results_dir>/<run_name> of the config
    assert st["run_dir"] == "results/tiny" and str(cfg) in st["config"]
    cfg.write_text("train: {stage1: {iterations: -1}}")
    assert cli(["status", "--configfile", str(cfg)]) == 2
    assert "train.stage1.iterations" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The real tiny run: finished, then copies made to look killed.


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def copy_run(tiny_run, dst: Path) -> Path:
    workdir, _, run = tiny_run
    shutil.copytree(workdir, dst, symlinks=True)
    return dst / run.relative_to(workdir)


def remove_output(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    sidecar_path(path).unlink()


def test_finished_tiny_run_is_complete_and_untouched(tiny_run, capsys, monkeypatch):
    workdir = tiny_run[0]
    before = snapshot(workdir)
    monkeypatch.chdir(workdir)
    st = status_json(capsys)
    assert st["complete"] and st["summary"]["running"] == st["summary"]["pending"] == 0
    assert [(r["state"], r["chunks_done"], r["chunks_total"]) for r in st["shards"]] == [("done", 3, 3)] * 2
    assert [(t["step"], t["iterations"], t["iterations_source"]) for t in st["training"]] == \
        [(8, 8, "sidecar"), (6, 6, "sidecar")]
    # other tests may have run Snakemake in the shared run since (dry runs, up-to-date runs)
    assert st["snakemake"]["outcome"] in ("finished", "nothing to do") and not st["snakemake"]["locked"]
    assert st["config"].startswith("test_config.yaml + config.yaml")
    assert snapshot(workdir) == before  # status reads, never writes


def test_tiny_run_killed_mid_shard(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "killed_shard")
    published = run / "reflow" / "couplings" / "shard-00001.zarr"
    work = run / "reflow" / "work" / "shard-00001.zarr"
    sidecar_path(published).unlink()
    published.rename(work)  # back where the job builds it
    zarr.open_group(str(work), mode="r+")["done"][1] = False  # chunk 1 was being generated when killed
    remove_output(run / "reflow" / "manifest.json")

    st = status_json(capsys, str(run))
    shards = {r["shard"]: r for r in st["shards"]}
    assert (shards[0]["state"], shards[0]["chunks_done"], shards[0]["chunks_total"]) == ("done", 3, 3)
    assert (shards[1]["state"], shards[1]["where"], shards[1]["chunks_done"], shards[1]["chunks_total"]) == \
        ("running", "work", 2, 3)
    stages = by_key(st)
    assert stages["couplings"]["state"] == "running" and stages["couplings"]["detail"] == "shards 1/2, chunks 5/6"
    assert stages["couplings_merge"]["state"] == "pending"
    assert any("upstream not done" in n for n in stages["stage1"]["notes"])
    assert cli(["status", str(run)]) == 0
    assert "00001  running  2/3     work" in capsys.readouterr().out


def test_tiny_run_killed_mid_training(tiny_run, tmp_path, capsys):
    cfg = tiny_run[1]
    run = copy_run(tiny_run, tmp_path / "killed_train")
    for name in ("train_state.pt", "net_ema.pt", "metrics.csv"):
        remove_output(run / "train" / "stage2" / name)
    for rel in ("eval/stage2", "report"):
        shutil.rmtree(run / rel)
    wdir = run / "train" / "work" / "stage2"
    (wdir / "ckpt-00000006.pt").unlink()  # killed after step 5: the newest checkpoint is step 4
    lines = (wdir / "metrics.csv").read_text().splitlines()
    (wdir / "metrics.csv").write_text("\n".join(lines[:6]) + "\n")  # header + steps 1..5
    smk = run.parent.parent / ".snakemake"
    for name in ("train_state.pt", "net_ema.pt", "metrics.csv"):  # what a SIGKILLed Snakemake leaves
        key = f"results/tiny/train/stage2/{name}"
        (smk / "incomplete" / base64.urlsafe_b64encode(key.encode()).decode()).write_text("{}")

    st = status_json(capsys, str(run))
    stages = by_key(st)
    assert [stages[k]["state"] for k in ("couplings", "stage1", "stage2", "eval_stage1", "eval_stage2", "report")] == \
        ["done", "done", "running", "done", "pending", "pending"]
    t = training(st, "stage2")
    assert (t["state"], t["step"], t["checkpoint_step"], t["iterations"], t["iterations_source"]) == \
        ("running", 5, 4, 6, "log")  # "training from the start for 6 steps"
    assert t["remaining_steps"] == 1 and t["eta_s"] is not None and t["eta_s"] > 0
    assert t["batch_size"] == 8 and t["last_loss"] is not None and t["samples_per_s"] > 0
    assert len(st["snakemake"]["incomplete"]) == 3
    assert stages["stage2"]["detail"] == "step 5/6, checkpoint 4"

    # without the log, the config given on the command line says how many iterations
    (run / "logs" / "train_stage2.log").unlink()
    st = status_json(capsys, str(run), "--configfile", str(cfg))
    t = training(st, "stage2")
    assert (t["iterations"], t["iterations_source"], t["remaining_steps"]) == (6, "config", 1)
    assert cli(["status", str(run), "--configfile", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "stage 2         running  step 5/6, checkpoint 4" in out
    assert "stage2  running  5     4           6 (config)" in out
