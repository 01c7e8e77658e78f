"""Step-loop stalls of the training stream: recomputed distances, stored keep mask, prefetch.

A simulated training loop draws batches from `loader.CouplingStream` and spends a fixed time per
step on "compute" (`--compute sleep`: the CPU waits for a GPU step, the case of real training;
`--compute matmul`: a CPU matmul of about the same duration, which competes with the background
read for the cores). The time spent inside `next(stream)` is the stall: what a training process
would wait for data (with 8 ranks, every rank waits for the slowest). Three modes, interleaved in
every repeat so that they see the same machine load:

* recompute -- the stream before the keep mask was stored: a manifest of format /1 (the same one
  without ``keep_mask``), so every chunk read recomputes each coupling's float64 distance, and the
  next window is read synchronously inside the step loop (the baseline);
* stored -- the stored keep mask, still synchronous;
* prefetch -- the stored mask and the next window read by a background thread (`prefetch=True`,
  what `loader.open_stream` gives training).

The store is made in a temporary folder (`coupling_stream.make_set`: `--num-samples` couplings of
`--shape`, default 4x64x64 float32, chunks of `--chunk`, 90% quantile truncation). Before timing,
one untimed run per mode checks that all three yield bit-identical batches (blake2b of every
batch). Reported per mode: total stall (median over repeats), the stall after the first batch (the
first window cannot be hidden by a loop that starts with it), the longest single stall, and the
wall time; and the ratios of the baseline's stall to each mode's.

    python benchmarks/stream_prefetch.py --json benchmarks/results/cpu-stream-prefetch.json
    python benchmarks/stream_prefetch.py --num-samples 1024 --chunk 64 --repeats 1   # quick
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # coupling_stream, also when loaded by path

FORMAT = "remeanflow.stream-prefetch-bench/1"
MODES = ("recompute", "stored", "prefetch")


def format_1_manifest(manifest: Path) -> Path:
    """The manifest as the merge wrote it before storing the keep mask (beside it: shard paths are relative)."""
    m = json.loads(manifest.read_text())
    del m["keep_mask"]
    m["format"] = "remeanflow.couplings.manifest/1"
    out = manifest.with_name("manifest-format1.json")
    out.write_text(json.dumps(m, indent=1))
    return out


def make_compute(kind: str, seconds: float):
    """A callable that takes about `seconds` each call: a sleep, or repeated CPU matmuls."""
    if kind == "sleep":
        return lambda: time.sleep(seconds)
    import torch

    a = torch.randn(256, 256)

    def matmul() -> None:
        # a fixed amount of work (calibrated below), not a deadline, so contention shows as longer steps
        for _ in range(reps):
            a @ a

    reps, t0 = 1, time.perf_counter()
    for _ in range(20):
        a @ a
    per = (time.perf_counter() - t0) / 20
    reps = max(1, round(seconds / per))
    return matmul


def run_loop(manifest: Path, *, prefetch: bool, batch: int, window_chunks: int, batches: int, compute,
             digests: bool = False) -> dict:
    """One simulated training run; stall = seconds inside next(stream)."""
    from remeanflow.coupling_set import open_couplings
    from remeanflow.loader import CouplingStream

    stream = CouplingStream(open_couplings(manifest), batch_size=batch, seed=0, window_chunks=window_chunks,
                            prefetch=prefetch)
    stalls, hashes = [], []
    t0 = time.perf_counter()
    try:
        for _ in range(batches):
            t = time.perf_counter()
            b = next(stream)
            stalls.append(time.perf_counter() - t)
            if digests:
                h = hashlib.blake2b(digest_size=16)
                for key in ("x", "noise", "label", "sample_id"):
                    h.update(b[key].numpy().tobytes())
                hashes.append(h.hexdigest())
            compute()
    finally:
        stream.close()
    return {"stall_s": sum(stalls), "stall_after_first_s": sum(stalls[1:]), "max_stall_s": max(stalls),
            "first_stall_s": stalls[0], "wall_s": time.perf_counter() - t0, "hashes": hashes}


def main(argv: list[str] | None = None) -> int:
    from coupling_stream import stream_arguments

    ap = stream_arguments(8192, __doc__)
    ap.add_argument("--step-ms", type=float, default=50.0, help="simulated compute per step, milliseconds")
    ap.add_argument("--compute", choices=("sleep", "matmul"), default="sleep")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from coupling_stream import _fmt, _ratio, make_set

    from remeanflow import couplings

    torch.set_num_threads(args.threads)
    # the format-/1 manifest is the point of the baseline: its warning on every open is no news here
    logging.getLogger("remeanflow.coupling_set").setLevel(logging.ERROR)
    shape = tuple(args.shape)
    compute = make_compute(args.compute, args.step_ms / 1000)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="stream-prefetch-") as tmp:
        manifest, setup_s = make_set(Path(tmp), num_samples=args.num_samples, num_shards=args.shards,
                                     chunk=args.chunk, shape=shape, dtype=args.dtype, num_classes=10,
                                     digest=couplings.DEFAULT_DIGEST)
        manifests = {"recompute": format_1_manifest(manifest), "stored": manifest, "prefetch": manifest}
        kept = json.loads(manifest.read_text())["truncation"]["kept"]
        batches = max(1, round(args.epochs * kept / args.batch))
        kw = dict(batch=args.batch, window_chunks=args.window_chunks, batches=batches, compute=compute)
        # untimed: imports, page cache, allocator -- and the check that all modes give the same batches
        hashes = {m: run_loop(manifests[m], prefetch=m == "prefetch", digests=True, **kw)["hashes"] for m in MODES}
        identical = hashes["recompute"] == hashes["stored"] == hashes["prefetch"]
        for r in range(args.repeats):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                out = run_loop(manifests[mode], prefetch=mode == "prefetch", **kw)
                del out["hashes"]
                runs[mode].append(out)

    stats = ("stall_s", "stall_after_first_s", "max_stall_s", "first_stall_s", "wall_s")
    median = {m: {s: statistics.median(r[s] for r in runs[m]) for s in stats} for m in MODES}
    compute_s = batches * args.step_ms / 1000
    result = {
        "format": FORMAT,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "shape": list(shape),
                   "kept": kept, "batches_per_run": batches, "windows_per_run": None},
        "setup_seconds": setup_s,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "torch": torch.__version__},
        "identical_batches": identical,
        "modes": {m: {"runs": runs[m], "median": median[m]} for m in MODES},
        "stall_ratio_vs_recompute": {m: _ratio(median["recompute"]["stall_s"], median[m]["stall_s"]) for m in MODES},
        "steady_stall_ratio_vs_recompute": {
            m: _ratio(median["recompute"]["stall_after_first_s"], median[m]["stall_after_first_s"]) for m in MODES},
        "nominal_compute_seconds": compute_s,
    }
    chunks = -(-args.num_samples // args.chunk)
    result["config"]["windows_per_run"] = round(args.epochs * -(-chunks // args.window_chunks), 3)

    print(f"stream stalls, {args.num_samples} couplings {'x'.join(map(str, shape))} {args.dtype}, chunk {args.chunk}, "
          f"window {args.window_chunks} chunks, batch {args.batch}, {batches} steps of {args.step_ms:g} ms "
          f"({args.compute}) per run, {args.repeats} repeat(s), {args.threads} thread(s)")
    print(f"  batches identical in all modes: {identical}")
    labels = {"recompute": "recompute, synchronous (baseline)", "stored": "stored mask, synchronous",
              "prefetch": "stored mask, prefetch"}
    for m in MODES:
        s = median[m]
        print(f"  {labels[m]:34s} stall {s['stall_s']:7.3f} s (after the first batch "
              f"{s['stall_after_first_s']:7.3f} s, longest {s['max_stall_s']:6.3f} s)  "
              f"wall {s['wall_s']:7.2f} s (compute {compute_s:.2f} s)")
    for m in ("stored", "prefetch"):
        print(f"  stall, baseline / {m}: {_fmt(result['stall_ratio_vs_recompute'][m], '.1f')}x total, "
              f"{_fmt(result['steady_stall_ratio_vs_recompute'][m], '.1f')}x after the first batch")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
