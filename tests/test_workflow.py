"""The data half of the DAG, run by real Snakemake: outputs, provenance, shard invariance,
kill-and-resume, bad inputs, dry runs of the presets, lint and formatting."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import (
    REPO,
    TINY,
    complete_preset,
    couplings_by_id,
    job_counts,
    reuse_upstream,
    run_snakemake,
    snakemake_cmd,
    write_config,
)

from remeanflow import provenance
from remeanflow.couplings import completion_mask, verify_shard

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------


def test_tiny_pipeline_outputs_and_provenance(tiny_run):
    _, _, run = tiny_run
    manifest = json.loads((run / "reflow" / "manifest.json").read_text())
    assert manifest["total"] == 4 * 12  # passes=1 over 48 images
    assert len(manifest["shards"]) == 2
    trunc = manifest["truncation"]
    assert trunc["kept"] + trunc["dropped"] == 48 and 0 < trunc["dropped"] <= 5
    for shard in sorted((run / "reflow" / "couplings").glob("shard-*.zarr")):
        verify_shard(shard, index_store=run / "reflow" / "index.zarr")
    assert not list((run / "reflow" / "work").glob("*")), "finished shards must leave the scratch area"

    # every output of every rule has a sidecar, and lineage reaches the archive and the teacher
    for out in ["source/toy_train.tar", "data/raw/toy_train.tar", "data/parts/part-00000.zarr", "data/images.zarr",
                "data/labels.csv", "teacher/net.pt", "teacher/guide.pt", "teacher/metrics.csv", "reflow/index.zarr",
                "reflow/couplings/shard-00001.zarr", "reflow/manifest.json", "time_emb/net.pt", "time_emb/fit.json",
                "train/stage1/train_state.pt", "train/stage1/net_ema.pt", "train/stage1/metrics.csv",
                "train/stage2/net_ema.pt", "eval/heldout.npz", "eval/stage1/metrics.json", "eval/stage2/samples.png",
                "eval/stage2/metrics.json"]:
        assert provenance.sidecar_path(run / out).is_file(), out
    # the final metrics lead back to the dataset archive's and the teacher's checksums
    tree = provenance.lineage(run / "eval" / "stage2" / "metrics.json")
    flat = []

    def walk(node):
        flat.append(node)
        for child in node["inputs"]:
            walk(child)

    walk(tree)
    archive = run / "data" / "raw" / "toy_train.tar"
    archive_sha = (archive.parent / "toy_train.tar.sha256").read_text().split()[0]
    assert any(n["path"].endswith("data/raw/toy_train.tar") and n["sha256"] == archive_sha for n in flat)
    teacher_sha = (run / "teacher" / "net.pt.sha256").read_text().split()[0]
    assert any(n["path"].endswith("teacher/net.pt") and n["sha256"] == teacher_sha for n in flat)
    assert manifest["fingerprint"]["teacher_sha256"] == teacher_sha
    assert {n["rule"] for n in flat} >= {"evaluate_merge", "train_stage2", "train_stage1", "init_time_embedding",
                                          "couplings_merge", "couplings_shard", "train_teacher", "download_dataset"}
    side = provenance.read(run / "reflow" / "manifest.json")
    assert side["rule"] == "couplings_merge" and side["config"]["couplings"]["truncation_quantile"] == 0.9
    assert side["code"]["package_hash"] and "torch" in side["packages"]
    # every sidecar of the run names the code version of its rule: the import closure of its script
    sidecars = sorted(run.rglob("*" + provenance.SUFFIX))
    assert len(sidecars) >= 30
    for path in sidecars:
        record = json.loads(path.read_text())
        script = {"train_stage1": "train_stage", "train_stage2": "train_stage", "report_stage": "report"}.get(
            record["rule"], record["rule"])
        assert record["code"]["rule_code_hash"] == provenance.script_code_hash(
            REPO / "workflow_scripts" / f"{script}.py"), path


def test_provenance_cli_and_verify(tiny_run, tmp_path):
    _, _, run = tiny_run
    target = run / "reflow" / "index.zarr"
    out = subprocess.run([sys.executable, "-m", "remeanflow", "provenance", str(target), "--verify"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "toy_train.tar" in out.stdout and "[download_dataset]" in out.stdout and "unchanged" in out.stdout
    # a modified input is flagged; on a moved copy, so other tests keep the original and lineage is
    # shown to follow the results tree rather than the folder it was made in
    copy = tmp_path / "moved" / "results" / "tiny"
    shutil.copytree(run, copy)
    archive = copy / "data" / "raw" / "toy_train.tar"
    with open(archive, "ab") as f:
        f.write(b"\0")
    out = subprocess.run([sys.executable, "-m", "remeanflow", "provenance", str(copy / "reflow" / "index.zarr"),
                          "--verify", "--json"], capture_output=True, text=True)
    assert out.returncode == 1
    problems = {c["path"]: c["kind"] for c in json.loads(out.stdout)["problems"]}
    assert problems == {str(archive): "changed"}


def test_couplings_do_not_depend_on_shards_or_processes(tiny_run, tmp_path):
    """2 shards x 1 process (the session run) vs 3 shards x 2 accelerate processes (gloo on CPU)."""
    _, _, run = tiny_run
    dst = reuse_upstream(run, tmp_path, "three")
    cfg = write_config(tmp_path, {"run_name": "three", "couplings": {"num_shards": 3, "processes": 2}})
    target = "results/three/reflow/manifest.json"
    planned = job_counts((lambda p: p.stdout + p.stderr)(run_snakemake(tmp_path, cfg, "-n", target)))
    assert "train_teacher" not in planned and "preprocess_shard" not in planned, planned
    run_snakemake(tmp_path, cfg, target)
    assert len(list((dst / "reflow" / "couplings").glob("shard-*.zarr"))) == 3
    log = (dst / "logs" / "couplings_shard" / "00000.log").read_text()
    assert "rank 1 of 2" in log and "rank 0 of 2" in log, "the shard job did not run two processes"
    two = couplings_by_id(run / "reflow" / "manifest.json")
    three = couplings_by_id(dst / "reflow" / "manifest.json")
    for key in ("sample_id", "label", "noise", "endpoint"):
        assert np.array_equal(two[key], three[key]), key



def test_killed_shard_resumes_to_the_same_store(tiny_run, tmp_path):
    _, _, run = tiny_run
    dst = reuse_upstream(run, tmp_path, "killed")
    # slow chunks (more Heun steps, small batches) so the job can be caught mid-shard
    over = {"run_name": "killed", "couplings": {"num_shards": 1, "batch": 2, "heun_steps": 60}}
    cfg = write_config(tmp_path, over)
    work = dst / "reflow" / "work" / "shard-00000.zarr"
    target = "results/killed/reflow/manifest.json"
    proc = subprocess.Popen(snakemake_cmd(tmp_path, cfg, target), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (work / "zarr.json").exists():
                try:
                    done = completion_mask(work)
                except Exception:  # store still being created
                    done = np.zeros(1, bool)
                if 2 <= done.sum() < done.size - 2:
                    break
            if proc.poll() is not None:
                pytest.fail("the couplings job finished before it could be killed; make chunks slower")
            time.sleep(0.05)
        else:
            pytest.fail("no chunk finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = completion_mask(work)
    assert 0 < partial.sum() < partial.size
    assert not (dst / "reflow" / "manifest.json").exists()

    run_snakemake(tmp_path, cfg, "--unlock")  # what a user does after a killed run
    run_snakemake(tmp_path, cfg, "--rerun-incomplete", target)
    assert not list((dst / "reflow" / "work").glob("*"))
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    reuse_upstream(run, reference_dir, "killed")
    run_snakemake(reference_dir, write_config(reference_dir, over), target)
    resumed = couplings_by_id(dst / "reflow" / "manifest.json")
    uninterrupted = couplings_by_id(reference_dir / "results" / "killed" / "reflow" / "manifest.json")
    for key in ("sample_id", "label", "noise", "endpoint"):
        assert np.array_equal(resumed[key], uninterrupted[key]), key


# -- bad inputs --------------------------------------------------------------------------------


def _run_on_archive(tmp_path: Path, archive: Path, **dataset) -> subprocess.CompletedProcess:
    over = {"run_name": "bad", "dataset": {"toy": None, "source": str(archive), "archive_name": "train.tar", **dataset}}
    return run_snakemake(tmp_path, write_config(tmp_path, over), check=False)


def test_checksum_mismatch_fails_without_output(tiny_run, tmp_path):
    _, _, run = tiny_run
    proc = _run_on_archive(tmp_path, run / "data" / "raw" / "toy_train.tar", sha256="0" * 64)
    assert proc.returncode != 0
    assert "sha256" in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "results" / "bad" / "data" / "raw" / "train.tar").exists()


def test_truncated_archive_fails_without_output(tiny_run, tmp_path):
    _, _, run = tiny_run
    data = (run / "data" / "raw" / "toy_train.tar").read_bytes()
    bad = tmp_path / "truncated.tar"
    bad.write_bytes(data[: len(data) // 2])
    proc = _run_on_archive(tmp_path, bad)
    assert proc.returncode != 0
    log = "".join(p.read_text() for p in (tmp_path / "results" / "bad" / "logs").rglob("*.log"))
    assert "truncated" in (log + proc.stderr).lower() or "archive" in (log + proc.stderr).lower()
    assert not (tmp_path / "results" / "bad" / "data" / "images.zarr").exists()
    assert not list((tmp_path / "results" / "bad" / "data").glob("parts/*.zarr"))


def test_path_traversal_member_is_rejected(tmp_path):
    bad = tmp_path / "evil.tar"
    with tarfile.open(bad, "w") as tar:
        payload = tmp_path / "x"
        payload.write_bytes(b"not an image")
        tar.add(payload, arcname="../n01000000.tar")
    proc = _run_on_archive(tmp_path, bad)
    assert proc.returncode != 0
    assert not (tmp_path / "results" / "bad" / "data" / "images.zarr").exists()


def _archive_with_corrupt_images(path: Path, good: int, bad: int) -> None:
    """An ImageNet-style archive (tar of per-class tars) with `bad` undecodable JPEGs in class 0."""
    import io

    from remeanflow.data.toy import render_image, synset_name

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as outer:
        for k in range(2):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(good):
                    jpeg = io.BytesIO()
                    render_image(k, i, size=16, seed=0).save(jpeg, format="JPEG")
                    add(tar, f"{synset_name(k)}_{i}.JPEG", jpeg.getvalue())
                for i in range(bad if k == 0 else 0):
                    add(tar, f"{synset_name(k)}_bad{i}.JPEG", b"\xff\xd8 this is not a JPEG")
            add(outer, f"{synset_name(k)}.tar", inner.getvalue())


@pytest.mark.parametrize("bad, allowed", [(1, True), (4, False)])
def test_corrupt_images_are_counted_and_fail_above_the_threshold(tmp_path, bad, allowed):
    archive = tmp_path / "corrupt.tar"
    _archive_with_corrupt_images(archive, good=10, bad=bad)  # class 0: bad / (10 + bad) corrupt
    over = {"run_name": "bad", "dataset": {"toy": None, "source": str(archive), "archive_name": "train.tar",
                                           "max_bad_fraction": 0.1, "preprocess_shards": 1}}
    target = "results/bad/data/images.zarr"
    proc = run_snakemake(tmp_path, write_config(tmp_path, over), target, check=False)
    images = tmp_path / target
    if allowed:
        assert proc.returncode == 0, proc.stderr[-3000:]
        attrs = zarr.open_group(images, mode="r").attrs
        assert attrs["num_bad"] == 1 and attrs["num_images"] == 20
        assert provenance.read(images)["extra"]["report"]["num_bad"] == 1
    else:
        assert proc.returncode != 0
        log = (tmp_path / "results" / "bad" / "logs" / "preprocess_shard" / "00000.log").read_text()
        assert "TooManyBadImagesError" in log and "_bad0.JPEG" in log
        assert not images.exists() and not (tmp_path / "results/bad/data/parts/part-00000.zarr").exists()


def test_misspelled_or_mistyped_config_key_is_named(tmp_path):
    cfg = write_config(tmp_path, {"couplings": {"num_shard": 3}, "teacher": {"train": {"steps": "many"}}})
    proc = run_snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "couplings.num_shard" in text and "teacher.train.steps" in text


# -- DAG shape, lint, formatting ---------------------------------------------------------------


@pytest.mark.parametrize("preset", ["imagenet64", "imagenet512"])
@pytest.mark.parametrize("num_shards", [64, 7])
def test_preset_dry_run_shows_the_full_sharded_dag(preset, num_shards, tmp_path):
    extra = tmp_path / "shards.yaml"
    extra.write_text(yaml.safe_dump({"couplings": {"num_shards": num_shards}}))
    proc = run_snakemake(tmp_path, None, "-n", "--configfile", str(REPO / "presets" / f"{preset}.yaml"),
                         str(complete_preset(tmp_path, preset)), str(extra))
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["couplings_shard"] == num_shards
    assert counts["preprocess_shard"] == 20
    for rule in ("download_dataset", "fetch_teacher", "preprocess_merge", "reflow_index", "couplings_merge"):
        assert counts[rule] == 1, rule
    assert "train_teacher" not in counts and "toy_source" not in counts
    assert not (tmp_path / "results").exists(), "a dry run must not download or write anything"
    assert "remeanflow: warnings" not in proc.stderr  # a complete config: not a word


def test_changing_a_sampler_setting_reruns_couplings_only(tiny_run):
    workdir, cfg, _ = tiny_run
    changed = write_config(workdir, {"couplings": {"guidance": 1.3}})
    proc = run_snakemake(workdir, changed, "-n")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("couplings_shard") == 2 and counts.get("couplings_merge") == 1
    assert counts.get("train_stage1") == 1 and counts.get("evaluate_merge") == 2 and counts.get("evaluate_shard") == 4  # everything downstream reruns
    for upstream in ("toy_source", "download_dataset", "preprocess_shard", "train_teacher", "reflow_index"):
        assert upstream not in counts
    write_config(workdir)  # restore for other tests


def test_training_results_are_complete(tiny_run):
    import pandas as pd

    _, _, run = tiny_run
    for stage, steps in (("stage1", TINY["train"]["stage1"]["iterations"]), ("stage2", TINY["train"]["stage2"]["iterations"])):
        metrics = pd.read_csv(run / "train" / stage / "metrics.csv")
        assert metrics["step"].tolist() == list(range(1, steps + 1))
        assert np.isfinite(metrics["loss"]).all()
        ev = json.loads((run / "eval" / stage / "metrics.json").read_text())
        assert {r["name"] for r in ev["rows"]} == {"one_step", "initial_one_step", "teacher_1step", "teacher_endpoint"}
        assert any("FID skipped" in note for note in ev["notes"])
    w_pi = pd.read_csv(run / "train" / "stage2" / "metrics.csv")["w_pi"]
    assert ((w_pi >= 1) & (w_pi <= TINY["train"]["stage2"]["w_max"])).all() and w_pi.nunique() > 1


def test_changing_a_training_setting_reruns_training_only(tiny_run):
    workdir, _, _ = tiny_run
    changed = write_config(workdir, {"train": {"lr": 5e-4}})
    counts = job_counts((lambda p: p.stdout + p.stderr)(run_snakemake(workdir, changed, "-n")))
    assert counts.get("train_stage1") == 1 and counts.get("train_stage2") == 1 and counts.get("evaluate_merge") == 2 and counts.get("evaluate_shard") == 4
    for upstream in ("toy_source", "download_dataset", "preprocess_shard", "train_teacher", "reflow_index",
                     "couplings_shard", "couplings_merge", "init_time_embedding", "heldout_couplings"):
        assert upstream not in counts, upstream
    write_config(workdir)  # restore for other tests


def test_snakemake_lint_has_no_findings(tmp_path):
    proc = run_snakemake(tmp_path, None, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_check_passes():
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_conda_envs_name_the_packages_of_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["vae"]  # evaluation decodes latents
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in deps}
    conda_alias = {"torch": "pytorch", "xxhash": "python-xxhash"}
    envs = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "envs").glob("*.yaml")}
    listed = set()
    for env in envs.values():
        for dep in env["dependencies"]:
            if isinstance(dep, str):
                listed.add(re.split(r"[<>=!~ ]", dep)[0].lower())
    for name in names - {"snakemake"}:  # snakemake runs the envs, it is not installed into them
        assert conda_alias.get(name, name) in listed, f"{name} from pyproject.toml is in no envs/*.yaml"
    for name in listed - {"python", "pip"}:
        assert {v: k for k, v in conda_alias.items()}.get(name, name) in names, f"{name} is not a pyproject dependency"


# -- inputs that cannot escape (trust model, docs/architecture.md) -----------------------------


def _source_config(workdir: Path, overrides: dict) -> Path:
    """TINY with a local (empty) train archive, so that `download_dataset` is the first job."""
    (workdir / "train.tar").write_bytes(b"")
    return write_config(workdir, {"dataset": {"toy": None, "source": str(workdir / "train.tar")}, **overrides})


@pytest.mark.parametrize("override, message", [
    ({"run_name": ".."}, "config key run_name = '..'"),  # results/.. is the working directory itself
    ({"results_dir": "../x"}, "config key results_dir = '../x': must be a relative path inside the working"),
])
def test_a_run_that_would_write_outside_its_folder_is_refused_before_any_job(tmp_path, override, message):
    # Not a dry run: the refusal must come before download_dataset writes source/ and logs/.
    workdir = tmp_path / "parent" / "work"
    workdir.mkdir(parents=True)
    cfg = _source_config(workdir, override)
    before = sorted(p.name for p in workdir.iterdir())
    proc = run_snakemake(workdir, cfg, "download_dataset", check=False, timeout=300)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert sorted(p.name for p in workdir.iterdir() if p.name != ".snakemake") == before
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["work"]


def test_a_non_finite_number_from_the_command_line_is_refused_naming_the_key(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_snakemake(tmp_path, cfg, "-n", "--config", "train={lr: .inf}", check=False, timeout=300)
    assert proc.returncode != 0
    assert "config key train.lr = inf: must be a finite number" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
