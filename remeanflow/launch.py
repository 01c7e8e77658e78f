"""Run a library entry point in several processes under `accelerate launch` (one per GPU).

Rules call the library function directly when one process suffices; otherwise they call
`launch_module("remeanflow.<module>", spec, processes)`, which writes the spec to a JSON file and
runs `python -m remeanflow.<module> <spec.json>` in every rank. Explicit flags keep a user's
accelerate `default_config.yaml` out of the picture; on CPU a real multi-process run needs
`--multi_gpu` with ACCELERATE_USE_CPU=1 (`--cpu` alone starts one process: checked with accelerate 1.x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from .workflow import history_path


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
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m <module> <spec.json> (got {argv[1:]})")
    with open(argv[1]) as f:
        return json.load(f)
