"""GPU benchmark: the project's fast paths against a plain eager reference, on one device.

(a) Coupling generation: EDM2-S (main) + EDM2-XS (guide) at 4x64x64 with autoguidance, EDM Heun
    with 32 steps (63 evaluations per net), batch 256. Reference: `sampling.edm_heun` eagerly under
    fp16 autocast (the paper's code runs fp16). Fast: `accel.FastDenoiser` (bf16 autocast,
    channels_last, SDPA attention, torch.compile of the fused guided denoiser), with and without
    CUDA graph replay; and the coupling job's own generate function (`coupling_job.make_generate_fn`)
    with `couplings.fast_path` off and on, exactly as the pipeline calls it. Reported: samples/s,
    FLOPs per sample (torch's FLOP counter on one forward of each net, times the evaluations) and
    the fraction of the chip's dense bf16 peak.
(b) Training step, stage 1 and stage 2, batch 16 and 64: time and peak memory
    (torch.cuda.max_memory_allocated over the timed steps), with the step-cost model's prediction
    beside it (`predicted`: `remeanflow.step_cost` on fake tensors). Reference: `jvp="autograd"` (the
    official double-backward trick), eager, bf16 autocast, NCHW, foreach Adam. Fast: the net's
    own tangent pass (`jvp="tangent"`; `--fast-jvp forward` for torch.func.jvp), bf16 autocast,
    channels_last, the loss compiled as one graph (`train_loss.meanflow_loss_fn`), fused Adam.

The nets are random EDM2 nets with non-zero gains (`train_step.nonzero_gains_`); both paths of a
part start from the same weights and see the same inputs. Numerics are checked before any speed
is trusted: the largest per-sample relative L2 error of the fast endpoints against the
reference (`--sampler-rtol`) and the relative difference of the first training step's loss
(`--loss-rtol`); out of tolerance, the run prints the failure and exits 1 (the JSON records it).
Targets (benchmarks/README.md): coupling generation >= 29 samples/s on an H200 (2x the paper's code),
stage-1 step at batch 64 <= 0.35 s with <= 0.6x the reference's memory; `--require-targets`
makes a missed target an error too.

    python benchmarks/gpu_bench.py --json gpu_bench.json
    python benchmarks/gpu_bench.py --parts train --train-batches 64 --stages 1 --json s1b64.json
    python benchmarks/gpu_bench.py --smoke --json smoke.json   # same code paths, CPU, tiny nets, < 1 min

`--smoke` runs everything on the CPU with `toy-16`/`toy-16-xs` nets, batches of 2-4, 2 Heun steps,
fp32 references and torch.compile's "eager" backend (graph capture with fullgraph=True, no code
generation); CUDA graphs and fused Adam cannot run there and are reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import make_batch, nonzero_gains_

from remeanflow import accel, coupling_job, gpu_specs, meanflow, misc, networks, sampling, step_cost, train, train_loss
from remeanflow.settings import CouplingSettings
from remeanflow.fileio import atomic_path

FORMAT = "remeanflow.gpu-bench/1"
# Dense (no sparsity) bf16 tensor-core peaks by device name: remeanflow/gpu_specs.py (its sources;
# benchmarks/README.md's H200 figure, ~790, came from a different one). --peak-tflops overrides.
PEAK_BF16_TFLOPS = gpu_specs.PEAK_BF16_TFLOPS
TARGET_SAMPLES_PER_S_H200 = 29.0  # 2x the paper's code (14.4 samples/s, benchmarks/README.md)
TARGET_STAGE1_B64_S = 0.35
TARGET_MEMORY_RATIO = 0.6

GPU_DEFAULTS = dict(main_preset="edm2-img512-s", guide_preset="edm2-img512-xs", heun_steps=32, sampler_batch=256,
                    train_batches=[16, 64], sampler_repeats=2, train_repeats=5, reference_precision="fp16",
                    train_reference_precision="bf16", compile_backend="inductor", device="cuda", threads=0)
SMOKE_DEFAULTS = dict(main_preset="toy-16", guide_preset="toy-16-xs", heun_steps=2, sampler_batch=4,
                      train_batches=[2, 4], sampler_repeats=1, train_repeats=2, reference_precision="fp32",
                      train_reference_precision="fp32", compile_backend="eager", device="cpu", threads=1)


# ----------------------------------------------------------------------------------------------
# Helpers.


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, where it came from); (None, reason) when unknown."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {override}")
        return override, "--peak-tflops"
    found = gpu_specs.peak_bf16_tflops(device_name)
    if found is not None:
        return found[1], f"default for {found[0]!r} (dense bf16 data-sheet value, remeanflow/gpu_specs.py)"
    return None, f"unknown for {device_name!r}: pass --peak-tflops"


def environment(device: torch.device) -> dict:
    env = dict(host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               cpu_count=os.cpu_count(), loadavg=os.getloadavg(), threads=torch.get_num_threads(),
               cudnn_benchmark=torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(device_name=f"cpu ({platform.processor() or platform.machine()})")
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Start a path from a clean slate: no cached graphs (its compilation is measured, and
    dynamo's per-function recompilation limit is not reached), no cached memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def random_net(preset: str, seed: int, device: torch.device) -> networks.Precond:
    """A random EDM2 net with non-zero gains and Re-MeanFlow's t/r embeddings initialised."""
    torch.manual_seed(seed)
    net = nonzero_gains_(networks.build(preset))
    net.init_time_embedding_()
    return net.to(device)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ----------------------------------------------------------------------------------------------
# (a) Coupling generation.


def sampler_part(args: argparse.Namespace, device: torch.device, peak: float | None) -> tuple[dict, list[dict]]:
    main = random_net(args.main_preset, args.seed, device).eval()
    guide = random_net(args.guide_preset, args.seed + 1, device).eval()
    if (main.img_channels, main.img_resolution, main.label_dim) != (guide.img_channels, guide.img_resolution,
                                                                   guide.label_dim):
        raise ValueError(f"guide preset {args.guide_preset!r} does not match main preset {args.main_preset!r} "
                         "(image shape and label count must agree)")
    flops_main, flops_guide = accel.forward_flops(main, 1, device), accel.forward_flops(guide, 1, device)
    nfe = misc.heun_nfe(args.heun_steps)
    flops_per_sample = nfe * (flops_main + flops_guide)
    g = torch.Generator().manual_seed(args.seed + 2)
    shape = (args.sampler_batch, main.img_channels, main.img_resolution, main.img_resolution)
    noise = torch.randn(shape, generator=g).to(device)
    labels = torch.randint(0, main.label_dim, (args.sampler_batch,), generator=g).to(device)
    sampler_kw = dict(num_steps=args.heun_steps)

    def measure(name: str, run: Callable[[], torch.Tensor], extra: dict) -> tuple[dict, torch.Tensor]:
        free_memory(device)
        x, first_s = timed(run, device)  # compilation, autotuning and graph capture happen here
        times = [timed(run, device)[1] for _ in range(args.sampler_repeats)]
        median = statistics.median(times)
        rate = args.sampler_batch / median
        result = dict(extra, first_call_s=first_s, times_s=times, median_s=median, samples_per_s=rate,
                      tflops=rate * flops_per_sample / 1e12, peak_gib=peak_gib(device))
        result["fraction_of_peak"] = result["tflops"] / peak if peak else None
        print(f"  {name:18s} {rate:9.2f} samples/s  {result['tflops']:8.2f} TFLOP/s"
              + (f" ({100 * result['fraction_of_peak']:.1f}% of peak)" if peak else "")
              + f"  first call {first_s:.1f} s")
        return result, x

    print(f"coupling generation: {args.main_preset} + {args.guide_preset}, guidance {args.guidance}, "
          f"{args.heun_steps} Heun steps ({nfe} NFE per net), batch {args.sampler_batch}, "
          f"{flops_per_sample / 1e12:.3f} TFLOP per sample")

    def reference() -> torch.Tensor:
        with torch.inference_mode(), accel.autocast(device, args.reference_precision):
            return sampling.edm_heun(main, noise, labels, guide=guide, guidance=args.guidance, **sampler_kw)

    ref, x_ref = measure("reference", reference, dict(precision=args.reference_precision, compile=None,
                                                      channels_last=False, sdpa=False, cuda_graph=False))
    out = dict(main_preset=args.main_preset, guide_preset=args.guide_preset, guidance=args.guidance,
               heun_steps=args.heun_steps, nfe_per_net=nfe, batch=args.sampler_batch,
               flops_per_forward=dict(main=flops_main, guide=flops_guide), flops_per_sample=flops_per_sample,
               runs={"reference": ref})
    def fast_run(name: str, graphs: bool) -> tuple[dict, torch.Tensor]:
        # Copies: the fast path converts layout and attention in place; the reference keeps the plain nets.
        denoiser = accel.FastDenoiser(
            copy.deepcopy(main), copy.deepcopy(guide), args.guidance, precision=args.fast_precision,
            use_channels_last=args.channels_last, sdpa=args.sdpa, backend=args.compile_backend,
            mode=args.compile_mode, cuda_graph=graphs,
        )

        def fast() -> torch.Tensor:
            with torch.inference_mode():
                return accel.fast_edm_heun(denoiser, noise, labels, **sampler_kw)

        settings = dict(precision=args.fast_precision, compile=args.compile_backend, compile_mode=args.compile_mode,
                        channels_last=args.channels_last, sdpa=args.sdpa, cuda_graph=graphs)
        return measure(name, fast, settings)

    checks = []
    for graphs in args.cuda_graphs:
        name = "fast+cuda-graphs" if graphs else "fast"
        if graphs and device.type != "cuda":
            out["runs"][name] = dict(skipped="CUDA graphs need a CUDA device")
            print(f"  {name:18s} skipped (no CUDA device)")
            continue
        run, x_fast = fast_run(name, graphs)
        run["speedup"] = run["samples_per_s"] / ref["samples_per_s"]
        run["rel_err"] = accel.relative_error(x_fast, x_ref)
        checks.append(dict(what=f"sampler {name} endpoints vs reference (max per-sample relative L2 error)",
                           value=run["rel_err"], tolerance=args.sampler_rtol,
                           passed=run["rel_err"] <= args.sampler_rtol))
        print(f"  {'':18s} x{run['speedup']:.2f} vs reference, endpoint rel. error {run['rel_err']:.2e}")
        out["runs"][name] = run
    for fast_path in (False, True):
        name, run, check = pipeline_run(args, main, guide, noise, labels, device, measure, x_ref, fast_path)
        out["runs"][name] = run
        checks.append(check)
    return out, checks


def pipeline_run(args, main, guide, noise, labels, device, measure, x_ref, fast_path: bool):
    """The coupling job's own generate function (`coupling_job.make_generate_fn`, as `couplings_shard`
    calls it, host copy of the endpoints included) with `couplings.fast_path` off or on, at the
    precision a preset would configure for it; its endpoints are checked against the reference."""
    precision = args.fast_precision if fast_path else args.reference_precision
    settings = CouplingSettings(heun_steps=args.heun_steps, guidance=args.guidance, precision=precision,
                                fast_path=fast_path)
    # copies: the fast path converts layout and attention of the nets in place
    generate = coupling_job.make_generate_fn(copy.deepcopy(main), copy.deepcopy(guide), settings, device)
    name = f"pipeline-{'fast' if fast_path else 'eager'}"
    run, x = measure(name, lambda: generate(noise, labels), dict(
        precision=precision, fast_path=fast_path, call="coupling_job.make_generate_fn(...)(noise, labels)"))
    run["rel_err"] = accel.relative_error(x.to(x_ref.device), x_ref)
    check = dict(what=f"sampler {name} endpoints vs reference (max per-sample relative L2 error)",
                 value=run["rel_err"], tolerance=args.sampler_rtol, passed=run["rel_err"] <= args.sampler_rtol)
    print(f"  {'':18s} endpoint rel. error {run['rel_err']:.2e} (the coupling job's own call)")
    return name, run, check


# ----------------------------------------------------------------------------------------------
# (b) Training steps.


def train_path(fast: bool, args: argparse.Namespace, init_state: dict, inputs: dict, guidance: dict, stage: int,
               device: torch.device) -> dict:
    """Warm up, then time `train_repeats` optimiser steps of one path from `init_state`."""
    net = networks.build(args.train_preset).to(device)
    net.load_state_dict(init_state)
    params = train.prepare_for_training(net)
    if fast:
        loss_fn = train_loss.meanflow_loss_fn(net, jvp=args.fast_jvp, precision=args.fast_precision,
                                         use_channels_last=args.channels_last, backend=args.compile_backend,
                                         mode=args.compile_mode)
        fused = device.type == "cuda"
        settings = dict(jvp=args.fast_jvp, precision=args.fast_precision, compile=args.compile_backend,
                        channels_last=args.channels_last, adam="fused" if fused else "default (fused Adam needs CUDA)")
    else:
        loss_fn = train_loss.meanflow_loss_fn(net, jvp="autograd", precision=args.train_reference_precision)
        fused = False
        settings = dict(jvp="autograd", precision=args.train_reference_precision, compile=None, channels_last=False,
                        adam="default")
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.99), **(dict(fused=True) if fused else {}))

    def step() -> float:
        net.normalize_weights_()
        loss = loss_fn(**inputs, **guidance).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if stage == 2:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    free_memory(device)
    first_loss, first_s = timed(step, device)  # at init_state: the loss both paths must agree on
    for _ in range(args.warmup):  # cuDNN autotuning, allocator growth
        timed(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(step, device)[1] for _ in range(args.train_repeats)]
    return dict(settings, first_loss=first_loss, first_step_s=first_s, times_s=times,
                median_s=statistics.median(times), peak_gib=peak_gib(device))


def predicted_peak(preset: str, batch: int, jvp: str, precision: str, stage: int) -> dict:
    """The step-cost model's peak (`remeanflow.step_cost`: fake tensors, on the CPU) of the project's
    own step at the same net, batch, JVP mode and precision, recorded beside the measured peak.

    It models `train.queue_step` (with its EMA copy, ~4 bytes per parameter, and foreach Adam),
    not this benchmark's bare loop: expect it above the measured peak by about the EMA's size."""
    if precision not in step_cost.PRECISIONS:
        return dict(skipped=f"precision {precision} is not modelled ({sorted(step_cost.PRECISIONS)})")
    with torch.random.fork_rng():  # the model seeds its own draws: the benchmark's stay as they were
        cost = step_cost.measure_step(preset, batch, jvp=jvp, precision=precision, stage=stage)
    return dict(peak_gib=cost.peak_cuda_bytes / 2**30, flops=cost.flops, jvp=jvp, precision=precision,
                by_category_gib={k: v / 2**30 for k, v in cost.by_category.items()}, seconds=cost.seconds)


def guarded(run: Callable[[], dict], what: str) -> dict:
    """Run one path; an out-of-memory error becomes a result (the other path still runs)."""
    try:
        return run()
    except RuntimeError as error:
        if not is_oom(error):
            raise
        print(f"  {what}: out of memory ({str(error).splitlines()[0]})")
        return dict(oom=True, error=str(error).splitlines()[0])


def train_part(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[dict]]:
    # Kept on the CPU: the device holds only the path being measured.
    net = random_net(args.train_preset, args.seed + 3, torch.device("cpu")).train()
    init_state = net.state_dict()
    results, checks = [], []
    for stage in args.stages:
        for batch in args.train_batches:
            inputs, guidance = make_batch(net, batch, stage, args.seed + 4 + stage, args.w_max, device)
            print(f"training step: {args.train_preset}, stage {stage}, batch {batch}"
                  + (f", w' = {guidance['w_pi']:.3f}" if stage == 2 else ""))
            ref, fast = (guarded(functools.partial(train_path, is_fast, args, init_state, inputs, guidance, stage,
                                                   device), name)
                         for is_fast, name in ((False, "reference"), (True, "fast")))
            if args.predict_memory:
                for run, jvp, precision in ((ref, "autograd", args.train_reference_precision),
                                            (fast, args.fast_jvp, args.fast_precision)):
                    run["predicted"] = predicted_peak(args.train_preset, batch, jvp, precision, stage)
            entry = dict(stage=stage, batch=batch, w_pi=guidance["w_pi"], reference=ref, fast=fast)
            for name, run in (("reference", ref), ("fast", fast)):
                if not run.get("oom"):
                    predicted = (run.get("predicted") or {}).get("peak_gib")
                    print(f"  {name:10s} {run['median_s']:.4f} s/step"
                          + (f", peak {run['peak_gib']:.2f} GiB" if run["peak_gib"] is not None else "")
                          + (f" (predicted {predicted:.2f} GiB)" if predicted is not None else "")
                          + f", first step {run['first_step_s']:.1f} s, loss {run['first_loss']:.6f}")
            if ref.get("oom") or fast.get("oom"):
                entry["speedup"] = entry["memory_ratio"] = None
                if fast.get("oom"):
                    checks.append(dict(what=f"stage {stage} batch {batch}: fast step ran", value=None,
                                       tolerance=None, passed=False))
            else:
                entry["speedup"] = ref["median_s"] / fast["median_s"]
                entry["memory_ratio"] = (fast["peak_gib"] / ref["peak_gib"]) if device.type == "cuda" else None
                diff = abs(fast["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
                entry["loss_rel_diff"] = diff
                checks.append(dict(what=f"stage {stage} batch {batch}: first-step loss vs reference (relative)",
                                   value=diff, tolerance=args.loss_rtol, passed=diff <= args.loss_rtol))
                print(f"  fast: x{entry['speedup']:.2f} time"
                      + (f", x{entry['memory_ratio']:.2f} memory" if entry["memory_ratio"] is not None else "")
                      + f", loss rel. diff {diff:.2e}")
            results.append(entry)
    del net
    return results, checks


# ----------------------------------------------------------------------------------------------
# Targets and entry point.


def targets(report: dict, device_name: str, smoke: bool) -> list[dict]:
    """The targets of benchmarks/README.md; `passed` is None where a target does not apply (smoke, other GPU)."""
    out = []
    sampler = report.get("sampler")
    if sampler:
        fast_runs = [r for k, r in sampler["runs"].items() if k != "reference" and "samples_per_s" in r]
        best = max((r["samples_per_s"] for r in fast_runs), default=None)
        applies = not smoke and "h200" in device_name.lower() and sampler["heun_steps"] == 32
        out.append(dict(what=f"coupling generation >= {TARGET_SAMPLES_PER_S_H200} samples/s on an H200", value=best,
                        passed=(best is not None and best >= TARGET_SAMPLES_PER_S_H200) if applies else None))
    for entry in report.get("train", []):
        if entry["stage"] != 1 or entry["batch"] != 64:
            continue
        fast, applies = entry["fast"], not smoke
        value = None if fast.get("oom") else fast["median_s"]
        out.append(dict(what=f"stage-1 step at batch 64 <= {TARGET_STAGE1_B64_S} s", value=value,
                        passed=(value is not None and value <= TARGET_STAGE1_B64_S) if applies else None))
        if entry["reference"].get("oom"):
            ratio, note = None, "reference ran out of memory"
            passed = (not fast.get("oom")) if applies else None
        else:
            ratio, note = entry["memory_ratio"], None
            passed = (ratio is not None and ratio <= TARGET_MEMORY_RATIO) if applies else None
        out.append(dict(what=f"stage-1 step at batch 64 peak memory <= {TARGET_MEMORY_RATIO}x the reference",
                        value=ratio, note=note, passed=passed))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny nets, 2 Heun steps: the same code paths in < 1 min")
    parser.add_argument("--parts", nargs="+", choices=["sampler", "train"], default=["sampler", "train"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--main-preset", dest="main_preset", default=None)
    parser.add_argument("--guide-preset", dest="guide_preset", default=None)
    parser.add_argument("--train-preset", dest="train_preset", default=None, help="default: the main preset")
    parser.add_argument("--guidance", type=float, default=2.1, help="autoguidance weight (img512: 2.10)")
    parser.add_argument("--heun-steps", dest="heun_steps", type=int, default=None)
    parser.add_argument("--sampler-batch", dest="sampler_batch", type=int, default=None)
    parser.add_argument("--sampler-repeats", dest="sampler_repeats", type=int, default=None)
    parser.add_argument("--train-batches", dest="train_batches", type=int, nargs="+", default=None)
    parser.add_argument("--stages", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--train-repeats", dest="train_repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2, help="extra untimed training steps after the first")
    parser.add_argument("--w-max", dest="w_max", type=float, default=2.5, help="stage 2 draws w' ~ U(1, w_max)")
    parser.add_argument("--reference-precision", dest="reference_precision", choices=sorted(accel.PRECISIONS))
    parser.add_argument("--train-reference-precision", dest="train_reference_precision",
                        choices=sorted(accel.PRECISIONS))
    parser.add_argument("--fast-precision", dest="fast_precision", choices=sorted(accel.PRECISIONS), default="bf16")
    parser.add_argument("--fast-jvp", dest="fast_jvp", choices=[m for m in meanflow.JVP_MODES if m != "autograd"],
                        default="tangent",
                        help="JVP mode of the fast training path (meanflow.jvp_t)")
    parser.add_argument("--compile-backend", dest="compile_backend", default=None,
                        help="torch.compile backend of the fast paths; 'none' disables compilation")
    parser.add_argument("--compile-mode", dest="compile_mode", default=None)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--no-sdpa", dest="sdpa", action="store_false", help="sampler: keep EDM2's einsum attention")
    parser.add_argument("--cuda-graphs", dest="cuda_graphs", choices=["off", "on", "both"], default="both",
                        help="fast sampler without/with CUDA graph replay, or both (default)")
    parser.add_argument("--predict-memory", dest="predict_memory", action=argparse.BooleanOptionalAction,
                        default=False, help="record the step-cost model's predicted peak beside each measured one "
                        "(fake steps on the CPU: ~1 min per EDM2-S step, 8 in a full run). Off by default: the GPU "
                        "check's device time cannot afford it, and the same predictions do not need the device "
                        "(benchmarks/step_memory.py, results/step-memory-cpu.json)")
    parser.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None,
                        help="dense bf16 peak of the chip (default: by device name)")
    parser.add_argument("--sampler-rtol", dest="sampler_rtol", type=float, default=0.05)
    parser.add_argument("--loss-rtol", dest="loss_rtol", type=float, default=2e-2)
    parser.add_argument("--require-targets", dest="require_targets", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (0: torch's default; smoke: 1, small ops on shared cores)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="REPORT",
                        help="measure nothing: merge the JSON reports of runs of separate --parts into one (--json)")
    args = parser.parse_args(argv)
    if args.merge is not None:
        if args.json is None:
            parser.error("--merge needs --json (where the merged report goes)")
        return args
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_preset = args.train_preset or args.main_preset
    if args.compile_backend == "none":
        args.compile_backend = None
    args.cuda_graphs = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs]
    for key in ("heun_steps", "sampler_batch", "sampler_repeats", "train_repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if min(args.train_batches) < 1 or args.warmup < 0:
        parser.error("--train-batches must be >= 1 and --warmup >= 0")
    return args


def merge_reports(reports: list[dict], names: list[str]) -> dict:
    """One report from runs of separate --parts (benchmarks/gpu_check.sh runs each part in its own
    process, so that a slow part leaves the other's figures): the sampler of the run that has one, the
    training entries of all, every check; targets and the verdict computed again from those."""
    for report, name in zip(reports, names):
        if not isinstance(report, dict) or report.get("format") != FORMAT:
            raise ValueError(f"{name}: key format is {report.get('format') if isinstance(report, dict) else None!r}, "
                             f"expected {FORMAT!r}")
    samplers = [(r["sampler"], n) for r, n in zip(reports, names) if "sampler" in r]
    if len(samplers) > 1:
        raise ValueError(f"{samplers[0][1]} and {samplers[1][1]} both hold a sampler part: merge runs of different "
                         "--parts")
    if len({r["smoke"] for r in reports}) > 1 or len({r["env"].get("device_name") for r in reports}) > 1:
        raise ValueError(f"{', '.join(names)}: runs of different modes or devices cannot be merged")
    trains = [r for r in reports if "train" in r]
    merged = dict(reports[0], merged_from=names, settings=(trains or reports)[0]["settings"],
                  checks=[c for r in reports for c in r["checks"]])
    merged.pop("sampler", None)
    if samplers:
        merged["sampler"] = samplers[0][0]
    merged["train"] = [entry for r in trains for entry in r["train"]]
    merged["targets"] = targets(merged, merged["env"]["device_name"], merged["smoke"])
    failures = [c["what"] + f": {c['value']} > {c['tolerance']}" for c in merged["checks"] if not c["passed"]]
    merged["passed"], merged["failures"] = not failures, failures
    return merged


def _merge_main(args: argparse.Namespace) -> int:
    reports = [json.loads(path.read_text()) for path in args.merge]
    merged = merge_reports(reports, [str(p) for p in args.merge])
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(_plain(merged), indent=2, allow_nan=False))
    print(f"merged {len(reports)} reports into {args.json}: passed {merged['passed']}")
    return 0 if merged["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        return _merge_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ERROR: no CUDA device here; run with --smoke for the CPU check of the code paths", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # both paths (EDM2's own scripts set it too)
    env = environment(device)
    peak, peak_source = peak_tflops(env["device_name"], args.peak_tflops)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report: dict = dict(format=FORMAT, smoke=args.smoke, env=env, settings=settings,
                        peak_tflops=dict(value=peak, source=peak_source))
    print(f"{env['device_name']}, torch {env['torch']}, peak {peak} TFLOP/s ({peak_source})"
          + (" [smoke: CPU, tiny nets]" if args.smoke else ""))
    checks: list[dict] = []
    if "sampler" in args.parts:
        report["sampler"], found = sampler_part(args, device, peak)
        checks += found
    if "train" in args.parts:
        report["train"], found = train_part(args, device)
        checks += found
    report["checks"] = checks
    report["targets"] = targets(report, env["device_name"], args.smoke)
    for target in report["targets"]:
        state = {True: "met", False: "MISSED", None: "n/a here"}[target["passed"]]
        print(f"target: {target['what']}: {target['value']} -> {state}")
    failures = [c["what"] + f": {c['value']} > {c['tolerance']}" for c in checks if not c["passed"]]
    if args.require_targets:
        failures += [f"target missed: {t['what']} ({t['value']})" for t in report["targets"] if t["passed"] is False]
    report["passed"], report["failures"] = not failures, failures
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(_plain(report), indent=2, allow_nan=False))
    for failure in failures:
        print(f"ERROR: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _plain(value):
    """Strict-JSON form of the report: non-finite floats become strings ("inf", "nan")."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
