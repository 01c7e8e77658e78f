"""Benchmark the training data stream with and without chunk-digest verification.

`loader.CouplingStream` over a merged coupling set (`coupling_set.open_couplings`), as training
reads it: whole Zarr chunks per shuffle window, truncation, shuffle, float32 batches. Three modes,
measured in the same run:

* ``on`` (the default of every training and merge read): each chunk read is checked against the
  digests recorded when it was written, which bind the chunk's position (shard, chunk index,
  sample ids) as well as its bytes, and its sample ids against the position's
  (`couplings.read_checked_chunk`);
* ``bytes``: the check as it was before the digests bound the position (format ``.../shard/2``):
  the digest of the bytes alone, no sample-id check -- a second store written and read with
  `couplings.position_header` returning no header and the id check off (`position_free_digests`);
* ``off`` (`open_couplings(..., verify=False)`): no check, the baseline.

The stores are made in a temporary folder: `--num-samples` couplings of `--shape` (default 4x64x64
float32, the 512px latent) in `--shards` shards of generation chunks of `--chunk`, with a cheap
stand-in for the teacher, then merged (`coupling_set.merge_shards`, 90% quantile truncation).

Each repeat reads `--epochs` epochs of the stream from a fresh reader, the modes in turn, in a
rotating order (so all see the same machine load; the stores are in the page cache after the
merge, so this measures the CPU cost, not the disk). Each run is timed three ways: wall clock, this process's
CPU time (user + system; on a shared machine the wall clock also counts the time other processes
held the CPU), and its user time alone. The stream allocates large arrays (a window of 16 chunks
of 256 4x64x64 couplings is 256 MiB per array), so the system time -- page faults, the same work
in both modes -- varies a lot from run to run (tenths of a second), while the digests are user
time. Reported: samples/s (best and median over repeats) and the overhead of verification,
100 * (t_on / t_off - 1), from the best times (the least disturbed) and from the medians, for each
clock (and the same for ``bytes``); and the headlines, robust to that noise: the CPU time
verification adds (median user time on minus off) over the baseline's median CPU time (user +
system), and the part of it that binding the position adds (median user time on minus bytes, same
denominator). One CPU thread (`--threads`).

    python benchmarks/coupling_stream.py --json benchmarks/results/coupling-stream-cpu.json
    python benchmarks/coupling_stream.py --num-samples 512 --chunk 32 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

FORMAT = "remeanflow.coupling-stream-bench/1"


def make_set(root: Path, *, num_samples: int, num_shards: int, chunk: int, shape: tuple[int, ...], dtype: str,
             num_classes: int, digest: str, endpoint_dtype: str | None = None,
             store_noise: bool = True) -> tuple[Path, float]:
    """A merged coupling set in `root` (noise in `dtype`, endpoints in `endpoint_dtype`, default the
    same; `store_noise=False`: compact stores); returns (manifest path, seconds to make it)."""
    import torch

    from remeanflow import coupling_set, couplings, reflow_index

    def generate(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # a cheap, non-constant stand-in for the teacher ODE (never all zeros: Zarr skips fill-value chunks)
        return torch.tanh(0.8 * noise) + 0.01 * labels.to(noise.dtype).reshape(-1, *([1] * (noise.ndim - 1)))

    t0 = time.perf_counter()
    index = root / "index.zarr"
    reflow_index.build_index(index, mode="random", num_samples=num_samples, num_classes=num_classes, seed=0)
    fingerprint = {"teacher_sha256": "bench", "sampler": {"steps": 0}, "seed": 0}
    paths = [root / f"shard-{k:05d}.zarr" for k in range(num_shards)]
    for k, path in enumerate(paths):
        couplings.create_shard_store(path, index_store=index, shard=k, num_shards=num_shards, chunk=chunk,
                                     shape=shape, noise_dtype=dtype, endpoint_dtype=endpoint_dtype or dtype, seed=0,
                                     fingerprint=fingerprint, digest=digest, store_noise=store_noise)
        couplings.generate_shard(path, generate, progress=False)
    manifest = root / "manifest.json"
    coupling_set.merge_shards(paths, manifest, index_store=index, quantile=0.9, progress=False)
    return manifest, time.perf_counter() - t0


CLOCKS = ("cpu", "user", "wall")
MODES = ("on", "bytes", "off")  # module docstring


@contextlib.contextmanager
def position_free_digests():
    """Inside: chunk digests of the bytes alone and no sample-id check, as before the digests bound
    the chunk's position (the ``bytes`` mode; stores written inside are read back inside)."""
    from remeanflow import couplings

    saved = couplings.position_header, couplings._misplaced_ids
    couplings.position_header = lambda attrs, i, name: b""
    couplings._misplaced_ids = lambda attrs, i, ids: None
    try:
        yield
    finally:
        couplings.position_header, couplings._misplaced_ids = saved


def _clocks() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime, "wall": time.perf_counter()}


def time_stream(manifest: Path, *, verify: bool, batch: int, window_chunks: int, batches: int,
                position_free: bool = False) -> dict[str, float]:
    """Seconds per clock (`CLOCKS`) to draw `batches` batches from a fresh stream (reader opened
    outside the timing); `position_free`: inside `position_free_digests` (a store written there)."""
    from remeanflow.coupling_set import open_couplings
    from remeanflow.loader import CouplingStream

    with position_free_digests() if position_free else contextlib.nullcontext():
        stream = CouplingStream(open_couplings(manifest, verify=verify), batch_size=batch, seed=0,
                                window_chunks=window_chunks)
        start = _clocks()
        for _ in range(batches):
            next(stream)
        end = _clocks()
    return {clock: end[clock] - start[clock] for clock in CLOCKS}


def time_mode(manifests: dict[str, Path], mode: str, **kw) -> dict[str, float]:
    """`time_stream` in one of `MODES`."""
    return time_stream(manifests[mode], verify=mode != "off", position_free=mode == "bytes", **kw)


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 (a clock too coarse for a tiny run)."""
    return a / b if b > 0 else None


def _percent(on: float, off: float) -> float | None:
    """100 * (on / off - 1), or None when off is 0."""
    ratio = _ratio(on, off)
    return None if ratio is None else 100 * (ratio - 1)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def digest_gb_per_s(algorithm: str, nbytes: int = 1 << 25, repeats: int = 5) -> float:
    """Throughput of the chunk digest alone here (context for the overhead)."""
    from remeanflow import couplings

    buf = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        couplings.array_digest(buf, algorithm)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def position_seconds_per_chunk(manifest: Path, loops: int = 500, repeats: int = 5) -> float:
    """CPU seconds (best of `repeats`) of what binding the position adds to one chunk read: the four
    position headers hashed before the bytes and the sample-id check (context for the ``on`` -
    ``bytes`` difference, which is within the noise of a shared machine)."""
    from remeanflow import couplings

    attrs = couplings.read_shard_attrs(manifest.parent / json.loads(manifest.read_text())["shards"][-1]["path"])
    ids = np.arange(*couplings.chunk_position(attrs, 0)["sample_ids"])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(loops):
            for name in couplings.DATA_ARRAYS:
                couplings.position_header(attrs, 0, name)
            assert couplings._misplaced_ids(attrs, 0, ids) is None
        best = min(best, (time.process_time() - t0) / loops)
    return best


def stream_arguments(num_samples: int, doc: str) -> argparse.ArgumentParser:
    """The store and stream options the stream benchmarks share (this one and stream_prefetch.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=num_samples)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="generation batch = one Zarr chunk (config default 256)")
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64])
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--batch", type=int, default=128, help="per-process training batch (config default 128)")
    ap.add_argument("--window-chunks", type=int, default=16, help="shuffle window in chunks (config default 16)")
    ap.add_argument("--epochs", type=float, default=2.0, help="stream epochs per timed run")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = stream_arguments(4096, __doc__)
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per mode (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--digest", default=None, help="chunk digest algorithm of the store, one of "
                    "couplings.DIGEST_ALGORITHMS (default: the library's, couplings.DEFAULT_DIGEST)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.digest is None:
        from remeanflow import couplings

        args.digest = couplings.DEFAULT_DIGEST

    import torch

    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="coupling-stream-") as tmp:
        store = dict(num_samples=args.num_samples, num_shards=args.shards, chunk=args.chunk, shape=shape,
                     dtype=args.dtype, num_classes=10, digest=args.digest)
        manifest, setup_s = make_set(Path(tmp) / "positional", **store)
        with position_free_digests():
            manifests = {"on": manifest, "off": manifest, "bytes": make_set(Path(tmp) / "bytes", **store)[0]}
        kept = json.loads(manifest.read_text())["truncation"]["kept"]
        batches = max(1, round(args.epochs * kept / args.batch))
        position_s = position_seconds_per_chunk(manifest)
        kw = dict(batch=args.batch, window_chunks=args.window_chunks, batches=batches)
        for mode in MODES:  # warm-up, not timed: imports, page cache, allocator
            time_mode(manifests, mode, **kw)
        times: dict[str, dict[str, list[float]]] = {m: {clock: [] for clock in CLOCKS} for m in MODES}
        for r in range(args.repeats):
            for mode in MODES[r % 3:] + MODES[: r % 3]:  # each mode first, second and last in turn
                for clock, seconds in time_mode(manifests, mode, **kw).items():
                    times[mode][clock].append(seconds)

    samples = batches * args.batch
    sample_bytes = 2 * int(torch.tensor([], dtype=getattr(torch, args.dtype)).element_size())
    for s in shape:
        sample_bytes *= s
    result = {
        "format": FORMAT,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "shape": list(shape),
                   "kept": kept, "batches_per_run": batches, "samples_per_run": samples,
                   "noise_endpoint_bytes_per_sample": sample_bytes},
        "setup_seconds": setup_s,
        "digest_gb_per_s": digest_gb_per_s(args.digest),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "torch": torch.__version__},
        "modes": {},
    }
    for mode, clocks in times.items():
        result["modes"][mode] = {
            clock: {"seconds": ts, "best_samples_per_s": _ratio(samples, min(ts)),
                    "median_samples_per_s": _ratio(samples, statistics.median(ts))}
            for clock, ts in clocks.items()
        }
    for key, mode in (("overhead_percent", "on"), ("bytes_overhead_percent", "bytes")):
        result[key] = {
            clock: {"best": _percent(min(times[mode][clock]), min(times["off"][clock])),
                    "median": _percent(statistics.median(times[mode][clock]), statistics.median(times["off"][clock]))}
            for clock in CLOCKS
        }
    user = {mode: statistics.median(times[mode]["user"]) for mode in MODES}
    baseline_cpu = statistics.median(times["off"]["cpu"])
    result["added_cpu_percent"] = 100 * (user["on"] - user["off"]) / baseline_cpu
    result["added_cpu_percent_bytes"] = 100 * (user["bytes"] - user["off"]) / baseline_cpu
    result["added_cpu_percent_by_position"] = 100 * (user["on"] - user["bytes"]) / baseline_cpu
    # chunk reads per timed run: each epoch reads every chunk once and yields the kept couplings
    chunk_reads = samples / kept * -(-args.num_samples // args.chunk)
    result["position_us_per_chunk"] = 1e6 * position_s
    result["position_percent_of_stream_cpu"] = 100 * position_s * chunk_reads / baseline_cpu

    print(f"coupling stream, {args.num_samples} couplings {'x'.join(map(str, shape))} {args.dtype}, digest {args.digest}, "
          f"chunk {args.chunk}, window {args.window_chunks} chunks, batch {args.batch}, {batches} batches per run, {args.threads} thread(s)")
    labels = {"off": "verification off (baseline)", "bytes": "bytes-only digests (before)",
              "on": "position-bound digests (now)"}
    for clock in CLOCKS:
        for mode in ("off", "bytes", "on"):
            m = result["modes"][mode][clock]
            print(f"  {clock:4s} {labels[mode]:30s} best {_fmt(m['best_samples_per_s'], '8.1f')} samples/s   "
                  f"median {_fmt(m['median_samples_per_s'], '8.1f')} samples/s")
        for key, what in (("bytes_overhead_percent", "bytes-only"), ("overhead_percent", "position-bound")):
            o = result[key][clock]
            print(f"  {clock:4s} overhead of {what} verification: {_fmt(o['best'], '+.1f')}% (best), "
                  f"{_fmt(o['median'], '+.1f')}% (median)")
    print(f"  CPU time added over the baseline's median CPU time (median user time minus the baseline's): "
          f"position-bound {result['added_cpu_percent']:+.1f}%, bytes-only {result['added_cpu_percent_bytes']:+.1f}%, "
          f"so binding the position adds {result['added_cpu_percent_by_position']:+.2f}%")
    print(f"  binding the position, timed alone: {result['position_us_per_chunk']:.0f} us per chunk read = "
          f"{result['position_percent_of_stream_cpu']:.2f}% of the baseline's median CPU time")
    print(f"  {args.digest} alone: {result['digest_gb_per_s']:.1f} GB/s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
