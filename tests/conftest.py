"""Shared fixtures: running the real Snakemake workflow on small configs in temporary folders."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from remeanflow import config as rmf_config
from remeanflow.coupling_set import open_couplings

# Small tensors on 2 shared cores: OpenMP spinning with 2 threads made some ops ~100x slower
# when another process was busy. Subprocesses (Snakemake jobs) choose their own thread counts.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# A config smaller than the embedded default: 4 classes x 12 toy images at 8 px, a 'tiny' teacher,
# 3 Heun steps. Merged over config.yaml by Snakemake, like a user's --configfile.
TINY = {
    "run_name": "tiny",
    "dataset": {
        "toy": {"num_classes": 4, "images_per_class": 12, "size": 16, "seed": 1},
        "resolution": 8, "preprocess_shards": 2, "decode_workers": 1,
    },
    "teacher": {"train": {"preset": "tiny", "steps": 16, "batch_size": 16, "guide_step": 4, "rampup_steps": 4}},
    "couplings": {"passes": 1, "num_shards": 2, "batch": 8, "heun_steps": 3},
    "time_embedding": {"steps": 10, "batch": 64},
    "train": {"batch_size": 8, "checkpoint_every": 4, "snapshot_every": 4, "window_chunks": 2,
              "stage1": {"iterations": 8, "grad_clip": None, "w_max": None},
              "stage2": {"iterations": 6, "grad_clip": 1.0, "w_max": 2.0}},
    "evaluate": {"num_samples": 16, "batch": 8, "grid_per_class": 1, "fid_samples": 64, "shards": 2},
    "resources": {
        "default": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
        "preprocess": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
        "teacher": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
        "couplings": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
        "train": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
        "evaluate": {"threads": 1, "mem_mb": 1000, "gpu": 0, "runtime": 10},
    },
}


deep_update = rmf_config.merge  # Snakemake's merge of config files, as the library does it


def write_config(workdir: Path, overrides: dict | None = None, base: dict | None = None) -> Path:
    cfg = deep_update(TINY if base is None else base, overrides or {})
    path = workdir / "test_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(workdir: Path, configfile: Path | None, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    # --configfile takes several values: it goes last so that targets in `args` stay targets
    return cmd + (["--configfile", str(configfile)] if configfile is not None else [])


def run_snakemake(workdir: Path, configfile: Path | None, *args: str, check: bool = True, timeout: int = 600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(snakemake_cmd(workdir, configfile, *args), capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def copy_checkout(dst: Path) -> Path:
    """The parts of the checkout that run the workflow, copied to `dst` (mtimes kept)."""
    dst.mkdir(parents=True)
    for part in ("Snakefile", "config.yaml", "pyproject.toml"):
        shutil.copy2(REPO / part, dst / part)
    for part in ("rules", "workflow_scripts", "remeanflow", "schemas", "envs", "report"):
        shutil.copytree(REPO / part, dst / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dst


def job_counts(text: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (rule -> jobs) from its output; {} when there is nothing to do."""
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def save_tiny_vae(path: Path) -> Path:
    """A tiny SD-style diffusers AutoencoderKL (4 latent channels, 2x down/upsampling), random weights."""
    from remeanflow.rehearsal import save_random_vae

    return save_random_vae(path, block_out_channels=(8, 16))


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (its `main(argv)` runs it in this process)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def complete_preset(workdir: Path, preset: str) -> Path:
    """A config overlay with what presets/<preset>.yaml lacks on this machine, for dry runs: a local
    train tar, checksums for the teacher pickles, and for the 512 preset the VAE folder and 512 px
    reference statistics (stand-ins: the checks before the run only look that they are there)."""
    from remeanflow import fid

    (workdir / "train.tar").write_bytes(b"")
    overlay = {"dataset": {"source": str(workdir / "train.tar")},
               "teacher": {"fetch": {"main_sha256": "0" * 64, "guide_sha256": "1" * 64}}}  # no warnings either
    if preset == "imagenet512":
        vae = workdir / "vae"
        vae.mkdir(exist_ok=True)
        (vae / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}))
        fid.save_stats(workdir / "ref512.npz", np.zeros(2048), np.eye(2048))
        overlay["evaluate"] = {"vae": str(vae), "ref_stats": {"source": str(workdir / "ref512.npz")}}
    path = workdir / f"complete-{preset}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def couplings_by_id(manifest: Path) -> dict[str, np.ndarray]:
    reader = open_couplings(manifest)
    parts = [reader.read_chunk(i) for i in range(len(reader.chunks))]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["sample_id"])
    return {k: v[order] for k, v in out.items()}


def reuse_upstream(src_run: Path, workdir: Path, run_name: str) -> Path:
    """Copy dataset and teacher of a finished run, so a second run only redoes the couplings."""
    dst = workdir / "results" / run_name
    for part in ("source", "data", "teacher"):
        shutil.copytree(src_run / part, dst / part)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The data half of the DAG, run once for real on the TINY config."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    cfg = write_config(workdir)
    run_snakemake(workdir, cfg)
    return workdir, cfg, workdir / "results" / "tiny"


def import_pytorch_fid(module: str):
    """pytorch_fid.<module>, or a skip naming why it cannot be imported (it imports torchvision,
    whose PyPI builds fail to load beside some torch builds with a RuntimeError)."""
    try:
        return importlib.import_module(f"pytorch_fid.{module}")
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"pytorch-fid/torchvision not importable here: {type(e).__name__}: {e}")
