"""Evaluation at paper scale through real Snakemake: Inception weights fetched and checked, provided
reference statistics, sharded sampling and merge, FID independent of the number of shards, and
evaluating an intermediate EMA snapshot by asking for its eval target."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    REPO,
    TINY,
    complete_preset,
    deep_update,
    job_counts,
    run_snakemake,
    write_config,
)
from test_inception import random_inception

from remeanflow import config as rmf_config
from remeanflow import evaluate, fid, provenance
from remeanflow.fileio import sha256_file

pytestmark = pytest.mark.slow

SNAPSHOT = "train/work/stage1/snapshots/ema-step-00000004.pt"
FID_SAMPLES, SHARDS = 6, 2


def _reference_stats(path, seed: int = 0) -> None:
    """Valid 2048-d reference statistics (diagonal covariance: cheap to make and to check)."""
    rng = np.random.default_rng(seed)
    fid.save_stats(path, rng.standard_normal(2048) * 0.1, np.diag(rng.uniform(0.5, 2.0, 2048)))


@pytest.fixture(scope="module")
def eval_run(tiny_run, tmp_path_factory):
    """The tiny run's results (all but its checkpoint evaluations) in a new folder, plus an EMA snapshot at
    step 4 (copied from the final one when training did not write snapshots), evaluated with random
    Inception weights (fetched through file://, sha256 checked) and provided reference statistics."""
    _, _, src = tiny_run
    workdir = tmp_path_factory.mktemp("eval_run")
    run = workdir / "results" / "tiny"
    # Everything but the evaluations of checkpoints (held-out couplings and pixel statistics are reused).
    shutil.copytree(src, run, ignore=lambda d, names: [n for n in names if n.startswith("stage")]
                    if d == str(src / "eval") else [])
    snapshot = run / SNAPSHOT
    if not snapshot.is_file():
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "train" / "stage1" / "net_ema.pt", snapshot)
    weights = workdir / "inputs" / "pt_inception-random.pth"
    weights.parent.mkdir()
    torch.save(random_inception(0).state_dict(), weights)
    ref = workdir / "inputs" / "ref_stats.npz"
    _reference_stats(ref)
    overrides = {"evaluate": {
        "fid_samples": FID_SAMPLES, "shards": SHARDS, "ref_stats": {"source": str(ref), "sha256": None},
        "inception": {"weights": weights.as_uri(), "sha256": sha256_file(weights)},
    }}
    cfg = write_config(workdir, overrides)
    proc = run_snakemake(workdir, cfg, "results/tiny/eval/stage1-step000004/metrics.json")
    return dict(workdir=workdir, run=run, cfg=cfg, weights=weights, ref=ref, snapshot=snapshot,
                stdout=proc.stdout + proc.stderr)


def test_snapshot_evaluation_reports_fid_over_exactly_the_configured_samples(eval_run):
    run = eval_run["run"]
    counts = job_counts(eval_run["stdout"])
    assert counts["evaluate_shard"] == SHARDS and counts["evaluate_merge"] == 1
    assert counts["fetch_inception"] == 1 and counts["fid_reference_stats"] == 1
    for upstream in ("train_stage1", "heldout_couplings", "pixel_reference_stats"):
        assert upstream not in counts, upstream  # nothing upstream reran

    metrics = json.loads((run / "eval" / "stage1-step000004" / "metrics.json").read_text())
    sampled = metrics["sampled"]
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and metrics["fid"] == sampled["fid"]
    assert sampled["num_samples"] == FID_SAMPLES and sampled["num_shards"] == SHARDS
    assert evaluate.FID_SKIPPED not in metrics["notes"] and sampled["fd_pixels"] > 0
    assert sampled["inception_sha256"] == sha256_file(eval_run["weights"])
    assert metrics["checkpoints"]["net"] == sha256_file(eval_run["snapshot"]) == sampled["net_sha256"]
    assert sorted(p.name for p in (run / "eval" / "stage1-step000004" / "shards").glob("*.npz")) == [
        "shard-00000.npz", "shard-00001.npz"]
    # The weights and the provided statistics were fetched and checked into the run.
    assert sha256_file(run / "fid" / "inception.pth") == sha256_file(eval_run["weights"])
    assert sha256_file(run / "fid" / "ref_stats.npz") == sha256_file(eval_run["ref"])
    # Provenance names the snapshot as the evaluated net.
    side = provenance.read(run / "eval" / "stage1-step000004" / "metrics.json")
    assert side["rule"] == "evaluate_merge" and side["wildcards"] == {"ckpt": "stage1-step000004"}
    assert side["inputs"]["net"][0]["path"].endswith(SNAPSHOT)


def test_fid_of_one_shard_equals_the_sharded_workflow(eval_run, tmp_path):
    run = eval_run["run"]
    seed = yaml.safe_load((REPO / "config.yaml").read_text())["evaluate"]["seed"]
    one = tmp_path / "one.npz"
    evaluate.sample_shard(eval_run["snapshot"], one, shard=0, num_shards=1, num_samples=FID_SAMPLES, seed=seed,
                          num_classes=TINY["dataset"]["toy"]["num_classes"], inception_weights=eval_run["weights"],
                          device="cpu", progress=False)
    got = evaluate.sampled_metrics([one], num_samples=FID_SAMPLES, inception_ref=eval_run["ref"])
    metrics = json.loads((run / "eval" / "stage1-step000004" / "metrics.json").read_text())
    assert got["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert got["class_counts"] == metrics["sampled"]["class_counts"]


def test_final_and_missing_checkpoints_and_no_weights(eval_run, tiny_run):
    # The toy default has no Inception weights: the session run's metrics say FID was skipped and
    # still carry the sharded pixel distance over fid_samples samples.
    _, _, plain = tiny_run
    metrics = json.loads((plain / "eval" / "stage1" / "metrics.json").read_text())
    assert metrics["fid"] is None and evaluate.FID_SKIPPED in metrics["notes"]
    assert metrics["sampled"]["num_samples"] > 0 and metrics["sampled"]["fd_pixels"] > 0
    # A snapshot that was never written is a clear error naming it, before anything runs.
    proc = run_snakemake(eval_run["workdir"], eval_run["cfg"], "-n", "results/tiny/eval/stage1-step000999/metrics.json",
                         check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "MissingInputException" in out and "train/work/stage1/snapshots/ema-step-00000999.pt" in out
    # The final EMA net is evaluated from train/<stage>/net_ema.pt by the same rules.
    proc = run_snakemake(eval_run["workdir"], eval_run["cfg"], "-n", "results/tiny/eval/stage2/metrics.json")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["evaluate_shard"] == SHARDS and counts["evaluate_merge"] == 1 and "fetch_inception" not in counts


def test_bad_provided_reference_statistics_fail_naming_the_file(tmp_path):
    bad = tmp_path / "asymmetric.npz"
    _reference_stats(bad)
    with np.load(bad) as data:
        sigma = data["sigma"].copy()
    sigma[0, 1] = 1.0
    np.savez(bad, mu=np.zeros(2048), sigma=sigma)
    cfg = write_config(tmp_path, {"evaluate": {"ref_stats": {"source": str(bad), "sha256": None}}})
    proc = run_snakemake(tmp_path, cfg, "results/tiny/fid/ref_stats.npz", check=False)
    assert proc.returncode != 0
    log = (tmp_path / "results" / "tiny" / "logs" / "fid_reference_stats.log").read_text()
    assert "asymmetric.npz" in log and "sigma is not symmetric" in log
    assert not (tmp_path / "results" / "tiny" / "fid" / "ref_stats.npz").exists()


def test_evaluate_config_keys_are_validated():
    base = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    rmf_config.validate(base)
    for bad, key in [({"inception": {"weigths": "x", "weights": None, "sha256": None}}, "evaluate.inception.weigths"),
                     ({"fid_sample": 10}, "evaluate.fid_sample"),
                     ({"ref_stats": {"source": None, "sha256": "abc"}}, "evaluate.ref_stats.sha256"),
                     ({"shards": 0}, "evaluate.shards")]:
        with pytest.raises(rmf_config.ConfigError, match=re.escape(key)):
            rmf_config.validate(deep_update(base, {"evaluate": bad}))


@pytest.mark.parametrize("preset", ["imagenet64", "imagenet512"])
def test_preset_dry_run_shards_the_evaluation(preset, tmp_path):
    proc = run_snakemake(tmp_path, None, "-n", "--configfile", str(REPO / "presets" / f"{preset}.yaml"),
                         str(complete_preset(tmp_path, preset)))
    counts = job_counts(proc.stdout + proc.stderr)
    shards = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())["evaluate"]["shards"]
    assert counts["evaluate_shard"] == 2 * shards and counts["evaluate_merge"] == 2
    assert counts["fetch_inception"] == 1 and counts["fid_reference_stats"] == 1
