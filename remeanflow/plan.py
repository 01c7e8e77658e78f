"""Cost plan of a run before anything runs: per stage the jobs, samples or steps, GPU-hours and
the disk of each artifact, with totals (`python -m remeanflow plan --configfile P [--bench J]`).

The config is read the way the workflow reads it: `config.yaml`, each `--configfile` merged over
it in order (`config.merge`, Snakemake's merge), then `config.validate` and `settings.load`.

GPU-hours come from speed figures: a `benchmarks/gpu_bench.py --json` report when one is given
(its coupling samples/s and training step times), otherwise the official code's H200 figures
quoted in benchmarks/README.md, and the output says which. The figures are rescaled to the run:

* couplings (and held-out couplings, one-step evaluation samples): the measured sampler rate is
  turned into FLOP/s (samples/s x FLOP per sample, counted by torch's FLOP counter on the meta
  device), and a run costs its samples x evaluations x FLOP per evaluation of its own nets. For
  the measured nets and step count this is exactly samples x NFE / (rate x measured NFE).
* training: the step time at the per-process batch (measured, or linear between the measured
  batches), scaled by forward FLOPs when the run trains another net, times iterations x processes.

Asked with `--gpu-mem 80GiB` (or `resources.train.gpu_mem_gb`), or `--memory` without a card, each
training stage also gets its predicted per-GPU peak and FLOPs per step (`step_cost`: the project's own
step on fake tensors, for the configured `train.jvp` and the other end of the memory range), the
largest per-GPU batch that fits the card, and a roofline lower bound on the step time (FLOPs over the
card's dense bf16 peak, `gpu_specs`) beside the figures' seconds. The fake steps take about a minute
each for EDM2-S on a CPU, so they run only when asked, and are cached (`cached_step_cost`).

Disk is the uncompressed size of each array (Zarr compresses, so stores end up smaller) and 4
bytes per parameter for fp32 nets. Stages without a measured figure (preprocessing, teacher
training, the time-embedding fit, Inception features, VAE decoding) have no GPU-hours: the plan
says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
from pathlib import Path

from . import config as rmf_config
from . import gpu_specs, misc, settings
from .step_budget import OTHER_JVP, STEP_COST_CACHE, StepBudgetError, step_memory, teacher_nets, train_processes

REPO = Path(__file__).resolve().parent.parent
FORMAT = "remeanflow.plan/1"
BENCH_FORMAT = "remeanflow.gpu-bench/1"  # what benchmarks/gpu_bench.py writes

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC2012 train set (ImageNet's published count)
IMAGENET_TRAIN_TAR_BYTES = 147_897_477_120  # ILSVRC2012_img_train.tar as distributed (~138 GiB)
INCEPTION_WEIGHTS_BYTES = 95_628_359  # pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release, ~91 MiB)
INCEPTION_FEATURES = 2048  # pool features per image (remeanflow.inception)

# Fallback speed figures: the official Re-MeanFlow code on one NVIDIA H200 (torch 2.11, random
# EDM2 nets of the published sizes), measured before this project; benchmarks/README.md, "The
# paper's own code, measured". Used only when no gpu_bench.py report is given.
OFFICIAL_SOURCE = "from the official code's H200 figures (not measured here)"
# "coupling generation, 512-latent (4x64x64), EDM2-S + XS autoguidance, 32 Heun steps, batch 256, fp16"
OFFICIAL_COUPLING_SAMPLES_PER_S = 14.4
OFFICIAL_COUPLING_NETS = ("edm2-img512-s", "edm2-img512-xs")
OFFICIAL_COUPLING_HEUN_STEPS = 32
# "one training step, EDM2-S": stage 1 at batch 16 / 64 (0.713 s / 1.046 s) and stage 2 with the
# CFG target (0.796 s / 1.194 s), the official `torch.autograd.functional.jvp(create_graph=True)`
OFFICIAL_TRAIN_NET = "edm2-img512-s"
OFFICIAL_STEP_S = {1: {16: 0.713, 64: 1.046}, 2: {16: 0.796, 64: 1.194}}
# peak memory of those stage-1 steps (23.0 / 75.5 GiB); stage 2's was not recorded
OFFICIAL_PEAK_GIB = {1: {16: 23.0, 64: 75.5}, 2: {}}

# Card of the official figures: the roofline beside them is for that card unless --gpu-model says otherwise.
OFFICIAL_DEVICE = "NVIDIA H200"



class PlanError(ValueError):
    """A config or benchmark report the plan cannot use; the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# Config, exactly as the workflow builds it.


def load_settings(configfiles: list[str | Path], base: str | Path = REPO / "config.yaml") -> settings.Settings:
    return settings.load(rmf_config.load_files(configfiles, base))


# ----------------------------------------------------------------------------------------------
# Nets: which presets, their size and their FLOPs (counted on the meta device: nothing computed).


@functools.lru_cache(maxsize=None)
def net_stats(preset: str) -> tuple[int, int]:
    """(parameters, forward FLOPs per sample) of a `networks.PRESETS` net with its t/r embeddings."""
    import torch

    from . import accel, networks

    with torch.device("meta"):
        net = networks.build(preset)
        net.init_time_embedding_()  # the Re-MeanFlow nets carry two more embeddings than the teacher
    return sum(p.numel() for p in net.parameters()), int(accel.forward_flops(net, 1, "meta"))


def sample_shape(s: settings.Settings) -> tuple[int, int, int]:
    """Shape of one coupling: the fetched pickles' declared encoder/resolution, or the trained preset's."""
    if s.teacher.mode == "fetch":
        channels = 4 if s.teacher.fetch.encoder == "StabilityVAEEncoder" else 3
        return channels, s.teacher.fetch.resolution, s.teacher.fetch.resolution
    from . import networks

    cfg = networks.PRESETS[s.teacher.train.preset]
    return cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"]


# ----------------------------------------------------------------------------------------------
# Speed figures.


@dataclasses.dataclass(frozen=True)
class Figures:
    source: str  # "benchmark <file>" or OFFICIAL_SOURCE
    measured: bool
    coupling_samples_per_s: float
    coupling_nets: tuple[str, str]
    coupling_heun_steps: int
    coupling_run: str
    train_net: str
    train_run: str
    step_s: dict  # {stage: {batch: seconds}}
    peak_gib: dict  # {stage: {batch: GiB}}
    device: str = OFFICIAL_DEVICE  # the card that measured them (torch.cuda.get_device_name)

    @property
    def coupling_flops_per_s(self) -> float:
        main, guide = (net_stats(p)[1] for p in self.coupling_nets)
        return self.coupling_samples_per_s * misc.heun_nfe(self.coupling_heun_steps) * (main + guide)

    def describe(self) -> dict:
        return dict(source=self.source, measured=self.measured, device=self.device,
                    coupling=dict(samples_per_s=self.coupling_samples_per_s, nets=list(self.coupling_nets),
                                  heun_steps=self.coupling_heun_steps, run=self.coupling_run,
                                  flops_per_s=self.coupling_flops_per_s),
                    train=dict(net=self.train_net, run=self.train_run,
                               step_s={str(k): {str(b): t for b, t in v.items()} for k, v in self.step_s.items()},
                               peak_gib={str(k): {str(b): m for b, m in v.items()} for k, v in self.peak_gib.items()}))


def official_figures() -> Figures:
    return Figures(source=OFFICIAL_SOURCE, measured=False, coupling_samples_per_s=OFFICIAL_COUPLING_SAMPLES_PER_S,
                   coupling_nets=OFFICIAL_COUPLING_NETS, coupling_heun_steps=OFFICIAL_COUPLING_HEUN_STEPS,
                   coupling_run="official sampler, fp16", train_net=OFFICIAL_TRAIN_NET,
                   train_run="official (autograd double backward)", step_s=OFFICIAL_STEP_S,
                   peak_gib=OFFICIAL_PEAK_GIB)


def _key(report, path: str, file: Path):
    """report[a][b]... for path "a.b..." (integers index lists), or a PlanError naming the file and key."""
    value = report
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise PlanError(f"{file}: key {path} is missing (not a benchmarks/gpu_bench.py --json report?)")
    return value


def _positive(report: dict, path: str, file: Path) -> float:
    value = _key(report, path, file)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise PlanError(f"{file}: key {path} = {value!r} must be a positive number")
    return float(value)


def bench_figures(path: str | Path, s: settings.Settings) -> Figures:
    """The figures of a gpu_bench.py report: the sampler run the workflow uses (the fast path when
    couplings.fast_path, else the eager reference) and the training path of train.jvp (autograd:
    the reference, else the fast path)."""
    file = Path(path)
    try:
        report = json.loads(file.read_text())
    except OSError as e:
        raise PlanError(f"{file}: cannot read the benchmark report ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{file}: not JSON ({e})") from None
    if not isinstance(report, dict) or report.get("format") != BENCH_FORMAT:
        got = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise PlanError(f"{file}: key format = {got!r}, expected {BENCH_FORMAT!r} (benchmarks/gpu_bench.py --json)")
    failed = [c.get("what") for c in report.get("checks", []) if isinstance(c, dict) and c.get("passed") is False]
    if failed:
        raise PlanError(f"{file}: key checks: numerics checks failed ({'; '.join(map(str, failed))}): its speeds "
                        "are not trusted")
    sampler_run = _sampler_run(report, file, s.couplings.fast_path)
    nets = (_key(report, "sampler.main_preset", file), _key(report, "sampler.guide_preset", file))
    train_run = "reference" if s.train.jvp == "autograd" else "fast"
    step_s, peak = _train_figures(report, file, train_run)
    smoke = " (a --smoke run: CPU and tiny nets, not GPU figures)" if report.get("smoke") else ""
    device = (report.get("env") or {}).get("device_name", "unknown device")
    return Figures(source=f"benchmark {file} on {device}{smoke}", measured=True,
                   coupling_samples_per_s=_positive(report, f"sampler.runs.{sampler_run}.samples_per_s", file),
                   coupling_nets=nets, coupling_heun_steps=int(_positive(report, "sampler.heun_steps", file)),
                   coupling_run=sampler_run, train_net=_key(report, "settings.train_preset", file),
                   train_run=train_run, step_s=step_s, peak_gib=peak, device=device)


def _sampler_run(report: dict, file: Path, fast_path: bool) -> str:
    runs = _key(report, "sampler.runs", file)
    pipeline = "pipeline-fast" if fast_path else "pipeline-eager"  # the coupling job's own call, when measured
    if isinstance(runs.get(pipeline), dict) and "samples_per_s" in runs[pipeline]:
        return pipeline
    if not fast_path:
        return "reference"
    measured = [k for k, r in runs.items() if k != "reference" and isinstance(r, dict) and "samples_per_s" in r]
    if not measured:
        raise PlanError(f"{file}: key sampler.runs has no fast run with samples_per_s (couplings.fast_path is on)")
    return max(measured, key=lambda k: runs[k]["samples_per_s"])


def _train_figures(report: dict, file: Path, run: str) -> tuple[dict, dict]:
    entries = _key(report, "train", file)
    if not isinstance(entries, list):
        raise PlanError(f"{file}: key train must be a list of training-step results")
    step_s: dict = {1: {}, 2: {}}
    peak: dict = {1: {}, 2: {}}
    for i in range(len(entries)):
        stage, batch = (int(_positive(report, f"train.{i}.{k}", file)) for k in ("stage", "batch"))
        if stage not in step_s:
            raise PlanError(f"{file}: key train.{i}.stage = {stage}: must be 1 or 2")
        if _key(report, f"train.{i}.{run}", file).get("oom"):
            continue  # out of memory at that batch: no figure
        step_s[stage][batch] = _positive(report, f"train.{i}.{run}.median_s", file)
        memory = _key(report, f"train.{i}.{run}", file).get("peak_gib")
        if memory is not None:
            peak[stage][batch] = float(memory)
    for stage in (1, 2):
        if not step_s[stage]:
            raise PlanError(f"{file}: key train has no stage-{stage} '{run}' step time (train.jvp chooses the path)")
    return step_s, peak


def step_time(measured: dict[int, float], batch: int) -> tuple[float, str]:
    """Seconds per step at `batch` from the measured {batch: seconds}: the figure itself, else the
    straight line through the two nearest measured batches (one figure: proportional to batch)."""
    if batch in measured:
        return measured[batch], "measured"
    points = sorted(measured.items())
    if len(points) == 1:
        (b1, t1), = points
        return t1 * batch / b1, f"proportional to batch from {b1}"
    below = [p for p in points if p[0] < batch]
    above = [p for p in points if p[0] > batch]
    if below and above:
        (b1, t1), (b2, t2), how = below[-1], above[0], "interpolated"
    else:
        (b1, t1), (b2, t2) = points[-2:] if not above else points[:2]
        how = "extrapolated"
    t = t1 + (batch - b1) * (t2 - t1) / (b2 - b1)
    if t <= 0:  # a line extrapolated far below the measured batches: proportional to the smallest instead
        return t1 * batch / b1, f"proportional to batch from {b1}"
    return t, f"{how} between batches {b1} and {b2}"


# ----------------------------------------------------------------------------------------------
# Per-GPU memory and FLOPs of a training step (`step_budget`), shown when asked.

GIB = 2 ** 30
_GPU_MEM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb)?\s*$", re.IGNORECASE)


def parse_gpu_mem(text: str) -> int:
    """Bytes of "80GiB" (2**30 each), "80GB" or a plain "80" (decimal GB, like resources.*.gpu_mem_gb)."""
    match = _GPU_MEM.match(str(text))
    if match is None or not float(match[1]) > 0:
        raise PlanError(f"--gpu-mem {text!r}: expected a positive size such as 80GiB, 80GB or 80 (GB)")
    return int(float(match[1]) * (GIB if (match[2] or "").lower() == "gib" else 1e9))


@dataclasses.dataclass(frozen=True)
class MemoryRequest:
    """What `plan` was asked to predict: a card's memory (None: peaks only) and the roofline's card."""

    gpu_mem_bytes: int | None
    gpu_model: str  # a gpu_specs name or a torch device name
    cache_dir: str | Path | None = None


def roofline(flops: int, gpu_model: str) -> dict | None:
    """Lower bound on a step's seconds on `gpu_model`: its FLOPs at the dense bf16 peak."""
    found = gpu_specs.peak_bf16_tflops(gpu_model)
    if found is None:
        return None
    card, tflops = found
    return dict(card=card, peak_tflops=tflops, seconds=flops / (tflops * 1e12))


def _train_memory(s: settings.Settings, stage: int, request: MemoryRequest) -> dict:
    modes = {}
    for jvp in (s.train.jvp, OTHER_JVP[s.train.jvp]):
        m = step_memory(s, stage, jvp, request.gpu_mem_bytes, request.cache_dir)
        modes[jvp] = dict(m, roofline=roofline(m["flops"], request.gpu_model))
    return dict(processes=train_processes(s), configured=s.train.jvp, modes=modes)


# ----------------------------------------------------------------------------------------------
# The plan.

FP32 = 4
DTYPE_BYTES = {"float16": 2, "float32": 4}
TRAIN_STATE_BYTES_PER_PARAM = 4 * FP32  # model + EMA + Adam's two moments (train_state.pt, checkpoints)
KEPT_CHECKPOINTS = 2  # train.train_meanflow(keep_checkpoints=2): the newest two stay in train/work/<stage>/


def _artifact(path: str, size: int | None, note: str = "") -> dict:
    return dict(path=path, bytes=size, note=note)


def _stage(name: str, jobs: int, count: int, unit: str, gpu_hours: float | None, how: str,
           artifacts: list[dict], **extra) -> dict:
    return dict(name=name, jobs=jobs, count=count, unit=unit, gpu_hours=gpu_hours, gpu_hours_how=how,
                artifacts=artifacts, disk_bytes=sum(a["bytes"] or 0 for a in artifacts), **extra)


def num_images(s: settings.Settings) -> tuple[int, str]:
    if s.dataset.toy is not None:
        return s.dataset.toy.num_classes * s.dataset.toy.images_per_class, "dataset.toy classes x images"
    return IMAGENET_TRAIN_IMAGES, "the ILSVRC2012 train set (dataset.toy is null)"


def num_couplings(s: settings.Settings, images: int) -> int:
    c = s.couplings
    return c.num_samples if c.index_mode == "random" else images * c.passes


def sampler_gpu_hours(samples: int, evaluations: int, nets: tuple[str, ...], fig: Figures) -> float:
    """GPU-hours of `samples` x `evaluations` forward passes of each of `nets` at the measured sampler FLOP/s."""
    flops = samples * evaluations * sum(net_stats(n)[1] for n in nets)
    return flops / fig.coupling_flops_per_s / 3600


def _sampler_how(fig: Figures, nets: tuple[str, ...], evaluations: int) -> str:
    same = tuple(nets) == fig.coupling_nets and evaluations == misc.heun_nfe(fig.coupling_heun_steps)
    if same:
        return f"{evaluations} NFE per net / ({fig.coupling_samples_per_s:g} samples/s x {evaluations} NFE)"
    return (f"{evaluations} NFE of {' + '.join(nets)}, by FLOPs from {fig.coupling_samples_per_s:g} samples/s of "
            f"{' + '.join(fig.coupling_nets)} at {misc.heun_nfe(fig.coupling_heun_steps)} NFE")


def plan(s: settings.Settings, fig: Figures, configfiles: list[str] | None = None,
         memory: MemoryRequest | None = None) -> dict:
    """The cost plan; with `memory`, each training stage also carries its predicted per-GPU memory
    and FLOPs (`train_memory`: fake steps, cached)."""
    main, guide, notes = teacher_nets(s)
    shape = sample_shape(s)
    main_params, guide_params = net_stats(main)[0], net_stats(guide)[0]
    elements = math.prod(shape)
    images, images_how = num_images(s)
    couplings = num_couplings(s, images)
    guided = s.couplings.guidance != 1
    nets = (main, guide) if guided else (main,)
    nfe = misc.heun_nfe(s.couplings.heun_steps)
    ctx = dict(s=s, fig=fig, main=main, shape=shape, elements=elements, images=images, nets=nets, nfe=nfe,
               main_params=main_params, guide_params=guide_params, memory=memory)
    stages = [
        _preprocess(ctx, images_how),
        _teacher(ctx),
        _couplings(ctx, couplings),
        _time_embedding(ctx),
        _train(ctx, 1),
        _train(ctx, 2),
        _heldout(ctx),
        _reference_stats(ctx),
        _evaluation(ctx),
    ]
    known = [st["gpu_hours"] for st in stages if st["gpu_hours"] is not None]
    if net_stats(main)[1] < 0.5 * net_stats(fig.train_net)[1]:
        notes.append(f"GPU-hours of {main} are scaled by FLOPs from the figures' larger nets: a small net uses a GPU "
                     "far less well, so take them as a lower bound")
    if s.couplings.index_mode == "imagenet" and s.dataset.toy is None:
        notes.append(f"{IMAGENET_TRAIN_IMAGES:,} images assumed (the ILSVRC2012 train set); counted when "
                     "preprocess_merge runs")
    return dict(
        format=FORMAT, run_name=s.run_name, config_files=["config.yaml", *map(str, configfiles or [])],
        figures=fig.describe(),
        nets=dict(main=main, guide=guide if guided else None, main_params=main_params,
                  guide_params=guide_params if guided else None),
        sample_shape=list(shape), couplings=couplings, nfe_per_net=nfe, stages=stages,
        totals=dict(jobs=sum(st["jobs"] for st in stages), gpu_hours=sum(known),
                    gpu_hours_missing=[st["name"] for st in stages if st["gpu_hours"] is None and st["gpu"]],
                    disk_bytes=sum(st["disk_bytes"] for st in stages)),
        notes=notes,
    )


def _preprocess(ctx: dict, images_how: str) -> dict:
    s, images = ctx["s"], ctx["images"]
    res = s.dataset.resolution
    pixels = images * 3 * res * res  # uint8
    toy = s.dataset.toy is not None
    archive = None if toy else IMAGENET_TRAIN_TAR_BYTES
    artifacts = [
        _artifact(f"data/raw/{s.dataset.archive_name}", archive, "toy archive: small" if toy else "as distributed"),
        _artifact("data/parts/part-*.zarr", pixels, f"uint8 3x{res}x{res}, uncompressed"),
        _artifact("data/images.zarr", pixels, f"uint8 3x{res}x{res}, uncompressed"),
    ]
    jobs = int(toy) + 1 + s.dataset.preprocess_shards + 1  # toy_source, download, shards, merge
    return _stage("preprocess", jobs, images, "images", None, f"CPU only; images: {images_how}", artifacts,
                  gpu=False)


def _teacher(ctx: dict) -> dict:
    s, main_b, guide_b = ctx["s"], ctx["main_params"] * FP32, ctx["guide_params"] * FP32
    nets = [_artifact("teacher/net.pt", main_b, f"{ctx['main']}, fp32"),
            _artifact("teacher/guide.pt", guide_b, "fp32")]
    if s.teacher.mode == "fetch":
        raw = [_artifact("teacher/raw/main.pkl", main_b, "about the net's fp32 size"),
               _artifact("teacher/raw/guide.pkl", guide_b, "about the net's fp32 size")]
        return _stage("teacher fetch", 1, 2, "pickles", None, "download, no GPU", nets + raw, gpu=False)
    return _stage("teacher train", 1, s.teacher.train.steps, "steps", None,
                  "no measured figure for teacher training", nets, gpu=True)


def _couplings(ctx: dict, couplings: int) -> dict:
    s, fig, nets, nfe = ctx["s"], ctx["fig"], ctx["nets"], ctx["nfe"]
    c = s.couplings
    noise = DTYPE_BYTES[c.noise_dtype] if c.store_noise else 0  # a compact store regenerates it
    per = ctx["elements"] * (noise + DTYPE_BYTES[c.endpoint_dtype]) + 4 + 8  # + label, id
    stored_noise = f"noise {c.noise_dtype}" if c.store_noise else "no noise (regenerated)"
    artifacts = [
        _artifact("reflow/index.zarr", couplings * (4 + 8), "int32 label + int64 sample id"),
        _artifact("reflow/couplings/shard-*.zarr", couplings * per,
                  f"{per:,} B per coupling: {'x'.join(map(str, ctx['shape']))} {stored_noise} + endpoint "
                  f"{c.endpoint_dtype} + label + id, uncompressed"),
        _artifact("reflow/manifest.json", None, "small"),
    ]
    hours = sampler_gpu_hours(couplings, nfe, nets, fig)
    return _stage("couplings", 1 + c.num_shards + 1, couplings, "couplings", hours, _sampler_how(fig, nets, nfe),
                  artifacts, gpu=True, nfe_per_net=nfe, nets=len(nets), bytes_per_coupling=per)


def _time_embedding(ctx: dict) -> dict:
    s = ctx["s"]
    artifacts = [_artifact("time_emb/net.pt", ctx["main_params"] * FP32, "fp32"),
                 _artifact("time_emb/fit.json", None, "small")]
    return _stage("time embedding", 1, s.time_embedding.steps, f"steps of {s.time_embedding.batch} (t, r) pairs",
                  None, "no measured figure (fits two small embedding MLPs)", artifacts, gpu=True)


def _train(ctx: dict, stage: int) -> dict:
    s, fig, main = ctx["s"], ctx["fig"], ctx["main"]
    t, st = s.train, s.train.stage(stage)
    processes = train_processes(s)
    per_process = t.batch_size // processes
    seconds, how = step_time(fig.step_s[stage], per_process)
    if main != fig.train_net:  # another net: scale by its forward FLOPs per sample
        seconds *= net_stats(main)[1] / net_stats(fig.train_net)[1]
        how += f", scaled by forward FLOPs from {fig.train_net}"
    hours = st.iterations * seconds * processes / 3600
    how = (f"{st.iterations} steps x {seconds:.3g} s ({fig.train_run} step at batch {per_process}, {how}) x "
           f"{processes} GPUs")
    if fig.train_run == "fast" and t.compile is None:
        how += "; the figure is the compiled step, train.compile is null (eager)"
    net_b, state_b = ctx["main_params"] * FP32, ctx["main_params"] * TRAIN_STATE_BYTES_PER_PARAM
    snapshots = st.iterations // t.snapshot_every if t.snapshot_every else 0
    artifacts = [
        _artifact(f"train/stage{stage}/net_ema.pt", net_b, "fp32 EMA"),
        _artifact(f"train/stage{stage}/train_state.pt", state_b, "model + EMA + Adam moments, fp32"),
        _artifact(f"train/work/stage{stage}/ckpt-*.pt", KEPT_CHECKPOINTS * state_b,
                  f"newest {KEPT_CHECKPOINTS} checkpoints"),
        _artifact(f"train/work/stage{stage}/snapshots/", snapshots * net_b, f"{snapshots} EMA snapshots"),
    ]
    peak = fig.peak_gib[stage].get(per_process)
    extra = {} if ctx["memory"] is None else dict(train_memory=_train_memory(s, stage, ctx["memory"]))
    return _stage(f"stage {stage}", 1, st.iterations, f"steps at batch {t.batch_size} ({processes} x {per_process})",
                  hours, how, artifacts, gpu=True, step_s=seconds, processes=processes, peak_gib=peak,
                  step_s_run=fig.train_run, **extra)


def _heldout(ctx: dict) -> dict:
    s, fig, nets = ctx["s"], ctx["fig"], ctx["nets"]
    n = s.evaluate.num_samples
    evaluations = ctx["nfe"] + 1  # the teacher's endpoint and its single Euler step
    artifacts = [_artifact("eval/heldout.npz", n * (3 * ctx["elements"] * FP32 + 8),
                           "noise, endpoint, 1-step endpoint (float32) + label")]
    return _stage("held-out couplings", 1, n, "couplings", sampler_gpu_hours(n, evaluations, nets, fig),
                  _sampler_how(fig, nets, evaluations), artifacts, gpu=True)


def _reference_stats(ctx: dict) -> dict:
    s = ctx["s"]
    e = s.evaluate
    side = e.pixel_resolution or s.dataset.resolution
    dims = 3 * side * side
    artifacts = [_artifact("fid/pixel_stats.npz", (dims + dims * dims) * 8, f"mean + covariance of {dims} pixels, "
                           "float64")]
    jobs, count = 1, ctx["images"]
    if e.inception.weights is not None:
        artifacts += [_artifact("fid/inception.pth", INCEPTION_WEIGHTS_BYTES, "pytorch-fid weights"),
                      _artifact("fid/ref_stats.npz", (INCEPTION_FEATURES + INCEPTION_FEATURES ** 2) * 8,
                                "Inception mean + covariance, float64")]
        jobs += 2  # fetch_inception, fid_reference_stats
    how = "no measured figure (Inception features of the images)" if e.ref_stats.source is None else \
        "provided statistics: fetched"
    return _stage("reference stats", jobs, count, "images", None, how, artifacts,
                  gpu=e.inception.weights is not None and e.ref_stats.source is None)


def _evaluation(ctx: dict) -> dict:
    s, fig, main = ctx["s"], ctx["fig"], ctx["main"]
    e = s.evaluate
    checkpoints = 2  # the final targets: eval/stage1 and eval/stage2
    pixel_dims = 3 * (e.pixel_resolution or s.dataset.resolution) ** 2
    features = pixel_dims + (INCEPTION_FEATURES if e.inception.weights is not None else 0)
    per_ckpt = e.fid_samples * (features * FP32 + 16)  # + id, label
    samples = checkpoints * (e.fid_samples + e.num_samples)  # FID samples + the held-out noise, one step each
    hours = sampler_gpu_hours(samples, 1, (main,), fig)
    how = (f"one-step generation of {main} ({e.fid_samples:,} FID + {e.num_samples:,} held-out samples per checkpoint) "
           "by FLOPs from the sampler figure; Inception and VAE decoding not measured")
    artifacts = [_artifact("eval/stage{1,2}/shards/*.npz", checkpoints * per_ckpt,
                           f"{features} float32 features per sample"),
                 _artifact("eval/stage{1,2}/metrics.json, samples.png", None, "small")]
    return _stage("evaluation", checkpoints * (e.shards + 1), checkpoints * e.fid_samples,
                  f"FID samples ({checkpoints} checkpoints)", hours, how, artifacts, gpu=True)


# ----------------------------------------------------------------------------------------------
# Text output and command line.


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def _memory_lines(st: dict) -> list[str]:
    """The predicted memory and the roofline of a training stage, under its row."""
    m, pad = st["train_memory"], " " * 28
    any_mode = next(iter(m["modes"].values()))
    lines = [f"{pad}memory per GPU (predicted, {any_mode['precision']}, per-GPU batch {any_mode['batch']} of "
             f"{m['processes']} processes)" + (f" on a {_gib(any_mode['budget_bytes'])} card:"
                                               if any_mode["budget_bytes"] else ":")]
    for jvp, mode in m["modes"].items():
        line = f"{pad}  jvp {jvp}{' (configured)' if jvp == m['configured'] else ''}: peak {_gib(mode['peak_bytes'])}"
        if mode["budget_bytes"]:
            fit = mode["fit_batch"]
            line += (f"; largest per-GPU batch that fits: {fit} (train.batch_size {fit * m['processes']}, "
                     f"peak {_gib(mode['fit_peak_bytes'])})" if fit else "; not even per-GPU batch 1 fits")
        lines.append(line)
    bounds = [(jvp, mode["flops"], mode["roofline"]) for jvp, mode in m["modes"].items()]
    if bounds[0][2] is None:
        lines.append(f"{pad}step time: no roofline (no dense bf16 peak for the card: --gpu-model "
                     f"{'|'.join(gpu_specs.known())})")
    else:
        card = bounds[0][2]
        lines.append(f"{pad}step time: {st['step_s']:.3g} s ({st['step_s_run']} figure); roofline on {card['card']} "
                     f"({card['peak_tflops']:g} TFLOP/s dense bf16): "
                     + ", ".join(f">= {r['seconds']:.3g} s ({jvp}, {f / 1e12:.3g} TFLOP/step)" for jvp, f, r in bounds))
    return lines


def format_text(p: dict) -> str:
    f = p["figures"]
    memory = any("train_memory" in st for st in p["stages"])
    lines = [f"Cost plan of run {p['run_name']} ({' + '.join(p['config_files'])})",
             f"GPU figures {f['source']}:" if not f["measured"] else f"GPU figures: {f['source']}:",
             f"  couplings: {f['coupling']['samples_per_s']:g} samples/s ({f['coupling']['run']}) of "
             f"{' + '.join(f['coupling']['nets'])} at {f['coupling']['heun_steps']} Heun steps",
             f"  training: {f['train']['net']} {f['train']['run']} step, s at batch: "
             + "; ".join(f"stage {k} " + ", ".join(f"{b}: {t:g}" for b, t in v.items())
                         for k, v in f["train"]["step_s"].items()),
             f"nets: main {p['nets']['main']} ({p['nets']['main_params'] / 1e6:.1f}M params)"
             + (f", guide {p['nets']['guide']} ({p['nets']['guide_params'] / 1e6:.1f}M)" if p["nets"]["guide"] else "")
             + f"; sample {'x'.join(map(str, p['sample_shape']))}; {p['nfe_per_net']} NFE per net per coupling",
             "",
             f"{'stage':20s} {'jobs':>5s}  {'work':>44s} {'GPU-h':>9s} {'disk':>9s}"
             + (f" {'mem/GPU':>10s}" if memory else "")]
    for st in p["stages"]:
        work = f"{st['count']:,} {st['unit']}"
        mem = ""
        if memory:
            m = st.get("train_memory")
            mem = f" {_gib(m['modes'][m['configured']]['peak_bytes'] if m else None):>10s}"
        lines.append(f"{st['name']:20s} {st['jobs']:5d}  {work[:44]:>44s} {_hours(st['gpu_hours']):>9s} "
                     f"{human_bytes(st['disk_bytes']):>9s}{mem}")
        lines.append(f"{'':28s}GPU-h: {st['gpu_hours_how']}")
        if "train_memory" in st:
            lines += _memory_lines(st)
        for a in st["artifacts"]:
            lines.append(f"{'':28s}{a['path']}: {human_bytes(a['bytes'])}" + (f" ({a['note']})" if a["note"] else ""))
    t = p["totals"]
    missing = (f"GPU-hours leave out (no measured figure): {', '.join(t['gpu_hours_missing'])}"
               if t["gpu_hours_missing"] else "GPU-hours: every GPU stage has a figure")
    lines += ["", f"{'total':20s} {t['jobs']:5d}  {'':44s} {_hours(t['gpu_hours']):>9s} "
                  f"{human_bytes(t['disk_bytes']):>9s}",
              missing, *(f"note: {n}" for n in p["notes"])]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="jobs, samples or steps, GPU-hours and disk per stage of a config, before running",
                       description="Cost plan of the run a config describes: per stage the jobs, samples or steps, "
                                   "GPU-hours (from a benchmarks/gpu_bench.py report, else the official code's H200 "
                                   "figures) and the disk of each artifact, with totals.")
    p.add_argument("--configfile", action="append", default=[], help="merged over config.yaml in order, like "
                   "Snakemake's --configfile (repeatable)")
    p.add_argument("--bench", default=None, help="benchmarks/gpu_bench.py --json report with measured figures")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--gpu-mem", default=None, help="memory of one GPU (80GiB, 80GB; plain numbers are GB): per "
                   "training stage, the predicted per-GPU peak and the largest per-GPU batch that fits, for both "
                   "train.jvp modes (fake steps on the CPU, about a minute each for EDM2-S, cached under "
                   f"{STEP_COST_CACHE}/); default: resources.train.gpu_mem_gb")
    p.add_argument("--memory", action="store_true", help="predict the per-GPU peak and FLOPs without a card's "
                   "memory (no largest batch)")
    p.add_argument("--gpu-model", default=None, help="card of the roofline bound on step time "
                   f"({', '.join(gpu_specs.known())}); default: the card of the speed figures")
    p.set_defaults(func=run)


def memory_request(args, s: settings.Settings, fig: Figures) -> MemoryRequest | None:
    """What the command line (or resources.train.gpu_mem_gb) asks to predict; None: nothing, the
    plan stays as fast as it is without prediction."""
    gb = s.resources_of("train").gpu_mem_gb
    budget = parse_gpu_mem(args.gpu_mem) if args.gpu_mem else int(gb * 1e9) if gb else None
    if budget is None and not args.memory:
        return None
    model = args.gpu_model or fig.device
    if args.gpu_model and gpu_specs.peak_bf16_tflops(model) is None:
        raise PlanError(f"--gpu-model {model!r}: no dense bf16 peak known; one of {', '.join(gpu_specs.known())}")
    return MemoryRequest(gpu_mem_bytes=budget, gpu_model=model)


def run(args) -> int:
    try:
        s = load_settings(args.configfile)
        fig = bench_figures(args.bench, s) if args.bench else official_figures()
        result = plan(s, fig, args.configfile, memory_request(args, s, fig))
    except (PlanError, StepBudgetError, rmf_config.ConfigError) as e:
        print(f"remeanflow plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_text(result))
    return 0
