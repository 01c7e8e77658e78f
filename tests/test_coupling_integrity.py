"""Coupling chunk digests through the real workflow: a finished tiny run is copied, one chunk file
of a published coupling shard is damaged (three flipped bytes, or the file deleted), and stage 1
is retrained. The job must fail, name the shard and the chunk, and publish nothing; following the
error's advice (`--forcerun <shard>`, after moving the shard back to its work path to regenerate
only the bad chunk) repairs the run bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_snakemake

from remeanflow.couplings import store_checksum

pytestmark = pytest.mark.slow

SHARD = "results/tiny/reflow/couplings/shard-00000.zarr"
WORK = "results/tiny/reflow/work/shard-00000.zarr"
STAGE1 = ("train_state.pt", "net_ema.pt", "metrics.csv")
TARGET = "results/tiny/train/stage1/net_ema.pt"


def copy_run(tiny_run, dst: Path) -> tuple[Path, Path]:
    """The finished tiny run in a new workdir, Snakemake's records included, so nothing reruns."""
    workdir, cfg, _ = tiny_run
    shutil.copytree(workdir, dst, symlinks=True)
    # A retrain from scratch: the finished run's work folder would resume at its last step and
    # read no couplings at all (nothing to verify, nothing trained on them).
    shutil.rmtree(dst / "results/tiny/train/work/stage1")
    return dst, dst / cfg.name


def ema_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def retrain_fails(workdir: Path, cfg: Path) -> str:
    """Force stage 1 to retrain on the damaged couplings; returns its log (and Snakemake's output)."""
    stage1 = workdir / "results/tiny/train/stage1"
    sidecars = {p.name: p.read_bytes() for p in stage1.glob("*.provenance.json")}
    assert len(sidecars) == len(STAGE1)
    proc = run_snakemake(workdir, cfg, "--forcerun", "train_stage1", TARGET, check=False)
    assert proc.returncode != 0, "training on a damaged coupling shard must fail"
    assert "Error in rule train_stage1" in proc.stdout + proc.stderr
    # nothing trained on the bad data is published: Snakemake removed the old outputs before the
    # forced job and the job wrote none (outputs are written only after the last step)
    assert [name for name in STAGE1 if (stage1 / name).exists()] == []
    # the sidecars are not Snakemake outputs: those of the previous (good) run stay, unchanged
    assert {p.name: p.read_bytes() for p in stage1.glob("*.provenance.json")} == sidecars
    return (workdir / "results/tiny/logs/train_stage1.log").read_text() + proc.stdout + proc.stderr


def test_flipped_bytes_fail_the_retrain_and_only_the_bad_chunk_is_regenerated(tiny_run, tmp_path):
    workdir, cfg = copy_run(tiny_run, tmp_path / "flip")
    run = workdir / "results/tiny"
    reference = ema_state(run / "train/stage1/net_ema.pt")
    checksum = store_checksum(workdir / SHARD)
    chunk_file = workdir / SHARD / "endpoint/c/1/0/0/0"
    raw = bytearray(chunk_file.read_bytes())
    for k in (100, 1000, 1500):
        raw[k] ^= 0xFF
    chunk_file.write_bytes(bytes(raw))

    log = retrain_fails(workdir, cfg)
    assert f"CorruptChunkError: {SHARD}: corrupt coupling chunk(s) [1] (1 total): chunk 1: endpoint data " \
           "(file endpoint/c/1/0/0/0) differ from the digest recorded when the chunk was written" in log
    assert f"rerun the workflow with `--forcerun {SHARD}`" in log and f"first move {SHARD} to {WORK}" in log

    # the cheap repair the error offers: the job re-verifies the moved store and regenerates chunk 1 only
    (workdir / SHARD).rename(workdir / WORK)
    run_snakemake(workdir, cfg, "--forcerun", SHARD, TARGET)
    shard_log = (run / "logs/couplings_shard/00000.log").read_text()
    assert "shard 0: 1 finished chunk(s) failed their digests and will be regenerated: [1]" in shard_log
    assert "1 chunks generated, 2 were done before" in shard_log
    assert store_checksum(workdir / SHARD) == checksum, "the regenerated shard is bit-identical"
    retrained = ema_state(run / "train/stage1/net_ema.pt")
    assert retrained.keys() == reference.keys() and all(torch.equal(retrained[k], reference[k]) for k in reference)


def test_deleted_chunk_file_fails_the_retrain(tiny_run, tmp_path):
    workdir, cfg = copy_run(tiny_run, tmp_path / "delete")
    run = workdir / "results/tiny"
    reference = ema_state(run / "train/stage1/net_ema.pt")
    checksum = store_checksum(workdir / SHARD)
    (workdir / SHARD / "endpoint/c/1/0/0/0").unlink()

    log = retrain_fails(workdir, cfg)
    assert f"CorruptChunkError: {SHARD}: corrupt coupling chunk(s) [1] (1 total): chunk 1: endpoint chunk file " \
           "endpoint/c/1/0/0/0 is missing (Zarr would have returned fill values)" in log

    # the plain advice: --forcerun the shard; Snakemake deletes it and the job regenerates all of it
    run_snakemake(workdir, cfg, "--forcerun", SHARD, TARGET)
    assert (run / "logs/couplings_shard/00000.log").read_text().count("3 chunks generated, 0 were done before") == 2
    assert store_checksum(workdir / SHARD) == checksum
    retrained = ema_state(run / "train/stage1/net_ema.pt")
    assert all(torch.equal(retrained[k], reference[k]) for k in reference)
