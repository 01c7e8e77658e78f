"""Generate one coupling shard in its own process (the kill-and-resume test SIGKILLs it).

Usage: python couplings_worker.py STORE INDEX_STORE [--sleep SECONDS] [--rank R --world-size W]

The tests import SHARD_KW and toy_generate from here, so the worker and the in-process reference
run are configured identically.
"""

from __future__ import annotations

import argparse
import time

import torch

# Small shard geometry shared with the tests: float16 noise exercises the storage rounding.
SHARD_KW = dict(chunk=4, shape=(2, 4, 4), noise_dtype="float16", endpoint_dtype="float32", seed=7,
                fingerprint={"teacher_sha256": "t" * 64, "sampler": {"steps": 2}, "seed": 7})


def toy_generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cheap deterministic stand-in for the teacher ODE: nonlinear in the noise, label-dependent."""
    lab = labels.to(noise.dtype).reshape(-1, *([1] * (noise.ndim - 1)))
    return torch.tanh(1.3 * noise + 0.25 * lab) * 0.7 + 0.05 * noise**2


def main() -> None:
    from remeanflow.couplings import create_shard_store, generate_shard

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store")
    ap.add_argument("index_store")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep inside each generate call")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    args = ap.parse_args()

    def slow_generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        time.sleep(args.sleep)  # widens the window in which a kill lands mid-chunk
        return toy_generate(noise, labels)

    create_shard_store(args.store, index_store=args.index_store, shard=0, num_shards=1, **SHARD_KW)
    generate_shard(args.store, slow_generate, rank=args.rank, world_size=args.world_size, progress=False)


if __name__ == "__main__":
    main()
