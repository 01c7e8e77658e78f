"""Which GPUs a locally run job uses, and the per-process CUDA setup.

Snakemake's local executor counts the `gpu` resource but assigns no devices: without help every
job would see every GPU and the single-GPU ones would all run on GPU 0. `claim` gives each job
its own devices from a machine-wide pool and sets CUDA_VISIBLE_DEVICES for the job's process
(and so for the accelerate ranks it starts, which inherit the environment).

The pool:

* devices: REMEANFLOW_GPUS when set (a comma-separated list; empty = no pool), else
  CUDA_VISIBLE_DEVICES as Snakemake was started with it, else the NVIDIA device nodes
  /dev/nvidia0, /dev/nvidia1, ... -- the same list `profiles/local` counts for its `gpu` limit;
* state: one JSON file of claims {device: {pid, start, job}} in REMEANFLOW_GPU_POOL (default
  `$TMPDIR/remeanflow-gpus-<uid>`), read and written under an exclusive `flock` of a lock file
  beside it, so that concurrent jobs (and concurrent Snakemake runs on one machine) never take
  the same device;
* release: when the job's `with claim(...)` block exits, normally or by an exception; a job
  killed outright (SIGKILL, OOM killer) leaves its claims behind, and the next `claim` drops
  every claim whose process no longer exists (pid plus its start time, so a reused pid does not
  keep a dead job's devices);
* a job asking for more devices than the pool has gets all of them (Snakemake scales the `gpu`
  request down the same way); one asking for devices that are taken waits for them.

Under Slurm (SLURM_JOB_ID set) the scheduler has already restricted the job to its own devices,
and without devices (a CPU machine) there is nothing to share: `claim` then does nothing.

The module imports no torch at import time: the data rules' environment has none.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DEVICES = "REMEANFLOW_GPUS"
ENV_POOL = "REMEANFLOW_GPU_POOL"
POLL_SECONDS = 1.0


def pool_devices(environ=None) -> list[str]:
    """The devices of the pool, in order (see the module docstring for where they come from)."""
    environ = os.environ if environ is None else environ
    for name in (ENV_DEVICES, "CUDA_VISIBLE_DEVICES"):
        if name in environ:
            return [d.strip() for d in environ[name].split(",") if d.strip()]
    nodes = [Path(p).name for p in glob.glob("/dev/nvidia[0-9]*")]
    return sorted((n.removeprefix("nvidia") for n in nodes if re.fullmatch(r"nvidia\d+", n)), key=int)


def pool_dir(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    default = Path(tempfile.gettempdir()) / f"remeanflow-gpus-{os.getuid()}"
    return Path(environ.get(ENV_POOL) or default)


def under_slurm(environ=None) -> bool:
    """Slurm gives a job its own devices (`--gpus`) and sets CUDA_VISIBLE_DEVICES itself."""
    return "SLURM_JOB_ID" in (os.environ if environ is None else environ)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), None if it does not exist.
    Together with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _alive(claim: dict) -> bool:
    return _start_time(int(claim["pid"])) == claim.get("start")


@contextlib.contextmanager
def _locked_claims(directory: Path) -> Iterator[dict]:
    """The claims file's content under an exclusive lock; what the block leaves in it is written back."""
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "claims.json"
    with open(directory / "pool.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            claims = json.loads(state.read_text()) if state.is_file() and state.stat().st_size else {}
            yield claims
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps(claims, indent=1, sort_keys=True))
            os.replace(tmp, state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def try_acquire(devices: list[str], count: int, job: str, directory: Path) -> list[str] | None:
    """Claim `count` free devices of `devices` for this process, or None when fewer are free.
    Claims of processes that no longer exist are dropped first."""
    me = {"pid": os.getpid(), "start": _start_time(os.getpid()), "job": job}
    with _locked_claims(directory) as claims:
        for device in [d for d, c in claims.items() if not _alive(c)]:
            log.warning("GPU %s: reclaimed from %s (pid %s, no longer running)", device, claims[device].get("job"),
                        claims[device]["pid"])
            del claims[device]
        free = [d for d in devices if d not in claims]
        if len(free) < count:
            return None
        for device in free[:count]:
            claims[device] = me
        return free[:count]


def release(claimed: list[str], directory: Path) -> None:
    """Give back this process's claims of `claimed`."""
    with _locked_claims(directory) as claims:
        for device in claimed:
            if claims.get(device, {}).get("pid") == os.getpid():
                del claims[device]


@contextlib.contextmanager
def claim(count: int, job: str = "", environ=None) -> Iterator[list[str] | None]:
    """Hold `count` devices of the pool for the block and set CUDA_VISIBLE_DEVICES to them.

    Yields the claimed devices, or None when no pool applies (count 0, Slurm, no devices); then
    the environment is left as it is. Waits while the devices are taken. Must run before CUDA is
    initialised in this process: the driver reads CUDA_VISIBLE_DEVICES once.
    """
    environ = os.environ if environ is None else environ
    devices = pool_devices(environ)
    if count < 1 or under_slurm(environ) or not devices:
        yield None
        return
    _refuse_initialised_cuda()
    count = min(count, len(devices))
    directory = pool_dir(environ)
    waited = False
    while (got := try_acquire(devices, count, job, directory)) is None:
        if not waited:
            log.info("%s: waiting for %d of the GPUs %s (claims in %s)", job, count, devices, directory)
            waited = True
        time.sleep(POLL_SECONDS)
    before = environ.get("CUDA_VISIBLE_DEVICES")
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(got)
    log.info("%s: GPUs %s (CUDA_VISIBLE_DEVICES)", job, ",".join(got))
    try:
        yield got
    finally:
        release(got, directory)
        if before is None:
            environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            environ["CUDA_VISIBLE_DEVICES"] = before


def _refuse_initialised_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the job claimed its GPUs: CUDA_VISIBLE_DEVICES would be "
                           "ignored; nothing may touch CUDA before `workflow.step` (or `gpus.claim`)")


def configure_cuda(device) -> bool:
    """Per-process CUDA setup, for every process that computes on `device`; True if it applied.

    cuDNN autotuning (`cudnn.benchmark`, as EDM2 sets it): every job here runs fixed shapes, so
    the fastest convolution algorithms are picked once per shape. It may pick differently from
    run to run, so GPU results are reproducible only to rounding (CPU runs are unaffected).
    """
    import torch

    if torch.device(device).type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    return True


def visible_cuda_devices() -> int | None:
    """How many CUDA devices this process can use, None without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.device_count()
