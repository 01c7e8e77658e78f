"""Code versions from imports, and runs that move: a finished run driven by a copy of the checkout
in another place has nothing to do; editing one library module there reruns exactly the rules whose
workflow scripts import it (and what depends on their outputs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import copy_checkout, job_counts

pytestmark = pytest.mark.slow


def test_a_moved_run_is_up_to_date_and_a_module_edit_reruns_its_rules(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    repo = copy_checkout(tmp_path / "checkout")
    moved = tmp_path / "moved-run"
    shutil.copytree(workdir, moved, symlinks=True)
    # `python -m` puts the working directory first on sys.path: run from tmp_path so that the
    # copy's package (PYTHONPATH) is the one imported, as an installed copy would be
    env = dict(os.environ, PYTHONPATH=str(repo))

    def dry_run() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(moved),
             "--cores", "1", "-n", "--configfile", str(moved / "test_config.yaml")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    text = dry_run()
    assert "Nothing to be done" in text, text[-3000:]

    module = repo / "remeanflow" / "meanflow.py"  # truncation_threshold lives here
    module.write_text(module.read_text() + "\n# an edit\n")
    counts = job_counts(dry_run())
    for rule in ("couplings_merge", "train_stage1", "train_stage2"):
        assert counts.get(rule) == 1, (rule, counts)
    assert counts.get("evaluate_merge") == 2
    for untouched in ("toy_source", "download_dataset", "preprocess_shard", "preprocess_merge", "train_teacher",
                      "reflow_index", "couplings_shard", "pixel_reference_stats"):
        assert untouched not in counts, (untouched, counts)
