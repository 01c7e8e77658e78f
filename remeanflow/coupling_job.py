"""One couplings shard job: the teacher's EDM Heun ODE with autoguidance over a slice of the reflow
index, written into a resumable Zarr shard (DESIGN.md §2 "couplings", §5).

The job works in a scratch store that Snakemake does not own (`work`), so a killed job keeps its
finished chunks; once every chunk is marked and verified, the store is moved onto the rule's
output. With `processes > 1` it relaunches itself under `accelerate launch`, one process per GPU;
ranks split the shard's chunks round-robin and never write the same Zarr chunk.

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

from . import checkpoints, couplings, sampling
from .checkpoints import net_sha256
from .launch import launch_module, read_spec
from .reflow_index import load_index

log = logging.getLogger(__name__)

SAMPLER_KEYS = ("heun_steps", "sigma_min", "sigma_max", "rho", "guidance")


def fingerprint(teacher, guide, cfg: dict, seed: int) -> dict:
    """What determines the couplings besides the index: teacher, guide, sampler, seed, precision."""
    return {
        "teacher_sha256": net_sha256(teacher),
        "guide_sha256": net_sha256(guide),
        "sampler": {k: cfg[k] for k in SAMPLER_KEYS},
        "seed": int(seed),
        "precision": "bf16-autocast" if torch.cuda.is_available() else "fp32",
        # numpy does not promise identical standard_normal streams across versions (sampling.py)
        "noise": {"generator": "numpy Philox(key=[sample_id, seed]) stream 0", "numpy": np.__version__},
    }


def make_generate_fn(net, guide, cfg: dict, device: torch.device):
    """Endpoints of the guided teacher ODE for a chunk of standard-normal noise (EDM Alg. 1)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast:
            x = sampling.edm_heun(
                net, noise.to(device), labels.to(device), num_steps=cfg["heun_steps"], sigma_min=cfg["sigma_min"],
                sigma_max=cfg["sigma_max"], rho=cfg["rho"], guide=guide, guidance=cfg["guidance"],
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
    cfg, work, output = spec["cfg"], Path(spec["work"]), Path(spec["output"])
    index = load_index(spec["index"])
    if rank == 0:
        couplings.create_shard_store(
            work, index_store=spec["index"], shard=spec["shard"], num_shards=cfg["num_shards"], chunk=cfg["batch"],
            shape=spec["shape"], noise_dtype=cfg["noise_dtype"], endpoint_dtype=cfg["endpoint_dtype"],
            seed=spec["seed"], fingerprint=fingerprint(spec["teacher"], spec["guide"], cfg, spec["seed"]),
        )
    barrier()
    net = checkpoints.load_net(spec["teacher"])["net"].to(device)
    guide = checkpoints.load_net(spec["guide"])["net"].to(device) if cfg["guidance"] != 1 else None
    stats = couplings.generate_shard(
        work, make_generate_fn(net, guide, cfg, device), rank=rank, world_size=world, progress=spec.get("progress", True)
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
