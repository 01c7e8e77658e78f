"""Predicted GPU memory and FLOPs of one training step, without a GPU (`remeanflow.step_cost`),
against the official code's measured H200 peaks.

The project's own step (forced weight normalisation, MeanFlow loss with its JVP, backward, Adam,
EMA) runs twice on fake tensors for EDM2-S at the 512 latent (4x64x64, the official
architecture), bf16 autocast, stage 1: `jvp: autograd` (the official double backward) at batch 16
and 64 is compared with the official step's `torch.cuda.max_memory_allocated` on an H200 (23.0 /
75.5 GiB, benchmarks/README.md), and `jvp: tangent` (the project's default) beside it, as a
fraction of the official figure (the project's goal: <= 0.6x). A fake run costs the same at any
batch (shapes only): on a 2-core CPU about 1-2 minutes per step pair.

    python benchmarks/step_memory.py --json benchmarks/results/step-memory-cpu.json
    python benchmarks/step_memory.py --preset toy-16 --batches 4 8 --precision fp32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from remeanflow import step_cost  # noqa: E402
from remeanflow.fileio import atomic_path  # noqa: E402

FORMAT = "remeanflow.step-memory/1"
GIB = 2**30
# The official step's peaks, EDM2-S 512, stage 1, bf16, double-backward JVP, one H200
# (benchmarks/README.md, "The paper's own code, measured"): batch -> GiB.
OFFICIAL_PEAK_GIB = {16: 23.0, 64: 75.5}
TOLERANCE = 0.20  # issue 23: the prediction within +-20% of the official peaks
MEMORY_GOAL = 0.6  # the project's goal: <= 0.6x the official step's memory
# What the prediction leaves out (each is allocated on a GPU on top of the tensors the ops create).
NOT_MODELLED = (
    "CUDA caching-allocator block sizes beyond 512-byte rounding (large blocks not split keep up to 1 MiB tails)",
    "cuDNN convolution and cuBLAS workspaces (chosen by autotuning, up to hundreds of MiB)",
    "bf16 under CPU autocast: CUDA autocast also casts convolutions/matmuls to bf16 but keeps softmax, "
    "norms and sums in float32, so a few saved activations differ in precision",
    "the official code's own differences from this project's autograd mode (its EMA/optimizer layout, "
    "weight normalisation inside the forward, its input pipeline)",
)


def environment() -> dict:
    import torch

    return dict(host=platform.node(), cpu_count=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), loadavg=os.getloadavg())


def measure(args: argparse.Namespace, jvp: str, batch: int) -> dict:
    cost = step_cost.measure_step(args.preset, batch, jvp=jvp, precision=args.precision, stage=args.stage)
    row = cost.to_dict()
    row.update(peak_gib=cost.peak_bytes / GIB, peak_cuda_gib=cost.peak_cuda_bytes / GIB,
               by_category_gib={k: v / GIB for k, v in cost.by_category.items()}, tflops=cost.flops / 1e12)
    official = OFFICIAL_PEAK_GIB.get(batch) if args.preset == "edm2-img512-s" and args.stage == 1 else None
    if official is not None:
        row["official_peak_gib"] = official
        if jvp == "autograd":
            row["relative_error"] = row["peak_cuda_gib"] / official - 1
            row["within_tolerance"] = abs(row["relative_error"]) <= TOLERANCE
        else:
            row["fraction_of_official"] = row["peak_cuda_gib"] / official
            row["meets_memory_goal"] = row["fraction_of_official"] <= MEMORY_GOAL
    return row


def describe(row: dict) -> str:
    cat = "  ".join(f"{k} {v:.2f}" for k, v in row["by_category_gib"].items())
    line = (f"  {row['jvp']:9s} batch {row['batch']:3d}: peak {row['peak_cuda_gib']:6.2f} GiB ({cat})  "
            f"{row['tflops']:.2f} TFLOP/step  traced in {row['seconds']:.0f} s")
    if "relative_error" in row:
        line += f"\n      official {row['official_peak_gib']:.1f} GiB: relative error {row['relative_error']:+.1%}"
    if "fraction_of_official" in row:
        line += f"\n      {row['fraction_of_official']:.2f}x the official {row['official_peak_gib']:.1f} GiB (goal <= {MEMORY_GOAL})"
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edm2-img512-s", help="networks preset")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="per-GPU batches")
    parser.add_argument("--jvp", nargs="+", default=["autograd", "tangent"], help="train.jvp modes")
    parser.add_argument("--precision", choices=sorted(step_cost.PRECISIONS), default="bf16")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # fake tensors compute nothing: threads only add contention
    args = parse_args(argv)
    print(f"{args.preset}, {args.precision}, stage {args.stage}: one steady-state training step on fake tensors")
    rows = []
    for jvp in args.jvp:
        for batch in args.batches:
            rows.append(measure(args, jvp, batch))
            print(describe(rows[-1]), flush=True)
    failures = [f"{r['jvp']} batch {r['batch']}: {r['relative_error']:+.1%} outside +-{TOLERANCE:.0%}"
                for r in rows if r.get("within_tolerance") is False]
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(dict(format=FORMAT, env=environment(), args=settings, rows=rows,
                                           tolerance=TOLERANCE, memory_goal=MEMORY_GOAL, not_modelled=NOT_MODELLED,
                                           passed=not failures, failures=failures), indent=2))
    for failure in failures:
        print(f"ERROR: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
