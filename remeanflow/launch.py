"""Run a library entry point in several processes under `accelerate launch` (one per GPU).

Rules call the library function directly when one process suffices; otherwise they call
`launch_module("remeanflow.<module>", spec, processes)`, which writes the spec to a JSON file and
runs `python -m remeanflow.<module> <spec.json>` in every rank. Explicit flags keep a user's
accelerate `default_config.yaml` out of the picture; on CPU a real multi-process run needs
`--multi_gpu` with ACCELERATE_USE_CPU=1 (`--cpu` alone starts one process: checked with accelerate 1.x).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

import torch

from . import gpus
from .workflow import history_path

log = logging.getLogger(__name__)


def job_processes(configured: int, gpu_resource: int, *, keys: str) -> int:
    """How many processes a job starts: max(configured, gpu resource, 1), capped by the CUDA
    devices this process can use when there is CUDA (one rank per device).

    Snakemake scales a `gpu` request down to what the machine has (`profiles/local`), and the
    job's GPU claim (`gpus.claim`) holds at most that many, so an 8-GPU preset on a 4-GPU machine
    runs 4 ranks instead of 8 ranks of which 4 ask for devices that do not exist. Without CUDA
    the configured count runs (CPU processes). `keys` names the config keys behind the count, for
    the log.
    """
    wanted = max(configured, gpu_resource, 1)
    visible = gpus.visible_cuda_devices()
    if visible is None or wanted <= visible:
        return wanted
    if visible < 1:
        raise RuntimeError(f"CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); {keys} ask for {wanted}")
    log.warning("%s ask for %d processes but this job has %d CUDA device(s): running %d", keys, wanted, visible, visible)
    return visible


def check_split(total: int, processes: int, *, total_key: str, keys: str) -> None:
    """A clear error, before anything is launched, when `total` (config key `total_key`, e.g. the
    global batch) cannot be split evenly over the `processes` a job runs (`job_processes`)."""
    if total % processes:
        raise ValueError(f"{total_key} = {total} must be divisible by the number of processes, {processes} here "
                         f"(from {keys}, capped by the GPUs this job has): change {total_key} or {keys}")


def accelerate_command(processes: int) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def launch_module(module: str, spec: dict, processes: int, log_file=None) -> None:
    """Run `python -m <module> <spec.json>` in `processes` ranks; raise if any rank fails.
    The ranks' output is appended to `log_file` and its `history_path` when given (the rule's log)."""
    if processes < 2:
        raise ValueError(f"launch_module is for several processes, got processes={processes}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd, env = accelerate_command(processes)
    try:
        if log_file is None:
            subprocess.run([*cmd, "-m", module, f.name], check=True, env=env)
        else:
            with open(log_file, "a") as log, open(history_path(log_file), "a") as history:
                proc = subprocess.Popen([*cmd, "-m", module, f.name], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                for line in proc.stdout:
                    for out in (log, history):
                        out.write(line)
                        out.flush()
                if proc.wait() != 0:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args)
    finally:
        os.unlink(f.name)


def read_spec(argv: list[str]) -> dict:
    """The spec of a launched rank (`python -m <module> <spec.json>`). Every rank starts here,
    not in `workflow.step`, so the per-process CUDA setup (`gpus.configure_cuda`) is applied here."""
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m <module> <spec.json> (got {argv[1:]})")
    if torch.cuda.is_available():
        gpus.configure_cuda("cuda")
    with open(argv[1]) as f:
        return json.load(f)
