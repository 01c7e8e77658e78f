"""Benchmark one MeanFlow training step: forward-mode JVP (`torch.func.jvp`) against the official
double-backward reference (`torch.autograd.functional.jvp(create_graph=True)`).

Modes (`remeanflow.meanflow.jvp_t`): "autograd" (the official reference), "tangent" (the
default: the net's hand-derived tangent pass, `Precond.forward(..., v_hat=)`, one pass for u and
du/dt), "forward" (plain forward for u plus a graph-free `torch.func.jvp` tangent) and
"forward-fused" (one `torch.func.jvp` with autograd recording both the primal and the tangent
computation). `--compile` adds each non-reference mode once more, run through
`remeanflow.train_loss.meanflow_loss_fn` compiled as one graph (torch.compile; AOTAutograd compiles
the backward), reported as "<mode>+compile"; the reference always runs eagerly, because
torch.compile cannot capture the double-backward trick. The first step (compilation included)
is reported separately and excluded from the timings.

A step is what the training loop does per batch: forced weight normalisation, the MeanFlow loss
(forward + JVP; in stage 2 also the no-grad CFG forward), backward, grad clipping (stage 2) and an
Adam step. All modes start from the same initial weights -- a random net whose gains are set
non-zero (`nonzero_gains_`; at EDM2's zero init the output ignores most weights and every mode
would give the same loss trivially) -- and see the same batch, (t, r), labels and guidance scale.
The first step's loss of every mode is checked against the reference (`--loss-rtol`); the run
fails (exit 1) when it is out of tolerance. Each (stage, mode) runs in a fresh subprocess, so
that its peak resident memory (getrusage maxrss) is its own; on CUDA the peak is
torch.cuda.max_memory_allocated. On a shared machine use `--interleave`: all modes in one process,
their timed steps in turn, so that they see the same load (no memory figures then). Medians and
minima are both reported; the minimum is the step least disturbed by other processes.

    python benchmarks/train_step.py --preset toy-16 --batch 8 --repeats 5 --stage both --json out.json
    python benchmarks/train_step.py --preset toy-16 --batch 8 --threads 1 --compile --interleave --stage 1
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

MODES = ("autograd", "tangent", "forward", "forward-fused")  # the reference first
FORMAT = "remeanflow.train-step-bench/3"
# Default tolerance on the first step's loss against the reference: the modes compute the same
# function with different operation orders, so only rounding separates them.
DEFAULT_LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def current_rss_mb() -> float:
    """Resident set size now, from /proc (getrusage only reports the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def nonzero_gains_(net, emb_gain: float = 0.5, out_gain: float = 1.0):
    """Set EDM2's zero-initialised gains (every block's `emb_gain`, the U-Net's `out_gain`) to
    non-zero values, in place. At zero gains D(x) = c_skip x: the output ignores the U-Net, so a
    random-init benchmark would neither exercise realistic numerics nor detect a wrong fast path."""
    import torch

    from remeanflow import networks

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, networks.Block):
                module.emb_gain.fill_(emb_gain)
        net.unet.out_gain.fill_(out_gain)
    return net


def make_batch(net, batch: int, stage: int, seed: int, w_max: float, device, ratio_r_neq_t: float = 1.0):
    """The benchmark batch: random couplings, class dropout 0.1, Re-MeanFlow (t, r), and for
    stage 2 a guidance scale w' ~ U(1, w_max) with the paper's (w, k).

    Every row gets r != t by default (training uses 25%): the step's cost does not depend on r,
    but rows with r = t multiply du/dt by zero and would hide a wrong tangent from the loss check."""
    import torch

    from remeanflow import meanflow, misc

    g = torch.Generator().manual_seed(seed)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    x, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = misc.drop_labels(torch.randint(0, net.label_dim, (batch,), generator=g), 0.1, g)
    t, r = meanflow.sample_t_r(batch, g, ratio_r_neq_t=ratio_r_neq_t)
    w = w_pi = 1.0
    if stage == 2:
        w_pi = 1 + (w_max - 1) * torch.rand([], generator=g).item()
        w, _ = meanflow.cfg_weights(w_pi)
    tensors = dict(x=x, noise=noise, labels=labels, t=t, r=r)
    return {k: v.to(device) for k, v in tensors.items()}, dict(w=w, w_pi=w_pi)


def environment() -> dict:
    """What the numbers depend on besides the arguments."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(host=platform.node(), cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), loadavg=os.getloadavg())


def variants(args: argparse.Namespace) -> dict[str, tuple[str, bool]]:
    """Run name -> (JVP mode, compiled): every mode eagerly, the reference first, and with
    --compile every other mode compiled as well."""
    out = {mode: (mode, False) for mode in args.modes}
    if args.compile:
        out.update({f"{mode}+compile": (mode, True) for mode in args.modes if mode != "autograd"})
    return out


def setup(args: argparse.Namespace, mode: str, compiled: bool = False):
    """The step function of one mode and what describes it; every mode gets the same net and batch."""
    import torch

    from remeanflow import networks, train_loss

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = nonzero_gains_(networks.build(args.preset)).to(device).train()
    net.init_time_embedding_()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
    inputs, guidance = make_batch(net, args.batch, int(args.stage), args.seed + 1, args.w_max, device)
    compiled = compiled and mode != "autograd"
    loss_fn = train_loss.meanflow_loss_fn(net, jvp=mode, precision=args.precision,
                                     backend=args.compile_backend if compiled else None)

    def step() -> float:
        net.normalize_weights_()  # outside the loss: the forward must stay functional for func.jvp
        loss = loss_fn(**inputs, **guidance).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if int(args.stage) == 2:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item()

    info = dict(stage=int(args.stage), mode=mode, compiled=compiled, precision=args.precision, w_pi=guidance["w_pi"],
                params=sum(p.numel() for p in net.parameters()))
    return step, info


def timed(step) -> tuple[float, float]:
    start = time.perf_counter()
    loss = step()
    return loss, time.perf_counter() - start


def summary(info: dict, first: tuple[float, float], times: list[float]) -> dict:
    import torch

    return dict(info, first_loss=first[0], first_step_s=first[1], times_s=times, median_s=statistics.median(times),
                min_s=min(times), threads=torch.get_num_threads(), loadavg=os.getloadavg())


def worker(args: argparse.Namespace) -> dict:
    """Time `repeats` training steps of one (stage, mode) in this process, with its peak memory."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step, info = setup(args, args.mode, args.compiled)
    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    first = timed(step)  # warm-up (and compilation), excluded from the timings
    out = summary(info, first, [timed(step)[1] for _ in range(args.repeats)])
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - mem_before) / 2**20
        out["peak_kind"] = "cuda max_memory_allocated above the pre-step allocation"
    else:
        # With compilation the peak includes the compiler's own memory: only the eager figures
        # are comparable on the CPU.
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        out["peak_kind"] = "maxrss minus RSS before the first step"
    return out


def interleaved(args: argparse.Namespace, stage: int) -> dict[str, dict]:
    """All modes in this process, their timed steps taken in turn (round robin).

    On a shared machine the load changes over seconds; alternating the modes step by step
    exposes them to the same load, so their ratio is fair where separate runs are not. Peak
    memory is not separable in one process and is not reported.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args = argparse.Namespace(**{**vars(args), "stage": stage})
    steps = {name: setup(args, mode, compiled) for name, (mode, compiled) in variants(args).items()}
    firsts = {mode: timed(step) for mode, (step, _) in steps.items()}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(args.repeats):
        for mode, (step, _) in steps.items():
            times[mode].append(timed(step)[1])
    runs = {mode: summary(info, firsts[mode], times[mode]) for mode, (_, info) in steps.items()}
    for run in runs.values():
        run.update(peak_mb=None, peak_kind="not measured (--interleave: all modes share one process)")
    return runs


def run_worker(args: argparse.Namespace, stage: int, mode: str, compiled: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--stage", str(stage), "--mode", mode]
    for key in ("preset", "batch", "repeats", "seed", "device", "w_max", "precision", "compile_backend"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if compiled:
        cmd.append("--compiled")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for stage {stage}, mode {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, obj: dict) -> None:
    from remeanflow.fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--precision", choices=sorted(DEFAULT_LOSS_RTOL), default="fp32",
                        help="autocast precision of every mode, the reference included")
    parser.add_argument("--compile", action="store_true",
                        help="also run every non-reference mode with its loss compiled (torch.compile)")
    parser.add_argument("--compile-backend", dest="compile_backend", default="inductor",
                        help="torch.compile backend with --compile ('eager' only checks graph capture)")
    parser.add_argument("--loss-rtol", dest="loss_rtol", type=float, default=None,
                        help="tolerance on the first step's loss against the reference (default by precision: "
                             f"{DEFAULT_LOSS_RTOL})")
    parser.add_argument("--interleave", action="store_true",
                        help="run all modes in one process, alternating their steps (fair ratios under changing "
                             "load; no memory figures)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="tangent", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    if args.loss_rtol is None:
        args.loss_rtol = DEFAULT_LOSS_RTOL[args.precision]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    args.modes = ["autograd"] + [mode for mode in dict.fromkeys(args.modes) if mode != "autograd"]
    env = environment()
    results, failures = [], []
    print(f"preset {args.preset}, batch {args.batch}, {args.repeats} timed steps after 1 warm-up"
          f"{' (modes interleaved)' if args.interleave else ''}, "
          f"device {args.device}, {args.precision}, compile {args.compile_backend if args.compile else 'off'}, "
          f"host {env['host']}, {env['cpu_count']} CPUs, load {env['loadavg']}")
    for stage in stages:
        if args.interleave:
            runs = interleaved(args, stage)
        else:
            runs = {name: run_worker(args, stage, mode, compiled) for name, (mode, compiled) in variants(args).items()}
        ref = runs["autograd"]
        print(f"stage {stage} (w' = {ref['w_pi']:.3f}, {ref['params']:,} params, {ref['threads']} threads)")
        for mode, run in runs.items():
            # Ratios against the reference run of this invocation, same weights and batch.
            run["speedup"] = ref["median_s"] / run["median_s"]
            run["speedup_min"] = ref["min_s"] / run["min_s"]  # fastest steps: least disturbed by other load
            measured = run["peak_mb"] is not None and ref["peak_mb"] is not None and ref["peak_mb"] > 0
            run["memory_ratio"] = run["peak_mb"] / ref["peak_mb"] if measured else None
            run["loss_rel_diff"] = abs(run["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
            run["loss_ok"] = run["loss_rel_diff"] <= args.loss_rtol
            if not run["loss_ok"]:
                failures.append(f"stage {stage} {mode}: first-step loss {run['first_loss']!r} differs from the "
                                f"reference {ref['first_loss']!r} by {run['loss_rel_diff']:.2e} > {args.loss_rtol:.0e}")
            tag = mode
            memory = (f"peak {run['peak_mb']:8.1f} MB  x{run['memory_ratio']:.2f}" if run["memory_ratio"] is not None
                      else "peak n/a")
            print(f"  {tag:24s} median {run['median_s']:.4f} s/step  x{run['speedup']:.2f}  "
                  f"min {run['min_s']:.4f} s  x{run['speedup_min']:.2f}  {memory}  "
                  f"loss diff {run['loss_rel_diff']:.1e}  first step {run['first_step_s']:.1f} s  "
                  f"load {run['loadavg'][0]:.2f}")
        results.append(dict(stage=stage, runs=runs))
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json(args.json, dict(format=FORMAT, env=env, args=settings, results=results,
                                   passed=not failures, failures=failures))
    for failure in failures:
        print(f"ERROR: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
