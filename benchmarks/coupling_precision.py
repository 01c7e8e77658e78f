"""Endpoint error and CPU time of the coupling teacher in fp16 and bf16 autocast against fp32.

`couplings.precision` sets the teacher's autocast dtype (fp16: EDM2 and the official code; the
embedded default runs fp32). This runs the coupling job's own generate function
(`coupling_job.make_generate_fn`: EDM Heun, last step Euler, autoguidance
D_guide + w (D_main - D_guide)) once per precision on the same noise and classes, and reports for
each reduced precision the error of its endpoints x against the fp32 endpoints: RMS and max
|x - x_fp32| over all values, the RMS relative to the RMS of x_fp32, and the largest change of a
coupling's distance d = mean((n - x)^2) (what truncation ranks), together with the wall time of
each precision (best of `--repeats`, interleaved so all precisions see the same machine load).

The teacher is the embedded default's (`results/toy/teacher/net.pt` and `guide.pt`, trained by
the pipeline) when it exists, else random toy-16 nets with EDM2's zero-initialised gains set
non-zero (`--teacher random`; at zero gains the net is its skip path and every precision agrees).
Noise is the pipeline's per-sample noise (`sampling.per_sample_noise`), classes uniform.

    python benchmarks/coupling_precision.py --json benchmarks/results/cpu-coupling-precision-toy16.json
    python benchmarks/coupling_precision.py --smoke      # tiny nets, a few samples (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

FORMAT = "remeanflow.coupling-precision-bench/1"
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_TEACHER = ROOT / "results" / "toy" / "teacher"


def _nonzero_gains_(net, seed: int):
    """EDM2 initialises its gains to zero, which leaves only the skip path; set them non-zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.copy_(0.5 + torch.rand([], generator=g))
    return net


def load_teacher(which: str, preset: str):
    """(net, guide, description): the trained toy teacher of a pipeline run, or random nets."""
    import torch

    from remeanflow import checkpoints, networks
    from remeanflow.fileio import sha256_file

    if which != "random":
        folder = Path(which)
        net, guide = (checkpoints.load_net(folder / name)["net"].eval().requires_grad_(False)
                      for name in ("net.pt", "guide.pt"))
        return net, guide, {"kind": "trained", "folder": str(folder),
                            "net_sha256": sha256_file(folder / "net.pt"),
                            "guide_sha256": sha256_file(folder / "guide.pt")}
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(_nonzero_gains_(networks.build(preset), seed).eval().requires_grad_(False))
    return nets[0], nets[1], {"kind": "random", "preset": preset, "seeds": [0, 1]}


def measure(args) -> dict:
    import numpy as np
    import torch

    from remeanflow import accel, coupling_job, sampling
    from remeanflow.settings import CouplingSettings

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # other processes on the cores stretch every time below alike
    net, guide, teacher = load_teacher(args.teacher, args.preset)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise = sampling.per_sample_noise(args.seed, np.arange(args.samples), shape)
    labels = torch.randint(0, net.label_dim, (args.samples,), generator=torch.Generator().manual_seed(args.seed))
    cpu = torch.device("cpu")
    precisions = [p for p in PRECISIONS if p == "fp32" or accel.autocast_supported(cpu, accel.PRECISIONS[p])]

    def settings(precision: str) -> CouplingSettings:
        return CouplingSettings(heun_steps=args.heun_steps, guidance=args.guidance, precision=precision)

    generate = {p: coupling_job.make_generate_fn(net, guide, settings(p), cpu) for p in precisions}
    times: dict[str, list[float]] = {p: [] for p in precisions}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for p in precisions:  # interleaved: every precision sees the same machine load
            parts, t0 = [], time.perf_counter()
            for lo in range(0, args.samples, args.batch):
                parts.append(generate[p](noise[lo:lo + args.batch], labels[lo:lo + args.batch]))
            times[p].append(time.perf_counter() - t0)
            x = torch.cat(parts)
            if p in out and not torch.equal(out[p], x):
                raise RuntimeError(f"{p}: endpoints differ between repeats (not deterministic on this CPU)")
            out[p] = x

    ref = out["fp32"].double()
    d_ref = (noise.double() - ref).square().flatten(1).mean(dim=1)
    results = {}
    for p in precisions:
        best = min(times[p])
        entry = {"seconds_best": best, "seconds_all": times[p], "samples_per_s": args.samples / best,
                 "time_vs_fp32": best / min(times["fp32"])}
        if p != "fp32":
            err = out[p].double() - ref
            d = (noise.double() - out[p].double()).square().flatten(1).mean(dim=1)
            entry.update(
                rms_error=float(err.square().mean().sqrt()), max_abs_error=float(err.abs().max()),
                relative_rms_error=float(err.square().mean().sqrt() / ref.square().mean().sqrt()),
                max_abs_distance_change=float((d - d_ref).abs().max()),
                max_relative_distance_change=float(((d - d_ref).abs() / d_ref).max()),
            )
        results[p] = entry
    skipped = [p for p in PRECISIONS if p not in precisions]
    return {
        "format": FORMAT,
        "teacher": teacher,
        "settings": {"samples": args.samples, "batch": args.batch, "heun_steps": args.heun_steps,
                     "evaluations_per_net": 2 * args.heun_steps - 1, "guidance": args.guidance,
                     "threads": args.threads, "repeats": args.repeats, "seed": args.seed, "shape": list(shape)},
        "reference": {"rms": float(ref.square().mean().sqrt()), "max_abs": float(ref.abs().max()),
                      "mean_distance": float(d_ref.mean())},
        "precisions": results,
        "skipped": {p: "this torch has no CPU autocast for it" for p in skipped},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "loadavg_1_5_15_before": list(load_before),
                        "loadavg_1_5_15_after": list(os.getloadavg())},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None,
                        help="folder with net.pt and guide.pt, or 'random' (default: results/toy/teacher if it "
                             "exists, else random)")
    parser.add_argument("--preset", default="toy-16", help="network preset of --teacher random")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="generation batch (the embedded default's chunk)")
    parser.add_argument("--heun-steps", dest="heun_steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=1.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random nets, 6 samples, 2 Heun steps, 1 repeat")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher, args.preset, args.samples, args.batch = "random", "tiny", 6, 4
        args.heun_steps, args.repeats, args.threads = 2, 1, 1
    if args.teacher is None:
        args.teacher = str(DEFAULT_TEACHER) if (DEFAULT_TEACHER / "net.pt").exists() else "random"
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
