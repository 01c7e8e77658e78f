"""Shared fixtures: running the real Snakemake workflow on small configs in temporary folders."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
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


PYTORCH_FID_PYTHON = "REMEANFLOW_PYTORCH_FID_PYTHON"

# What runs in the pytorch-fid environment around a test's code: the test's arrays as `inputs`,
# pytorch-fid's modules as `pfi` (inception) and `fid_score`, and an `outputs` dict of arrays that
# comes back to the test. One thread, as the tests here.
_PYTORCH_FID_PRELUDE = """
import sys
import numpy as np
import torch
import pytorch_fid.fid_score as fid_score
import pytorch_fid.inception as pfi
torch.set_num_threads(1)
with np.load(sys.argv[1]) as f:
    inputs = {k: f[k] for k in f.files}
outputs = {}
"""


def pytorch_fid_python() -> str:
    """The Python of the pytorch-fid environment (REMEANFLOW_PYTORCH_FID_PYTHON). Without one a
    skip that says how to make it, except in CI (CI=true), where it is a failure: the parity with
    pytorch-fid is what makes our FID comparable to the paper's, so CI must not pass without it."""
    python = os.environ.get(PYTORCH_FID_PYTHON)
    if python and os.path.isfile(python) and os.access(python, os.X_OK):
        return python
    why = f"{PYTORCH_FID_PYTHON} is not set" if not python else f"{PYTORCH_FID_PYTHON}={python!r} is not an executable"
    message = (f"pytorch-fid comparison: {why}; make the environment with `bash .ci/pytorch_fid_env.sh` and export "
               f"{PYTORCH_FID_PYTHON}=<the path it prints> (.ci/run does both)")
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pytorch_fid(tmp_path_factory):
    """`pytorch_fid(code, **arrays) -> dict of arrays`: runs `code` in pytorch-fid's own environment
    (`pytorch_fid_python`; see _PYTORCH_FID_PRELUDE for the names it sees). A separate environment
    because pytorch-fid needs torchvision, whose PyPI builds need another torch than this one's:
    installing it here would replace the torch the project is tested with."""
    python = pytorch_fid_python()
    root = tmp_path_factory.mktemp("pytorch_fid")
    calls = itertools.count()

    def run(code: str, **arrays) -> dict[str, np.ndarray]:
        k = next(calls)
        inputs, outputs = root / f"in{k}.npz", root / f"out{k}.npz"
        np.savez(inputs, **arrays)
        script = _PYTORCH_FID_PRELUDE + textwrap.dedent(code) + "\nnp.savez(sys.argv[2], **outputs)\n"
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # nothing of this venv
        proc = subprocess.run([python, "-c", script, str(inputs), str(outputs)], capture_output=True, text=True,
                              cwd=root, env=dict(env, OMP_NUM_THREADS="1"), timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"the pytorch-fid side failed ({proc.returncode}) in {python}:\n{proc.stderr[-4000:]}")
        with np.load(outputs) as f:
            return {key: f[key] for key in f.files}

    return run
