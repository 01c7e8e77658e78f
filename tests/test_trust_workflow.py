"""Cached digests on the real workflow: a replaced input is hashed again, never described by the
side file or sidecar it outlived (the trust model in docs/architecture.md)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import job_counts, run_snakemake

from remeanflow import provenance
from remeanflow.fileio import read_side_digest, sha256_file

pytestmark = pytest.mark.slow


def test_replaced_teacher_keeping_its_side_file_is_hashed_again_and_reruns_the_couplings(tiny_run, tmp_path):
    src, cfg, _ = tiny_run
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir, symlinks=True)
    run = workdir / "results" / "tiny"
    teacher, side = run / "teacher" / "net.pt", run / "teacher" / "net.pt.sha256"
    old_digest = sha256_file(teacher)
    stale_side = side.read_text()
    shutil.copyfile(run / "teacher" / "guide.pt", teacher)  # another valid net of the same format
    new_digest = sha256_file(teacher)
    assert new_digest != old_digest and side.read_text() == stale_side
    assert read_side_digest(teacher) is None  # the side file describes bytes that are gone

    proc = run_snakemake(workdir, workdir / cfg.name, "results/tiny/reflow/manifest.json")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("couplings_shard") == 2, counts

    manifest = json.loads((run / "reflow" / "manifest.json").read_text())
    recorded = json.dumps(manifest)
    assert new_digest in recorded and old_digest not in recorded
    # every provenance record made by the rerun names the bytes it read
    for shard in sorted((run / "reflow" / "couplings").glob("shard-*.zarr")):
        teacher_inputs = [e for entries in provenance.read(shard)["inputs"].values() for e in entries
                          if e["path"].endswith("teacher/net.pt")]
        assert [e["sha256"] for e in teacher_inputs] == [new_digest], shard
