"""What verifying a checkpoint on load costs: a dict of float32 tensors of `--gib` GiB written by
`checkpoints.atomic_torch_save` (canonical, with its content digest), then, interleaved over
`--repeats` rounds:

* `load`: plain `torch.load(weights_only=True)` (the baseline: what every load did before);
* `load_verify`: `checkpoints.torch_load` + `checkpoints.verify_content` (what every load does now);
* `digest`: `checkpoints.content_sha256` of the loaded object alone (the verification's own cost);
* `file_sha256`: `fileio.sha256_file` of the file (what a `.sha256` side file costs to refresh).

Seconds per GiB (median over rounds) and the ratio against plain load in the same run. The file is
read back right after it was written, so reads come from the page cache: this is the CPU cost of
hashing, not of the disk. The write (`save`) is timed once.

    python benchmarks/checkpoint_verify.py --gib 1 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from remeanflow import checkpoints  # noqa: E402
from remeanflow.fileio import sha256_file  # noqa: E402

FORMAT = "remeanflow.checkpoint-verify-bench/1"
NUM_TENSORS = 64  # a net's state_dict is many tensors, not one
MEMORY_FACTOR = 3.5  # the object, a loaded copy and slack, in units of the file's size


def available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def make_checkpoint(gib: float, seed: int = 0) -> dict:
    numel = int(gib * 2**30) // 4 // NUM_TENSORS
    g = torch.Generator().manual_seed(seed)
    return {"format": "bench", "state_dict": {f"layer{i}.weight": torch.rand(numel, generator=g)
                                              for i in range(NUM_TENSORS)}}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(path: Path, repeats: int) -> dict[str, list[float]]:
    def load():
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_verify():
        checkpoints.verify_content(path, checkpoints.torch_load(path))

    loaded = load()
    parts = {"load": load, "load_verify": load_verify, "digest": lambda: checkpoints.content_sha256(loaded),
             "file_sha256": lambda: sha256_file(path)}
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):  # interleaved: drifts of a shared machine hit every part alike
        for name, fn in parts.items():
            seconds[name].append(timed(fn))
    return seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (lowered to fit free memory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (hashing is single-threaded)")
    ap.add_argument("--dir", default=None, help="where to write the file (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    gib, free = args.gib, available_gib()
    if free is not None and gib * MEMORY_FACTOR > free:
        gib = round(free / MEMORY_FACTOR, 3)
        print(f"only {free:.1f} GiB available: measuring {gib} GiB instead of {args.gib}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ckpt.pt"
        obj = make_checkpoint(gib)
        save = timed(lambda: checkpoints.atomic_torch_save(obj, path))
        del obj
        size_gib = os.path.getsize(path) / 2**30
        seconds = measure(path, args.repeats)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = dict(
        format=FORMAT, gib=size_gib, repeats=args.repeats, threads=args.threads, torch=torch.__version__,
        save_s_per_gib=save / size_gib,
        s_per_gib={name: m / size_gib for name, m in median.items()},
        ratio_to_load={name: m / median["load"] for name, m in median.items()},
        seconds=seconds,
    )
    print(f"checkpoint of {size_gib:.3f} GiB ({NUM_TENSORS} float32 tensors), median of {args.repeats}, "
          f"page-cached reads")
    print(f"{'save (canonical + digest)':28s} {result['save_s_per_gib']:7.3f} s/GiB")
    for name in seconds:
        print(f"{name:28s} {result['s_per_gib'][name]:7.3f} s/GiB   x{result['ratio_to_load'][name]:.2f} of plain load")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
