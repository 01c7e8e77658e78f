"""Overriding settings on the command line and running again: nested --config values, iterations
up and down, resumed jobs that say so, logs that keep earlier attempts, a sharding that cannot
work caught before the teacher, and a second run started while one is active."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
from conftest import job_counts, run_snakemake, snakemake_cmd, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def finished_copy(tiny_run, tmp_path):
    workdir, cfg, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(workdir, dst, symlinks=True)
    return dst, dst / cfg.name, dst / "results" / "tiny"


def test_stage2_iterations_up_and_down_from_the_command_line(finished_copy):
    workdir, cfg, run = finished_copy
    log = run / "logs" / "train_stage2.log"
    first_attempts = log.read_text().count("===== attempt started")

    up = ("--config", "train={stage2: {iterations: 8}}")  # nested: Snakemake passes '8' as a string
    counts = job_counts((lambda p: p.stdout + p.stderr)(run_snakemake(workdir, cfg, "-n", *up)))
    assert counts.get("train_stage2") == 1 and counts.get("evaluate_merge") == 1, counts
    for untouched in ("train_stage1", "couplings_shard", "train_teacher", "init_time_embedding"):
        assert untouched not in counts, (untouched, counts)
    run_snakemake(workdir, cfg, *up)
    text = log.read_text()
    assert "resuming from" in text and "at step 6 of 8" in text  # extends the finished run
    assert text.count("===== attempt started") == first_attempts + 1  # the earlier attempt's lines stay (history)
    assert pd.read_csv(run / "train" / "stage2" / "metrics.csv")["step"].tolist() == list(range(1, 9))

    down = ("--config", "train={stage2: {iterations: 4}}")
    run_snakemake(workdir, cfg, *down)
    text = log.read_text()
    assert "iterations lowered to 4, below the checkpoint's step 8" in text
    assert "training from the start for 4 steps" in text
    assert len(list((run / "train" / "work").glob("stage2.stale-*-step00000008"))) == 1  # archived, not deleted
    assert pd.read_csv(run / "train" / "stage2" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]


def test_too_many_shards_fail_before_the_teacher(tmp_path):
    cfg = write_config(tmp_path, {"couplings": {"num_shards": 100}})
    proc = run_snakemake(tmp_path, cfg, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr + (tmp_path / "results/tiny/logs/preprocess_merge.log").read_text()
    assert "couplings.num_shards" in text and "100 shards for 6 chunks" in text
    assert not (tmp_path / "results/tiny/teacher/net.pt").exists(), "the teacher ran before the sharding check"
    assert not (tmp_path / "results/tiny/data/images.zarr").exists()


def test_a_second_run_is_told_that_another_is_active(tmp_path):
    cfg = write_config(tmp_path)
    first = subprocess.Popen(snakemake_cmd(tmp_path, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any((tmp_path / ".snakemake" / "locks").glob("*.lock")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its locks"
            time.sleep(0.2)
        second = run_snakemake(tmp_path, cfg, check=False, timeout=120)
        assert second.returncode != 0
        assert "ANOTHER SNAKEMAKE RUN IS ACTIVE in this directory" in second.stderr + second.stdout
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:  # Snakemake waits for its running jobs after SIGTERM
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
