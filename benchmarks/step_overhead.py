"""Count the operations a training step launches for the EMA update and the forced weight
normalisation: the per-tensor loops they used to be (kept here only as the baseline) against the
fused versions in the library (`train.update_ema`, `Precond.normalize_weights_`), and the whole
queued training step (`train.queue_step`) with the old or new parts.

Counts come from torch.profiler's CPU rows:

* `calls`: top-level operator calls, one per dispatch from Python: the host overhead per step;
* `compute`: the top-level calls that compute (not a view, a no-op `to` or dtype arithmetic):
  on a GPU each is at least one kernel launch, and a fused foreach call on CUDA launches one
  kernel per chunk of tensors instead of one per tensor;
* `all_ops`: every operator row, nested ones included. On the CPU the foreach ops have no fused
  kernel and run their per-tensor fallback, whose inner ops show up here, so this column drops
  less on the CPU than it will on a GPU.

Each part is checked for bit-identical results against its baseline before anything is counted.

    python benchmarks/step_overhead.py                      # toy-16 step; EMA/norm parts of edm2-img64-xs too
    python benchmarks/step_overhead.py --presets toy-16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from remeanflow import networks, train

FORMAT = "remeanflow.step-overhead-bench/1"


# ----------------------------------------------------------------------------------------------
# The baselines: the loops the library replaced.


@torch.no_grad()
def loop_update_ema(ema, net, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def loop_normalize_weights_(net) -> None:
    for m in net.modules():
        if isinstance(m, networks.MPConv):
            m.normalize_weight_()


@contextlib.contextmanager
def old_parts():
    """The training step with the loops in place of the fused parts."""
    fused_ema, fused_norm = train.update_ema, networks.Precond.normalize_weights_
    train.update_ema, networks.Precond.normalize_weights_ = loop_update_ema, loop_normalize_weights_
    try:
        yield
    finally:
        train.update_ema, networks.Precond.normalize_weights_ = fused_ema, fused_norm


# ----------------------------------------------------------------------------------------------
# Counting.


# Operators that only make views or inspect dtypes: no kernel, on any device.
METADATA = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::select", "aten::split",
            "aten::split_with_sizes", "aten::narrow", "aten::slice", "aten::as_strided", "aten::detach",
            "aten::alias", "aten::t", "aten::expand", "aten::unbind", "aten::flatten", "aten::promote_types",
            "aten::result_type", "aten::to", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose",
            "aten::empty", "aten::empty_strided", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg"}


def computes(event) -> bool:
    """Whether an operator row does work: not metadata-only, or metadata with working children
    (a `to` that really converts)."""
    return event.name not in METADATA or any(computes(c) for c in event.cpu_children)


def count_ops(fn) -> dict[str, int]:
    """Top-level operator calls, those that compute, and all operator rows of one call of `fn`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"calls": len(top), "compute": sum(computes(e) for e in top), "all_ops": len(events)}


def random_net(preset: str, seed: int) -> networks.Precond:
    torch.manual_seed(seed)
    net = networks.build(preset)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(torch.rand_like(p) * 3)  # off the unit sphere, non-zero gains
    return net


def identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def compare(name: str, before, after, check) -> dict:
    """Counts of `before` and `after` (each run once to warm up first) and the bit-identity check."""
    before(), after()
    counts = {"before": count_ops(before), "after": count_ops(after)}
    columns = []
    for key in ("calls", "compute", "all_ops"):
        counts[f"ratio_{key}"] = counts["before"][key] / max(counts["after"][key], 1)
        columns.append(f"{key} {counts['before'][key]:6d} -> {counts['after'][key]:5d} ({counts[f'ratio_{key}']:5.1f}x)")
    counts["bit_identical"] = check()
    print(f"{name:34s} " + "   ".join(columns) + f"   bit-identical: {counts['bit_identical']}", flush=True)
    return counts


def parts(preset: str) -> dict:
    """EMA update and weight normalisation of one net, old loop vs library."""
    net = random_net(preset, 0)
    ema_old, ema_new = random_net(preset, 1), random_net(preset, 1)
    norm_old, norm_new = copy.deepcopy(net), copy.deepcopy(net)
    layers = sum(isinstance(m, networks.MPConv) for m in net.modules())
    print(f"{preset}: {len(list(net.parameters()))} parameters, {len(list(net.buffers()))} buffers, {layers} MPConv "
          f"layers in {len(networks._weight_groups(net))} fan-in groups")
    return {
        "ema": compare(f"{preset} EMA update", lambda: loop_update_ema(ema_old, net, 0.999),
                       lambda: train.update_ema(ema_new, net, 0.999), lambda: identical(ema_old, ema_new)),
        "weight_norm": compare(f"{preset} weight normalisation", lambda: loop_normalize_weights_(norm_old),
                               lambda: norm_new.normalize_weights_(), lambda: identical(norm_old, norm_new)),
    }


def make_trainer(preset: str) -> train.Trainer:
    net = random_net(preset, 0)
    config = {"stage": 2, "batch_size": 8, "lr": 1e-4, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0,
              "ema_decay": 0.9999, "grad_clip": 1.0, "class_dropout": 0.1, "w_max": 2.0,
              "time_sampler": {"ratio_r_neq_t": 0.5}, "p": 0.5, "c": 1e-2, "jvp": "tangent", "seed": 0, "compile": None}
    return train.build_trainer(train.make_accelerator("no"), net, copy.deepcopy(net), config)


def step_inputs(net: networks.Precond, batch: int) -> train.StepInputs:
    g = torch.Generator().manual_seed(0)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.randint(-1, net.label_dim, (batch,), generator=g)
    return train.StepInputs(x=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g), labels=labels,
                            t=torch.rand(batch, generator=g), r=torch.zeros(batch), w_pi=1.5)


def whole_step(preset: str, batch: int) -> dict:
    """One stage-2 training step (loss, backward, clip, Adam, EMA, weight norm) with either part set."""
    old, new = make_trainer(preset), make_trainer(preset)
    inputs = step_inputs(old.net, batch)

    def before():
        with old_parts():
            train.queue_step(old, inputs, 1)

    return {"step": compare(f"{preset} whole training step", before, lambda: train.queue_step(new, inputs, 1),
                            lambda: identical(old.net, new.net) and identical(old.ema, new.ema))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # every EDM2 size has the same tensors (only their widths differ): xs counts for all of them
    ap.add_argument("--presets", nargs="+", default=["toy-16", "edm2-img64-xs"],
                    help="nets whose EMA / weight-norm parts are counted")
    ap.add_argument("--step-preset", default="toy-16", help="net of the whole-step count (CPU-sized)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"format": FORMAT, "torch": torch.__version__, "device": "cpu", "threads": args.threads,
           "parts": {p: parts(p) for p in args.presets}, "whole_step": whole_step(args.step_preset, args.batch)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    checks = [c["bit_identical"] for p in out["parts"].values() for c in p.values()]
    checks.append(out["whole_step"]["step"]["bit_identical"])
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
