"""One couplings shard job: the teacher's EDM Heun ODE with autoguidance over a slice of the reflow
index, written into a resumable Zarr shard (`docs/method.md`, couplings; `docs/architecture.md`).

The job works in a scratch store that Snakemake does not own (`work`), so a killed job keeps its
finished chunks; once every chunk is marked and verified, the store is moved onto the rule's
output. Before resuming, every finished chunk of the work store is checked against its recorded
digests and the ones that fail are regenerated (`couplings.unmark_corrupt_chunks`): moving a
published shard with corrupt chunks back to the work path and rerunning regenerates just those.
With `processes > 1` it relaunches itself under `accelerate launch`, one process per GPU; ranks
split the shard's chunks round-robin and never write the same Zarr chunk.

Precision and speed options (config `couplings.precision`, `couplings.fast_path`) go through
`accel`: the precision names the teacher's autocast dtype on every device (fp16 as EDM2 and the
official code sample; fp16/bf16 on the CPU through CPU autocast, refused naming the key where
this torch has none), and the fast path runs the sampler on an `accel.FastDenoiser`
(channels-last, SDPA attention; torch.compile on CUDA).

Run as a module by `accelerate launch -m remeanflow.coupling_job <spec.json>`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from . import accel, checkpoints, couplings, sampling
from .checkpoints import net_sha256
from .launch import launch_module, read_spec
from .reflow_index import load_index
from .settings import CouplingSettings, build

log = logging.getLogger(__name__)

def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def speed_options(c: CouplingSettings, device: torch.device | str) -> tuple[str, bool]:
    """(precision that runs on `device`, fast_path) of the couplings settings."""
    precision, fast_path = c.precision, c.fast_path
    if not isinstance(fast_path, bool):
        raise ValueError(f"fast_path must be true or false, got {fast_path!r}")
    return accel.resolve_precision(precision, device, key="config key couplings.precision"), fast_path


def fingerprint(teacher, guide, c: CouplingSettings, seed: int, device: torch.device | str | None = None) -> dict:
    """What determines the couplings besides the index: teacher, guide, sampler, seed, precision.

    `precision` is the name that runs ("fp32", "bf16", "fp16"; checked for `device`, default CUDA
    when available, else the CPU), so couplings of another precision never pass for these;
    `fast_path: True` is added only when the fast path is on, so the default run's fingerprint is
    the same as before the option existed.
    """
    precision, fast_path = speed_options(c, _default_device() if device is None else device)
    fp = {
        "teacher_sha256": net_sha256(teacher),
        "guide_sha256": net_sha256(guide),
        "sampler": c.sampler.to_dict(),
        "seed": int(seed),
        "precision": precision,
        # numpy does not promise identical standard_normal streams across versions (sampling.py)
        "noise": {"generator": "numpy Philox(key=[sample_id, seed]) stream 0", "numpy": np.__version__},
    }
    if fast_path:
        fp["fast_path"] = True
    return fp


def make_generate_fn(net, guide, c: CouplingSettings, device: torch.device):
    """Endpoints of the guided teacher ODE for a chunk of standard-normal noise (EDM Alg. 1).

    Eager path: `sampling.edm_heun` under `accel.autocast` at the configured precision. Fast path
    (`fast_path: true`): `accel.fast_edm_heun` on an `accel.FastDenoiser`, which modifies `net`
    and `guide` in place (channels-last layout, SDPA attention); on CUDA it is compiled with
    torch.compile's default backend, on the CPU it runs eagerly. Neither path uses CUDA graphs.
    """
    device = torch.device(device)
    precision, fast_path = speed_options(c, device)
    sampler_kw = dict(num_steps=c.heun_steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max, rho=c.rho)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one chunk shape per job: pick the fastest kernels once
    if fast_path:
        backend = "inductor" if device.type == "cuda" else None
        denoiser = accel.FastDenoiser(net, guide, c.guidance, precision=precision, backend=backend)

        def generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = accel.fast_edm_heun(denoiser, noise.to(device), labels.to(device), **sampler_kw)
            return x.float().cpu()

        return generate

    def generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), accel.autocast(device, precision):
            x = sampling.edm_heun(
                net, noise.to(device), labels.to(device), **sampler_kw, guide=guide, guidance=c.guidance,
            )
        return x.float().cpu()

    return generate


def _distributed_state():
    """(rank, world_size, device, barrier) from accelerate when launched by it, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # cpu=True is what makes accelerate start a gloo process group on a machine without GPUs
        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state.device, state.wait_for_everyone
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, device, lambda: None


def run_shard(spec: dict) -> dict:
    """Generate (or resume) one shard; rank 0 verifies it and moves it onto `spec['output']`."""
    rank, world, device, barrier = _distributed_state()
    c, work, output = build(CouplingSettings, spec["couplings"]), Path(spec["work"]), Path(spec["output"])
    index = load_index(spec["index"])
    if rank == 0:
        couplings.create_shard_store(
            work, index_store=spec["index"], shard=spec["shard"], num_shards=c.num_shards, chunk=c.batch,
            shape=spec["shape"], noise_dtype=c.noise_dtype, endpoint_dtype=c.endpoint_dtype,
            seed=spec["seed"], fingerprint=fingerprint(spec["teacher"], spec["guide"], c, spec["seed"], device),
            store_noise=c.store_noise,
        )
        bad = couplings.unmark_corrupt_chunks(work, index_store=spec["index"])
        if bad:
            log.warning("shard %s: %d finished chunk(s) failed their digests and will be regenerated: %s",
                        spec["shard"], len(bad), bad)
    barrier()
    net = checkpoints.load_net(spec["teacher"])["net"].to(device)
    guide = checkpoints.load_net(spec["guide"])["net"].to(device) if c.guidance != 1 else None
    stats = couplings.generate_shard(
        work, make_generate_fn(net, guide, c, device), rank=rank, world_size=world, progress=spec.get("progress", True)
    )
    log.info("shard %s rank %d of %d: %d chunks generated, %d were done before", spec["shard"], rank, world,
             stats["chunks_generated"], stats["chunks_done_before"])
    barrier()
    if rank == 0:
        stats["verify"] = couplings.verify_shard(work, index_store=spec["index"])
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, output)
        log.info("shard %s complete: %s samples (index N=%s)", spec["shard"], stats["verify"].get("count"), index.labels.size)
    return stats


def launch(spec: dict, processes: int = 1, log_file=None) -> dict:
    """Run `run_shard` in this process, or under `accelerate launch` with `processes` ranks."""
    if processes == 1:
        return run_shard(spec)
    launch_module("remeanflow.coupling_job", spec, processes, log_file=log_file)
    return couplings.verify_shard(spec["output"], index_store=spec["index"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_shard(read_spec(sys.argv))
