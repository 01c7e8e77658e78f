"""The ablation DAG (rules/ablations.smk, remeanflow/ablations.py): real Snakemake runs on the TINY
config, and the data-trained baseline's stream (remeanflow/data_stream.py)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import job_counts, run_snakemake, write_config

from remeanflow import ablations, data_stream

REDUCED = ["full", "data", "truncation-1.0", "heun-2"]


def test_dry_run_lists_every_variant_and_all_has_no_ablation_job(tmp_path):
    cfg = write_config(tmp_path)
    text = (lambda p: p.stdout + p.stderr)(run_snakemake(tmp_path, cfg, "-n", "ablations"))
    names = ablations.available()
    assert len(names) >= 15 and {"full", "full-seed1", "data", "data-seed1", "truncation-1.0", "heun-16"} <= set(names)
    assert f"ablation summary of {len(names)} variants: {', '.join(names)}" in text
    counts = job_counts(text)
    # one teacher, one base coupling set, one held-out set whatever the number of variants
    for rule in ("train_teacher", "reflow_index", "couplings_merge", "heldout_couplings", "ablation_heldout_reference"):
        assert counts.get(rule) == 1, (rule, counts)
    default = job_counts((lambda p: p.stdout + p.stderr)(run_snakemake(tmp_path, cfg, "-n")))
    assert not any(rule.startswith("ablation") for rule in default), default


def test_the_data_overlay_run_alone_trains_on_the_images_without_making_couplings(tmp_path):
    """presets/ablations/data.yaml as the run's own overlay: the training rules read data/images.zarr,
    and nothing upstream of the trained net makes couplings."""
    cfg = write_config(tmp_path)
    target = "results/tiny/train/stage2/net_ema.pt"
    overlay = str(ablations.REPO / "presets" / "ablations" / "data.yaml")
    def dry_jobs(*configfiles):
        proc = run_snakemake(tmp_path, None, "-n", target, "--configfile", *map(str, configfiles))
        return job_counts(proc.stdout + proc.stderr)

    data, couplings = dry_jobs(cfg, overlay), dry_jobs(cfg)
    assert data.get("train_stage2") == 1 and data.get("preprocess_merge") == 1, data
    assert not {"reflow_index", "couplings_shard", "couplings_merge"} & set(data), data
    assert couplings.get("couplings_merge") == 1, couplings  # the same target with couplings needs them


def test_seed_replicas_repeat_their_variant_with_only_the_training_seed_changed():
    """An overlay `<name>-seed<N>` is a copy of `<name>.yaml` plus `train.seed: N`; a change to the
    variant that its replica misses would compare two different methods under one name."""
    def overlay(name):
        return yaml.safe_load((ablations.REPO / ablations.overlay_path(name)).read_text()) or {}

    replicas = [n for n in ablations.available() if re.fullmatch(r".+-seed\d+", n)]
    assert {"full-seed1", "data-seed1", "no-tuned-hyperparameters-seed1", "uniform-t-seed1"} <= set(replicas)
    for name in replicas:
        base, seed = name.rsplit("-seed", 1)
        assert overlay(name) == ablations.rmf_config.merge(overlay(base), {"train": {"seed": int(seed)}}), name


def test_an_overlay_that_changes_the_teacher_is_refused(tmp_path):
    cfg = write_config(tmp_path, {"ablations": {"variants": ["nonexistent"]}})
    proc = run_snakemake(tmp_path, cfg, "-n", "ablations", check=False)
    assert proc.returncode != 0 and "presets/ablations/nonexistent.yaml does not exist" in proc.stdout + proc.stderr
    # an overlay may change training-side settings only: the variants share the teacher
    (tmp_path / "presets" / "ablations").mkdir(parents=True)
    (tmp_path / "presets" / "ablations" / "bad.yaml").write_text("teacher: {train: {steps: 500}}\n")
    base = ablations.rmf_config.validate({})
    with pytest.raises(ablations.AblationError, match="bad.yaml changes the settings of rule train_teacher"):
        ablations.Plan(base, ["bad"], repo=tmp_path)


def test_reduced_ablation_shares_upstream_jobs_and_writes_the_table(tmp_path):
    cfg = write_config(tmp_path, {"ablations": {"variants": REDUCED, "checkpoint": "stage1"}})
    proc = run_snakemake(tmp_path, cfg, "ablations", timeout=900)
    counts = job_counts(proc.stdout + proc.stderr)
    for rule in ("train_teacher", "couplings_merge", "init_time_embedding", "heldout_couplings", "train_stage1"):
        assert counts.get(rule) == 1, (rule, counts)  # shared: once for all variants (full is the base run)
    assert counts["couplings_shard"] == 2  # the base set's shards
    assert counts["ablation_couplings_shard"] == 2  # heun-2's own set; no other variant needs one
    assert counts["ablation_couplings_merge"] == 2  # heun-2, and truncation-1.0 over the base shards
    assert counts["ablation_train_stage1"] == 3 and "train_stage2" not in counts  # checkpoint: stage1
    assert "ablation_init_time_embedding" not in counts

    run = tmp_path / "results" / "tiny"
    with open(run / "ablations" / "summary.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == REDUCED
    assert rows["full"]["artifacts"] == "the base run's"
    assert rows["data"]["trained_on"].startswith("data/images.zarr") and rows["data"]["endpoint_mse_vs_ref"] == ""
    assert rows["truncation-1.0"]["couplings_kept"] == "1" and float(rows["full"]["couplings_kept"]) < 1
    assert rows["heun-2"]["artifacts"] == "own shards, manifest, stage1" and rows["heun-2"]["heun_steps"] == "2"
    # the same 3-step sampler (full, truncation-1.0) has one endpoint error; 2 steps another
    assert rows["full"]["endpoint_mse_vs_ref"] == rows["truncation-1.0"]["endpoint_mse_vs_ref"]
    assert rows["heun-2"]["endpoint_mse_vs_ref"] != rows["full"]["endpoint_mse_vs_ref"]
    for r in rows.values():
        assert float(r["one_step_mse_vs_teacher"]) > 0 and float(r["train_seconds"]) > 0
    assert (run / "ablations" / "summary.png").stat().st_size > 0
    # the variant jobs get the variant's settings (their sidecars record them) ...
    record = ablations.read_sidecar(run / "ablations" / "data" / "train" / "stage1" / "net_ema.pt")
    assert record["config"]["train"]["source"] == "data" and record["rule"] == "ablation_train_stage1"

    # ... and a changed setting reruns exactly the jobs whose settings it changes: the training lr
    # reaches every training (the base one that `full` uses too), no coupling or teacher job
    (tmp_path / "changed").mkdir()
    changed = write_config(tmp_path / "changed", {"ablations": {"variants": REDUCED, "checkpoint": "stage1"},
                                      "train": {"lr": 5e-4}})
    counts = job_counts((lambda p: p.stdout + p.stderr)(run_snakemake(tmp_path, changed, "-n", "ablations")))
    assert counts.get("train_stage1") == 1 and counts.get("ablation_train_stage1") == 3, counts
    assert not {"train_teacher", "couplings_shard", "couplings_merge", "ablation_couplings_shard",
                "ablation_couplings_merge", "heldout_couplings"} & set(counts), counts

    # the report page shows the table and the figure once they exist
    run_snakemake(tmp_path, cfg, "results/tiny/report/index.html", timeout=600)
    page = (run / "report" / "index.html").read_text()
    assert '<h2 id="ablations">Ablations</h2>' in page and "own shards, manifest, stage1" in page
    assert page.count("data:image/png;base64") >= 1 + page.split('id="ablations"')[0].count("data:image/png;base64")


def _images(tmp_path, n=10, side=4):
    store = tmp_path / "images.zarr"
    group = zarr.open_group(str(store), mode="w")
    rng = np.random.default_rng(0)
    group.create_array("images", data=rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8))
    group.create_array("labels", data=np.arange(n, dtype=np.int32) % 3)
    group.attrs["synsets"] = ["a", "b", "c"]
    return data_stream.open_images(store)


def test_data_stream_batches_resume_and_fresh_noise_per_epoch(tmp_path):
    images = _images(tmp_path)
    stream = data_stream.open_stream(images, batch_size=4, seed=3, rank=0, world=1)
    batches = [next(stream) for _ in range(5)]  # 20 samples: two epochs of 10
    first = batches[0]
    assert first["x"].shape == (4, 3, 4, 4) and first["x"].min() >= -1 and first["x"].max() <= 1
    assert first["noise"].dtype == torch.float32 and first["kept_fraction"] == 1.0
    ids = torch.cat([b["sample_id"] for b in batches]).numpy()
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))  # each image once per epoch
    noise = torch.cat([b["noise"] for b in batches])
    i = int(ids[0])
    j = 10 + int(np.flatnonzero(ids[10:] == i)[0])
    assert not torch.equal(noise[0], noise[j])  # the same image meets new noise in the next epoch
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.from_numpy(images.labels[ids]))
    # a resumed stream continues bit for bit
    again = data_stream.open_stream(images, batch_size=4, seed=3, rank=0, world=1)
    next(again), next(again)
    resumed = data_stream.open_stream(images, batch_size=4, seed=3, rank=0, world=1, saved_streams=[again.state_dict()])
    for expected in batches[2:]:
        got = next(resumed)
        assert torch.equal(got["x"], expected["x"]) and torch.equal(got["noise"], expected["noise"])
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        data_stream.open_stream(images, batch_size=4, seed=4, rank=0, world=1, saved_streams=[again.state_dict()])
