"""GPU assignment of local jobs (`remeanflow.gpus`), the per-process CUDA setup and the process
cap of multi-GPU jobs (`launch.job_processes`), with fake device lists and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from remeanflow import gpus, launch, workflow

REPO = Path(__file__).resolve().parent.parent

# One job: claim `count` devices, record them and when it held them, optionally wait until
# `wait_for` jobs hold devices at the same time, optionally die by SIGKILL while holding them.
JOB = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from remeanflow import gpus
    name, count, out, wait_for, hold, die = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), \\
        float(sys.argv[5]), sys.argv[6] == "die"
    with gpus.claim(count, job=name) as got:
        start = time.time()
        (out / f"{name}.held").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
        deadline = time.time() + 60
        while len(list(out.glob("*.held"))) < wait_for and time.time() < deadline:
            time.sleep(0.05)
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold)
        end = time.time()
    (out / f"{name}.json").write_text(json.dumps(dict(got=got, start=start, end=end, pid=os.getpid(),
                                                      after=os.environ.get("CUDA_VISIBLE_DEVICES"))))
""")


def pool_env(tmp_path: Path, devices: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    return dict(env, PYTHONPATH=str(REPO), REMEANFLOW_GPUS=devices, REMEANFLOW_GPU_POOL=str(tmp_path / "pool"))


def start_job(tmp_path: Path, env: dict, name: str, count: int, *, wait_for: int = 0, hold: float = 0.0,
              die: bool = False) -> subprocess.Popen:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", JOB, name, str(count), str(out), str(wait_for), str(hold),
                             "die" if die else "live"], env=env)


def finish(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(timeout=120) for p in procs]


def records(tmp_path: Path, names) -> dict[str, dict]:
    return {n: json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in names}


def claims_file(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "pool" / "claims.json").read_text())


def test_pool_devices_come_from_the_environment():
    assert gpus.pool_devices({"REMEANFLOW_GPUS": "3, 5", "CUDA_VISIBLE_DEVICES": "0"}) == ["3", "5"]
    assert gpus.pool_devices({"CUDA_VISIBLE_DEVICES": "2,0"}) == ["2", "0"]
    assert gpus.pool_devices({"CUDA_VISIBLE_DEVICES": ""}) == []  # no GPU for this run: no pool
    assert gpus.pool_devices({"REMEANFLOW_GPUS": ""}) == []


def test_concurrent_jobs_get_disjoint_devices(tmp_path):
    env = pool_env(tmp_path, "0,1,2,3,4,5")
    names = ["a", "b", "c"]
    # All three hold their devices at the same time (each waits until all three do).
    assert finish([start_job(tmp_path, env, n, 2, wait_for=3) for n in names]) == [0, 0, 0]
    got = records(tmp_path, names)
    held = [set(got[n]["got"]) for n in names]
    assert all(len(h) == 2 for h in held) and set.union(*held) == {"0", "1", "2", "3", "4", "5"}
    assert [(tmp_path / "out" / f"{n}.held").read_text() for n in names] == [",".join(got[n]["got"]) for n in names]
    assert all(got[n]["after"] is None for n in names)  # the environment is restored on release
    assert claims_file(tmp_path) == {}  # every claim was released


def test_a_job_waits_for_taken_devices(tmp_path):
    env = pool_env(tmp_path, "0,1,2,3")
    names = ["a", "b", "c"]
    assert finish([start_job(tmp_path, env, n, 2, hold=1.5) for n in names]) == [0, 0, 0]
    got = records(tmp_path, names)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            overlap = got[x]["start"] < got[y]["end"] and got[y]["start"] < got[x]["end"]
            if overlap:
                assert not set(got[x]["got"]) & set(got[y]["got"]), (x, y, got)
    # Only two jobs fit at once: the last to start did so after one of the others released.
    last = max(names, key=lambda n: got[n]["start"])
    assert got[last]["start"] >= min(got[n]["end"] for n in names if n != last) - 0.05


def test_a_killed_job_devices_are_reclaimed(tmp_path):
    env = pool_env(tmp_path, "0,1,2")
    victim = start_job(tmp_path, env, "victim", 2, die=True)
    assert finish([victim]) == [-signal.SIGKILL]
    stale = claims_file(tmp_path)
    assert sorted(stale) == ["0", "1"] and {c["pid"] for c in stale.values()} == {victim.pid}
    # A new job asking for all three devices gets them: the dead job's claims are dropped.
    assert finish([start_job(tmp_path, env, "next", 3)]) == [0]
    assert sorted(records(tmp_path, ["next"])["next"]["got"]) == ["0", "1", "2"]
    assert claims_file(tmp_path) == {}


def test_a_claim_of_a_reused_pid_is_stale(tmp_path):
    # Same pid, another start time: another process (the pid was reused).
    directory = tmp_path / "pool"
    directory.mkdir()
    fake = {"pid": os.getpid(), "start": "0", "job": "old"}
    (directory / "claims.json").write_text(json.dumps({"0": fake}))
    assert gpus.try_acquire(["0"], 1, "new", directory) == ["0"]
    assert claims_file(tmp_path)["0"]["job"] == "new"


def test_claim_releases_on_error_and_restores_the_environment(tmp_path):
    env = {"REMEANFLOW_GPUS": "0,1", "REMEANFLOW_GPU_POOL": str(tmp_path / "pool"), "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(KeyError), gpus.claim(1, job="crashing", environ=env) as got:
        assert got == ["0"] and env["CUDA_VISIBLE_DEVICES"] == "0"
        raise KeyError("boom")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and claims_file(tmp_path) == {}
    with gpus.claim(5, job="greedy", environ=env) as got:  # more than the pool: all of it
        assert got == ["0", "1"]


@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "7", "REMEANFLOW_GPUS": "0,1"}, {"REMEANFLOW_GPUS": ""},
                                 {"REMEANFLOW_GPUS": "0"}])
def test_no_pool_under_slurm_without_devices_or_without_a_gpu_request(tmp_path, env):
    env = dict(env, REMEANFLOW_GPU_POOL=str(tmp_path / "pool"))
    count = 0 if env["REMEANFLOW_GPUS"] == "0" else 1
    with gpus.claim(count, job="j", environ=env) as got:
        assert got is None and "CUDA_VISIBLE_DEVICES" not in env
    assert not (tmp_path / "pool").exists()


def test_workflow_step_claims_the_job_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("REMEANFLOW_GPUS", "4,5,6")
    monkeypatch.setenv("REMEANFLOW_GPU_POOL", str(tmp_path / "pool"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    smk = SimpleNamespace(
        log=[str(tmp_path / "job.log")], params=SimpleNamespace(step={"settings": {}, "code": "x"}), config={},
        rule="train_stage1", output=[], input=[], wildcards={}, resources={"gpu": 2}, threads=1,
    )
    with workflow.step(smk, outputs=[]) as s:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5" and s.extra["gpus"] == ["4", "5"]
        assert sorted(claims_file(tmp_path)) == ["4", "5"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and claims_file(tmp_path) == {}


def test_configure_cuda_sets_cudnn_autotuning_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert gpus.configure_cuda("cpu") is False and torch.backends.cudnn.benchmark is False
    assert gpus.configure_cuda(torch.device("cuda", 1)) is True and torch.backends.cudnn.benchmark is True


def test_processes_are_capped_by_the_job_devices(monkeypatch, caplog):
    monkeypatch.setattr(gpus, "visible_cuda_devices", lambda: None)  # no CUDA: the configured count
    assert launch.job_processes(2, 8, keys="train.processes / resources.train.gpu") == 8
    assert launch.job_processes(0, 0, keys="k") == 1
    monkeypatch.setattr(gpus, "visible_cuda_devices", lambda: 4)  # a 4-GPU job asked for 8
    assert launch.job_processes(1, 8, keys="train.processes / resources.train.gpu") == 4
    assert "resources.train.gpu ask for 8 processes but this job has 4 CUDA device(s)" in caplog.text
    assert launch.job_processes(2, 0, keys="k") == 2
    monkeypatch.setattr(gpus, "visible_cuda_devices", lambda: 0)
    with pytest.raises(RuntimeError, match="no device is visible"):
        launch.job_processes(1, 1, keys="k")


def test_a_batch_that_does_not_split_names_the_keys():
    launch.check_split(128, 4, total_key="train.batch_size", keys="train.processes / resources.train.gpu")
    with pytest.raises(ValueError, match=r"train.batch_size = 100 must be divisible .* 3 here .*train.processes / "
                                         r"resources.train.gpu"):
        launch.check_split(100, 3, total_key="train.batch_size", keys="train.processes / resources.train.gpu")


def test_launched_ranks_apply_the_cuda_setup(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"a": 1}))
    code = ("import sys, torch; torch.backends.cudnn.benchmark = False; from remeanflow import launch; "
            "print(launch.read_spec(['m', sys.argv[1]]), torch.cuda.is_available(), torch.backends.cudnn.benchmark)")
    out = subprocess.run([sys.executable, "-c", code, str(spec)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["{'a':", "1}"] and out[2] == out[3]  # autotuning on exactly when CUDA is there
