"""The Snakemake profiles: what `--profile profiles/slurm` asks Slurm for on the paper presets (dry
run, no cluster needed), the couplings of the tiny run made through a real Slurm cluster, and the
workstation profile's limits.

The real-cluster test needs Slurm up on this machine (`.ci/slurm_up.sh`, root). Without it the
test is skipped, except under CI=true, where it fails: CI must have started the cluster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import (
    REPO,
    complete_preset,
    couplings_by_id,
    reuse_upstream,
    run_snakemake,
    snakemake_cmd,
    write_config,
)
from snakemake.utils import available_cpu_count

pytestmark = pytest.mark.slow

SLURM_PROFILE = REPO / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "profiles" / "local"
# rules whose resources come from one `resources.<group>` of the config (rules/*.smk)
RULE_GROUP = {"couplings_shard": "couplings", "train_stage1": "train", "train_stage2": "train",
              "preprocess_shard": "preprocess"}
MULTI_GPU_RULES = ("couplings_shard", "train_stage1", "train_stage2")


def _partition_file() -> Path:
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    return SLURM_PROFILE / profile["slurm-partition-config"]


def _gpu_partitions() -> set[str]:
    """Partitions that the profile's partition file says have GPUs."""
    parts = yaml.safe_load(_partition_file().read_text())["partitions"]
    return {name for name, limits in parts.items() if limits.get("max_gpu", 0) > 0}


def _chosen_partition(job: dict) -> str | None:
    """The partition the plugin's own selection picks for a planned job, as it does at submission."""
    from snakemake_executor_plugin_slurm.partitions import (
        get_best_partition,
        read_partition_file,
    )

    res = {k: int(v) if v.isdigit() else v for k, v in job["resources"].items()}
    return get_best_partition(read_partition_file(_partition_file()),
                              SimpleNamespace(name=job["rule"], threads=job["threads"], resources=res),
                              logging.getLogger(__name__))


def _planned_jobs(text: str) -> list[dict]:
    """Jobs of a dry run: rule, threads and resources of each `rule <name>:` block."""
    jobs: list[dict] = []
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(1), "threads": 1, "resources": {}})
        elif jobs and (m := re.match(r"^\s+threads: (\d+)$", line)):
            jobs[-1]["threads"] = int(m.group(1))
        elif jobs and (m := re.match(r"^\s+resources: (.*)$", line)):
            jobs[-1]["resources"] = dict(re.findall(r"(\w+)=([^,]*)", m.group(1)))
    return jobs


@pytest.mark.parametrize("preset", ["imagenet512", "imagenet64"])
def test_slurm_profile_dry_run_asks_for_the_configured_resources(preset, slurm_plugin, tmp_path):
    preset_cfg = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    # A dry run caps threads at --cores (1 by default); on the cluster no --cores is given and
    # every job keeps its configured threads, so allow plenty here to see the real requests.
    proc = run_snakemake(tmp_path, None, "-n", "--profile", str(SLURM_PROFILE), "--cores", "100000",
                         "--configfile", str(REPO / "presets" / f"{preset}.yaml"),
                         str(complete_preset(tmp_path, preset)))
    jobs = _planned_jobs(proc.stdout + proc.stderr)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(job["rule"], []).append(job)
    assert len(by_rule.get("couplings_shard", [])) == preset_cfg["couplings"]["num_shards"]
    assert len(by_rule.get("train_stage1", [])) == len(by_rule.get("train_stage2", [])) == 1

    for rule, group in RULE_GROUP.items():
        want = preset_cfg["resources"][group]
        for job in by_rule[rule]:
            res = job["resources"]
            assert int(res["mem_mb"]) == want["mem_mb"], (rule, res)
            assert int(res["runtime"]) == want["runtime"], (rule, res)
            assert job["threads"] == want["threads"], (rule, job)
            assert int(res["cpus_per_task"]) == want["threads"], (rule, res)  # sbatch --cpus-per-task
            assert int(res.get("gpu", 0)) == want["gpu"], (rule, res)  # sbatch --gpus
            # GPU jobs to a partition with GPUs, the others to one without
            assert (_chosen_partition(job) in _gpu_partitions()) == (want["gpu"] > 0), (rule, res)
            if rule in MULTI_GPU_RULES:
                # one task that starts a rank per GPU itself (profiles/slurm/README.md)
                assert int(res["tasks"]) == 0, (rule, res)
    # the paper setting: one GPU per coupling shard, eight for training
    assert {int(j["resources"]["gpu"]) for j in by_rule["couplings_shard"]} == {1}
    assert {int(j["resources"]["gpu"]) for j in by_rule["train_stage1"] + by_rule["train_stage2"]} == {8}
    # nothing goes to the cluster without a wall time, memory and a partition that takes it
    for job in jobs:
        if job["rule"] != "all":
            assert {"runtime", "mem_mb"} <= job["resources"].keys(), job
            assert _chosen_partition(job) is not None, job
    assert not (tmp_path / "results").exists(), "a dry run must not write anything"


class _Resources(dict):
    """A planned job's resources as the plugin reads them (`.get` and attribute access)."""

    __getattr__ = dict.__getitem__


def test_slurm_profile_asks_for_nodes_and_gpus_per_node_of_a_multi_node_training(slurm_plugin, tmp_path):
    """resources.train.nodes = 2 on the 512 preset: the plugin's own submit string (sbatch) and
    job-step srun for the planned training jobs: 2 nodes with 8 GPUs each, one task per node."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_gpu_setting, get_node_setting

    two = tmp_path / "two_nodes.yaml"
    two.write_text(yaml.safe_dump({"resources": {"train": {"nodes": 2}}, "train": {"batch_size": 256}}))
    preset = REPO / "presets" / "imagenet512.yaml"
    proc = run_snakemake(tmp_path, None, "-n", "--profile", str(SLURM_PROFILE), "--cores", "100000",
                         "--configfile", str(preset), str(two), str(complete_preset(tmp_path, "imagenet512")))
    jobs = _planned_jobs(proc.stdout + proc.stderr)
    want = yaml.safe_load(preset.read_text())["resources"]["train"]
    trains = [j for j in jobs if j["rule"] in ("train_stage1", "train_stage2")]
    assert len(trains) == 2
    for job in trains:
        res = job["resources"]
        assert (res["nodes"], res["gres"], res["gpu"]) == ("2", f"gpu:{want['gpu']}", "0"), res
        assert _chosen_partition(job) in _gpu_partitions(), res
        plugin_job = SimpleNamespace(name=job["rule"], threads=job["threads"], resources=_Resources(
            {k: int(v) if v.isdigit() else v for k, v in res.items()}))
        params = dict(run_uuid="x", slurm_logfile="x.log", comment_str="x", account="", partition="-p gpu",
                      workdir=str(tmp_path))
        sbatch = get_submit_command(plugin_job, params) + set_gres_string(plugin_job)
        assert " --nodes=2 " in sbatch and sbatch.endswith(f" --gres=gpu:{want['gpu']}"), sbatch
        assert "--gpus" not in sbatch and "--ntasks" not in sbatch, sbatch  # one task per node
        assert f"--cpus-per-task={want['threads']}" in sbatch and f"--mem {want['mem_mb']}" in sbatch, sbatch
        # Snakemake's job step on the first node: no GPU count of its own (it gets the job's
        # GPUs of that node) and srun narrows `--nodes=2` with -n1 to the one node
        assert get_gpu_setting(plugin_job) == "" and get_node_setting(plugin_job) == "--nodes=2"
    # the other GPU rules keep asking through `gpu`
    shard = next(j for j in jobs if j["rule"] == "couplings_shard")
    assert "gres" not in shard["resources"] and "nodes" not in shard["resources"], shard


# -- a real Slurm cluster ------------------------------------------------------------------------


def _slurm_problem() -> str | None:
    """Why the workflow cannot be sent to a Slurm cluster on this machine, or None if it can."""
    missing = [tool for tool in ("sinfo", "sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"Slurm client commands not found: {', '.join(missing)}"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 20 s"
    usable = [s for s in states.stdout.split() if s.rstrip("*~#$@+").lower() in ("idle", "mixed", "allocated")]
    if states.returncode != 0 or not usable:
        return f"no usable Slurm node (sinfo exit {states.returncode}: {(states.stdout + states.stderr).strip()!r})"
    return None


def _skip_or_fail(message: str) -> None:
    """Skip on a developer machine; fail under CI=true, where the cluster and plugin must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


@pytest.fixture
def slurm_plugin():
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _skip_or_fail("snakemake-executor-plugin-slurm is not installed (the test extra installs it)")


@pytest.fixture
def slurm_cluster(slurm_plugin):
    problem = _slurm_problem()
    if problem is not None:
        _skip_or_fail(f"Slurm is not usable: {problem}; start a single-node cluster with `.ci/slurm_up.sh` (root)")


def _scontrol_job(jobid: str) -> dict[str, str]:
    """`scontrol show job -d` as key=value pairs (finished jobs stay visible for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-d", jobid], check=False, capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, f"scontrol show job {jobid}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def test_tiny_couplings_through_real_slurm(slurm_cluster, request, tmp_path):
    """Dataset, teacher and reflow index of the session's tiny run are reused; the couplings shard
    (2 GPUs, so 2 accelerate ranks) and the merge go through sbatch with the unmodified profile."""
    _, _, run = request.getfixturevalue("tiny_run")
    dst = reuse_upstream(run, tmp_path, "slurm")
    shutil.copytree(run / "reflow" / "index.zarr", dst / "reflow" / "index.zarr")
    shutil.copy2(run / "reflow" / "index.zarr.provenance.json", dst / "reflow" / "index.zarr.provenance.json")
    couplings = {"threads": 2, "mem_mb": 1100, "gpu": 2, "runtime": 7}
    cfg = write_config(tmp_path, {"run_name": "slurm", "couplings": {"num_shards": 1},
                                  "resources": {"couplings": couplings}})
    # the plugin waits 40 s before its first status check by default (made for real queues)
    proc = run_snakemake(tmp_path, cfg, "--profile", str(SLURM_PROFILE), "--slurm-init-seconds-before-status-checks",
                         "1", "results/slurm/reflow/manifest.json", timeout=400)
    out = proc.stdout + proc.stderr

    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", out, re.MULTILINE)
    rules = {re.search(r"/rule_(\w+)/", log).group(1): (jobid, Path(log)) for jobid, log in submitted}
    assert sorted(rules) == ["couplings_merge", "couplings_shard"] and len(submitted) == 2, out[-3000:]
    assert "localrule couplings" not in out, "a couplings rule ran on the submitting machine"

    for rule, (jobid, slurm_log) in rules.items():
        job = _scontrol_job(jobid)
        assert job["JobState"] == "COMPLETED", (rule, job)
        # chosen by the plugin from partitions.yaml: the GPU job on a GPU partition, the merge not
        assert (job["Partition"] in _gpu_partitions()) == (rule == "couplings_shard"), (rule, job)
        assert job["MinMemoryNode"] == "1100M" and job["TimeLimit"] == "00:07:00", (rule, job)
        assert Path(job["WorkDir"]).resolve() == tmp_path.resolve(), (rule, job)
        # Slurm's own log of the job (kept by the profile): the job step ran the rule exactly once
        assert slurm_log.is_file(), f"{slurm_log} missing: the profile keeps the logs of successful jobs"
        assert slurm_log.read_text().count(f"localrule {rule}:") == 1, slurm_log.read_text()[-3000:]
    shard = _scontrol_job(rules["couplings_shard"][0])
    # one task with both GPUs (sbatch --gpus=2, no --ntasks-per-gpu) and the rule's 2 threads as CPUs
    assert shard["TresPerJob"] == "gres:gpu:2" and shard["NumTasks"] == "1" and shard["NumCPUs"] == "2", shard
    assert "gpu" not in _scontrol_job(rules["couplings_merge"][0]).get("TresPerJob", ""), "merge asked for a GPU"

    # one process per GPU, each rank once: no job run per GPU by srun
    rank_lines = re.findall(r"shard 0 rank (\d) of (\d)", (dst / "logs" / "couplings_shard" / "00000.log").read_text())
    assert sorted(rank_lines) == [("0", "2"), ("1", "2")], rank_lines
    # the couplings do not depend on where they were made: 1 shard x 2 ranks on Slurm = the local run
    local = couplings_by_id(run / "reflow" / "manifest.json")
    cluster = couplings_by_id(dst / "reflow" / "manifest.json")
    for key in ("sample_id", "label", "noise", "endpoint"):
        assert np.array_equal(local[key], cluster[key]), key


# -- the workstation profile ---------------------------------------------------------------------


def test_local_profile_limits_jobs_to_this_machine(tmp_path):
    cfg = write_config(tmp_path)
    cmd = snakemake_cmd(tmp_path, cfg, "--profile", str(LOCAL_PROFILE), "results/tiny/source/toy_train.tar")
    at = cmd.index("--cores")
    del cmd[at:at + 2]  # the profile's `cores: all` applies only when the command line gives none
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(rf"^Provided cores: {available_cpu_count()}$", out, re.MULTILINE), out[:3000]
    provided_line = re.search(r"^Provided resources: (.*)$", out, re.MULTILINE)[1]
    provided = dict(re.findall(r'Resource\("(\w+)", (\d+)\)', provided_line))
    assert int(provided["gpu"]) == 2, provided  # from CUDA_VISIBLE_DEVICES
    physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 0.5 * physical_mb < int(provided["mem_mb"]) < physical_mb, provided
    assert (tmp_path / "results" / "tiny" / "source" / "toy_train.tar").is_file()


def test_tiny_data_half_from_scratch_through_real_slurm(slurm_cluster, tmp_path):
    """The whole data half of the tiny pipeline, from the toy archive to the coupling manifest,
    with every job but the local bookkeeping rule `toy_source` submitted through sbatch by the
    unmodified profile."""
    cfg = write_config(tmp_path, {"run_name": "slurm_all"})
    target = "results/slurm_all/reflow/manifest.json"
    proc = run_snakemake(tmp_path, cfg, "--profile", str(SLURM_PROFILE), "--slurm-init-seconds-before-status-checks",
                         "1", target, timeout=900)
    out = proc.stdout + proc.stderr
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", out, re.MULTILINE)
    rules = sorted(re.search(r"/rule_(\w+)/", log).group(1) for _, log in submitted)
    assert rules == sorted(["download_dataset", "preprocess_shard", "preprocess_shard",
                            "preprocess_merge", "train_teacher", "reflow_index", "couplings_shard",
                            "couplings_shard", "couplings_merge"]), out[-3000:]
    assert "localrule toy_source:" in out  # bookkeeping rules (`localrules:`) run where Snakemake runs
    for jobid, _ in submitted:
        assert _scontrol_job(jobid)["JobState"] == "COMPLETED", jobid
    assert (tmp_path / target).is_file()


def test_training_through_real_slurm_takes_the_multi_node_path(slurm_cluster, request, tmp_path):
    """Stage 1 of the tiny run as a 1-node Slurm job with 2 stand-in GPUs: the job step starts
    `srun` with one task per node, whose `python -m remeanflow.launch` reads machine rank, main
    address and port from the Slurm step and launches the node's 2 ranks (the path of a
    multi-node job, on the one node CI has). Everything upstream is the session's tiny run."""
    from remeanflow import launch

    _, _, run = request.getfixturevalue("tiny_run")
    dst = reuse_upstream(run, tmp_path, "slurm_train")
    for part in ("reflow", "time_emb"):  # copytree keeps mtimes: Snakemake sees them up to date
        shutil.copytree(run / part, dst / part)
    train = {"threads": 2, "mem_mb": 1500, "gpu": 2, "nodes": 1, "runtime": 9}
    cfg = write_config(tmp_path, {"run_name": "slurm_train", "resources": {"train": train},
                                  "train": {"stage1": {"iterations": 4}}})
    target = "results/slurm_train/train/stage1/train_state.pt"
    proc = run_snakemake(tmp_path, cfg, "--profile", str(SLURM_PROFILE), "--slurm-init-seconds-before-status-checks",
                         "1", target, timeout=600)
    out = proc.stdout + proc.stderr
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", out, re.MULTILINE)
    assert [re.search(r"/rule_(\w+)/", log).group(1) for _, log in submitted] == ["train_stage1"], out[-3000:]
    jobid, slurm_log = submitted[0][0], Path(submitted[0][1])
    job = _scontrol_job(jobid)
    assert job["JobState"] == "COMPLETED", job
    assert job["NumNodes"] == "1" and job["NumTasks"] == "1" and job["TresPerJob"] == "gres:gpu:2", job
    assert slurm_log.read_text().count("localrule train_stage1:") == 1, slurm_log.read_text()[-3000:]

    log = (dst / "logs" / "train_stage1.log").read_text()
    assert re.search(r"starting 1 node\(s\) x 2 process\(es\): srun --overlap --nodes=1 --ntasks=1 "
                     r"--ntasks-per-node=1 --cpus-per-task=2 ", log), log[-3000:]
    # srun --label: the node launcher ran as task 0 of the step, its place read from Slurm
    host = job["NodeList"]
    port = launch.PORT_BASE + int(jobid) % launch.PORT_SPAN
    launched = re.findall(r"^(\d+): remeanflow\.launch: machine (\d+) of (\d+), (\d+) process\(es\) here, "
                          r"main process at (\S+):(\d+)$", log, re.MULTILINE)
    assert launched == [("0", "0", "1", "2", host, str(port))], log[-3000:]
    assert (dst / "train" / "stage1" / "net_ema.pt").is_file()
    metrics = (dst / "train" / "stage1" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 4, metrics
    assert not list((dst / "train" / "stage1").glob(".spec-*")), "the launch spec was left behind"
