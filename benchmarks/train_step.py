"""Benchmark one MeanFlow training step: forward-mode JVP (`torch.func.jvp`) against the official
double-backward reference (`torch.autograd.functional.jvp(create_graph=True)`).

Modes (`remeanflow.meanflow.jvp_t`): "autograd" (the official reference), "forward" (plain
forward for u plus a graph-free forward-mode tangent) and "forward-fused" (one `torch.func.jvp`
with autograd recording both the primal and the tangent computation).

A step is what the training loop does per batch: forced weight normalisation, the MeanFlow loss
(forward + JVP; in stage 2 also the no-grad CFG forward), backward, grad clipping (stage 2) and an
Adam step. All modes start from the same initial weights and see the same batch, (t, r), labels
and guidance scale. Each (stage, mode) runs in a fresh subprocess, so that its peak resident
memory (getrusage maxrss) is its own; on CUDA the peak is torch.cuda.max_memory_allocated.

    python benchmarks/train_step.py --preset toy-16 --batch 8 --repeats 5 --stage both --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

MODES = ("autograd", "forward", "forward-fused")  # the reference first


def current_rss_mb() -> float:
    """Resident set size now, from /proc (getrusage only reports the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_batch(net, batch: int, stage: int, seed: int, w_max: float, device):
    """The benchmark batch: random couplings, class dropout 0.1, Re-MeanFlow (t, r), and for
    stage 2 a guidance scale w' ~ U(1, w_max) with the paper's (w, k)."""
    import torch

    from remeanflow import meanflow

    g = torch.Generator().manual_seed(seed)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    x, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = meanflow.drop_labels(torch.randint(0, net.label_dim, (batch,), generator=g), 0.1, g)
    t, r = meanflow.sample_t_r(batch, g)
    w = w_pi = 1.0
    if stage == 2:
        w_pi = 1 + (w_max - 1) * torch.rand([], generator=g).item()
        w, _ = meanflow.cfg_weights(w_pi)
    tensors = dict(x=x, noise=noise, labels=labels, t=t, r=r)
    return {k: v.to(device) for k, v in tensors.items()}, dict(w=w, w_pi=w_pi)


def worker(args: argparse.Namespace) -> dict:
    """Time `repeats` training steps of one (stage, mode) in this process."""
    import torch

    from remeanflow import meanflow, networks

    if args.threads:
        torch.set_num_threads(args.threads)
    args.stage = int(args.stage)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = networks.build(args.preset).to(device).train()
    net.init_time_embedding_()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
    inputs, guidance = make_batch(net, args.batch, args.stage, args.seed + 1, args.w_max, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        net.normalize_weights_()  # outside the loss: the forward must stay functional for func.jvp
        loss = meanflow.meanflow_loss(net, **inputs, **guidance, jvp=args.mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.stage == 2:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.item()

    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    first_loss = step()  # warm-up, excluded from the timings
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    out = dict(
        stage=args.stage, mode=args.mode, w_pi=guidance["w_pi"], first_loss=first_loss, times_s=times,
        median_s=statistics.median(times), threads=torch.get_num_threads(), loadavg=os.getloadavg(),
        params=sum(p.numel() for p in net.parameters()),
    )
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - mem_before) / 2**20
        out["peak_kind"] = "cuda max_memory_allocated above the pre-step allocation"
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        out["peak_kind"] = "maxrss minus RSS before the first step"
    return out


def run_worker(args: argparse.Namespace, stage: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--stage", str(stage), "--mode", mode]
    for key in ("preset", "batch", "repeats", "seed", "device", "w_max"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stage", choices=["1", "2", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--w-max", dest="w_max", type=float, default=3.0, help="stage 2 draws w' ~ U(1, w_max)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="JVP modes to run; autograd (the reference) is always included")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="forward", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    args.modes = ["autograd"] + [mode for mode in dict.fromkeys(args.modes) if mode != "autograd"]
    results = []
    print(f"preset {args.preset}, batch {args.batch}, {args.repeats} timed steps after 1 warm-up, "
          f"device {args.device}, host {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    for stage in stages:
        runs = {mode: run_worker(args, stage, mode) for mode in args.modes}
        ref = runs["autograd"]
        print(f"stage {stage} (w' = {ref['w_pi']:.3f}, {ref['params']:,} params, {ref['threads']} threads)")
        for mode, run in runs.items():
            # Ratios against the reference run of this invocation, same weights and batch.
            run["speedup"] = ref["median_s"] / run["median_s"]
            run["memory_ratio"] = run["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
            run["loss_rel_diff"] = abs(run["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
            print(f"  {mode:13s} median {run['median_s']:.4f} s/step  x{run['speedup']:.2f}  "
                  f"peak {run['peak_mb']:8.1f} MB  x{run['memory_ratio']:.2f}  "
                  f"loss diff {run['loss_rel_diff']:.1e}  load {run['loadavg'][0]:.2f}")
        results.append(dict(stage=stage, runs=runs))
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, results=results),
                                        indent=2))


if __name__ == "__main__":
    main()
