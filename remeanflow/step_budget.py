"""Per-GPU memory and FLOPs of one training step of a config, predicted on fake tensors
(`step_cost`) and kept on disk: what `plan --gpu-mem` shows and what the pre-run checks hold
against `resources.train.gpu_mem_gb`.

A fake EDM2-S step takes about a minute on a CPU, so nothing here runs unless asked, and every
answer is cached under the working directory, keyed by everything it depends on (`step_cost_key`).
Torch is imported only when a prediction is computed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

from . import provenance, settings
from .fileio import atomic_path

_EDM2_NAME = re.compile(r"edm2-(img512|img64)-(xxl|xl|xs|s|m|l)-")


class StepBudgetError(ValueError):
    """A config whose per-GPU step cannot be predicted (e.g. fewer samples than processes)."""


def train_processes(s: settings.Settings) -> int:
    """Processes of a training job: launch.job_processes without a device cap, times the nodes."""
    return max(s.train.processes, s.resources_of("train").gpu, 1) * s.resources_of("train").nodes


def _preset_from_url(url: str | None) -> str | None:
    match = _EDM2_NAME.search(Path(url or "").name)
    return f"edm2-{match[1]}-{match[2]}" if match else None


def teacher_nets(s: settings.Settings) -> tuple[str, str, list[str]]:
    """(main preset, guide preset, notes). Fetched pickles are named after their EDM2 config
    (edm2-img512-s-...); other names are assumed to be the paper's S + XS pair of their encoder."""
    if s.teacher.mode == "train":  # the guide is an early EMA of the same net
        return s.teacher.train.preset, s.teacher.train.preset, []
    fetch, notes = s.teacher.fetch, []
    family = "img512" if fetch.encoder == "StabilityVAEEncoder" else "img64"
    found = []
    for role, url, size in (("main", fetch.main, "s"), ("guide", fetch.guide, "xs")):
        preset = _preset_from_url(url)
        if preset is None:
            preset = f"edm2-{family}-{size}"
            notes.append(f"teacher.fetch.{role} ({url}) names no EDM2 config: sized as {preset}")
        found.append(preset)
    return found[0], found[1], notes


# ----------------------------------------------------------------------------------------------
# Predictions and their cache.

STEP_COST_CACHE = Path(".snakemake") / "remeanflow-step-cost"  # relative: the working directory's
STEP_COST_FORMAT = "remeanflow.step-cost-cache/1"
# The mode whose figure is shown beside the configured one: the official double backward against
# the project's default, the two ends of the memory range (benchmarks/README.md's table).
OTHER_JVP = {"tangent": "autograd", "forward": "autograd", "forward-fused": "autograd", "autograd": "tangent"}
# Train settings that never change a step's memory or FLOPs: measure_step replaces the first three,
# the rest are bookkeeping (rules=()); leaving them out of the cache key keeps their edits free.
_STEP_FREE_TRAIN_KEYS = ("batch_size", "jvp", "compile", "trackers", "checkpoint_every", "snapshot_every",
                         "processes")


def step_precision(s: settings.Settings) -> str:
    """The training job's autocast: make_accelerator("auto") runs bf16 on CUDA, fp32 on the CPU."""
    return "bf16" if s.resources_of("train").gpu > 0 else "fp32"


@functools.lru_cache(maxsize=None)
def _step_code_hash() -> str:
    """Code version of the prediction: step_cost.py and every project module it runs (its import
    closure), less the settings modules, whose values enter the key themselves."""
    script = provenance.PACKAGE_DIR / "step_cost.py"
    files = [f for f in provenance.import_closure(script)
             if f.relative_to(provenance.PACKAGE_DIR).as_posix() not in provenance.NOT_CODE_VERSION]
    return provenance.code_hash([script, *files])


def step_cost_key(kind: str, s: settings.Settings, stage: int, jvp: str, batch: int, **extra) -> dict:
    """Everything a cached prediction depends on (see `cached_step_cost`)."""
    train = {k: v for k, v in dataclasses.asdict(s.train).items() if k not in _STEP_FREE_TRAIN_KEYS}
    return dict(format=STEP_COST_FORMAT, kind=kind, net=teacher_nets(s)[0], batch=batch, jvp=jvp,
                precision=step_precision(s), stage=stage, train=train,
                torch=importlib.metadata.version("torch"), code=_step_code_hash(), **extra)


def cached_step_cost(key: dict, compute, cache_dir: str | Path | None = None) -> dict:
    """`compute()` (a JSON-able dict) for `key`, read from `cache_dir` (default STEP_COST_CACHE) when
    an earlier call stored it; a file that cannot be read is computed again and replaced."""
    text = json.dumps(key, sort_keys=True, default=list)
    path = Path(cache_dir or STEP_COST_CACHE) / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(text):
            return stored["value"]
    except (OSError, ValueError, AttributeError):
        pass  # absent or damaged: compute it again
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(dict(key=json.loads(text), value=value), indent=1))
    return value


def step_memory(s: settings.Settings, stage: int, jvp: str, budget: int | None = None,
                cache_dir: str | Path | None = None) -> dict:
    """Predicted per-GPU peak (CUDA-rounded bytes) and FLOPs of one training step of config `s` at
    its per-GPU batch; with a budget, also the largest per-GPU batch whose peak fits it.

    With a budget, `step_cost.largest_batch` probes the configured batch b and 2b first, so the
    peak at b is read off its line exactly (the line goes through its first probe) and its FLOPs
    (proportional to the batch) from its confirming run: one search answers both questions.
    """
    batch = s.train.batch_size // train_processes(s)
    if batch < 1:
        raise StepBudgetError(f"train.batch_size {s.train.batch_size} is smaller than the {train_processes(s)} training "
                        "processes: no per-GPU batch to predict")
    key = step_cost_key("fit" if budget else "step", s, stage, jvp, batch,
                        **({"budget_bytes": budget} if budget else {}))
    compute = functools.partial(_fit if budget else _step, teacher_nets(s)[0], batch, jvp, step_precision(s),
                                stage, s.train, budget)
    return dict(stage=stage, jvp=jvp, batch=batch, precision=step_precision(s), budget_bytes=budget,
                **cached_step_cost(key, compute, cache_dir))


def _step(net: str, batch: int, jvp: str, precision: str, stage: int, train, budget: None) -> dict:
    from . import step_cost

    cost = step_cost.measure_step(net, batch, jvp=jvp, precision=precision, stage=stage, settings=train)
    return dict(peak_bytes=cost.peak_cuda_bytes, flops=cost.flops, by_category=cost.by_category, runs=1)


def _fit(net: str, batch: int, jvp: str, precision: str, stage: int, train, budget: int) -> dict:
    from . import step_cost

    fit = step_cost.largest_batch(net, budget, jvp, precision, stage=stage, settings=train,
                                  probes=(batch, 2 * batch), exact=False)
    return dict(peak_bytes=round(fit.fixed_bytes + fit.bytes_per_sample * batch),
                flops=round(fit.cost.flops * batch / fit.cost.batch), fit_batch=fit.batch,
                fit_peak_bytes=fit.cost.peak_cuda_bytes if fit.batch else None,
                fixed_bytes=fit.fixed_bytes, bytes_per_sample=fit.bytes_per_sample, runs=fit.runs)
