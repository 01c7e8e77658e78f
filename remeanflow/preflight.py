"""Checks of a config against what its final targets need, made when the DAG is built (before any
job), so that a missing asset stops the run in seconds rather than after the GPU-days upstream of it.

`check(settings, run_dir)` returns the problems (each names the config key to set and why) and the
warnings; `rules/common.smk` prints the warnings and stops with one message listing every problem.
What is checked (docs/architecture.md, "Checks before the run"):

* the dataset source exists and is readable when it is a local path (or the archive was already
  downloaded into the run);
* fetched teacher pickles are named (`teacher.fetch.main` / `guide`);
* FID: Inception weights when `evaluate.require_fid`; a latent teacher (EDM2 StabilityVAEEncoder)
  needs `evaluate.vae`, a local diffusers folder, to decode its samples for Inception;
* reference statistics computed here are comparable only when the dataset's images have the size of
  the decoded samples (`evaluate.ref_stats.on_mismatch`: error or warning);
* URLs fetched without a sha256 to check them against (warning);
* training: `train.compile` with several processes (DDP cannot be traced), a global batch that does
  not split over the processes; with `resources.train.gpu_mem_gb` set, a step whose predicted
  per-GPU peak (`step_budget.step_memory`: fake steps, cached under .snakemake/remeanflow-step-cost/) does
  not fit that memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import step_budget
from .data.download import classify_source
from .fileio import hash_prefix
from .settings import Settings

# SD-VAE (stabilityai/sd-vae-ft-mse, the VAE of EDM2's latent nets): 8 pixels per latent.
SD_VAE_FACTOR = 8
LATENT_ENCODER = "StabilityVAEEncoder"


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str  # the config key to set
    message: str

    def __str__(self) -> str:
        return f"  - {self.key}: {self.message}"


@dataclasses.dataclass
class Report:
    problems: list[Finding] = dataclasses.field(default_factory=list)
    warnings: list[Finding] = dataclasses.field(default_factory=list)

    def error_message(self) -> str:
        head = (f"remeanflow: the config cannot produce its final targets; set these keys before the run "
                f"({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):")
        return "\n".join([head] + [str(p) for p in self.problems])

    def warning_message(self) -> str:
        return "\n".join(["remeanflow: warnings about the config:"] + [str(w) for w in self.warnings])


def _is_url(source: str) -> bool:
    return "://" in source


def _local(source: str) -> Path | None:
    """The local path of a path or file:// URL, as the download reads it; None for a remote URL
    (or a source the download would refuse: its job says why)."""
    try:
        kind, where = classify_source(source)
    except ValueError:
        return None
    return Path(where) if kind == "local" else None


def _readable(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    return None


def vae_factor(vae_dir: str | None) -> int:
    """Pixels per latent of a diffusers AutoencoderKL folder: 2 ** (blocks - 1) from its config.json;
    the SD-VAE's 8 when the folder is not there to read."""
    config = Path(vae_dir) / "config.json" if vae_dir else None
    if config is None or not config.is_file():
        return SD_VAE_FACTOR
    blocks = json.loads(config.read_text()).get("block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1)


def sample_pixels(s: Settings) -> int:
    """Side in pixels of the decoded samples that FID sees."""
    if s.teacher.mode == "train":
        return s.dataset.resolution  # the trained teacher works on the dataset's images
    fetch = s.teacher.fetch
    return fetch.resolution * (vae_factor(s.evaluate.vae) if fetch.encoder == LATENT_ENCODER else 1)


def _check_dataset(s: Settings, run_dir: Path, report: Report) -> None:
    ds = s.dataset
    if ds.toy is not None or (run_dir / "data" / "raw" / ds.archive_name).is_file():
        return  # made in-pipeline, or already downloaded into the run
    if ds.source is None:
        report.problems.append(Finding("dataset.source", "no dataset: set the train archive (URL or path), or "
                                       "dataset.toy for the toy set"))
        return
    local = _local(ds.source)
    if local is not None and (why := _readable(local)):
        report.problems.append(Finding("dataset.source", f"{why} (the ImageNet-layout train tar)"))
    elif _is_url(ds.source) and ds.sha256 is None:
        report.warnings.append(Finding("dataset.sha256", f"{ds.source} is fetched without a checksum"))


def _check_teacher(s: Settings, run_dir: Path, report: Report) -> None:
    if s.teacher.mode != "fetch" or (run_dir / "teacher" / "net.pt").is_file():
        return
    fetch = s.teacher.fetch
    for role in ("main", "guide"):
        source, sha256 = getattr(fetch, role), getattr(fetch, f"{role}_sha256")
        key = f"teacher.fetch.{role}"
        if source is None:
            report.problems.append(Finding(key, "teacher.mode is fetch: name the EDM2 pickle (URL or path)"))
        elif (local := _local(source)) is not None and (why := _readable(local)):
            report.problems.append(Finding(key, why))
        elif _is_url(source) and sha256 is None:
            report.warnings.append(Finding(f"{key}_sha256", f"{source} is fetched without a checksum"))


def _check_fid(s: Settings, report: Report) -> None:
    ev = s.evaluate
    if ev.inception.weights is None:
        if ev.require_fid:
            report.problems.append(Finding("evaluate.inception.weights", "evaluate.require_fid is true but no "
                                           "Inception weights are set (pt_inception-2015-12-05-6726825d.pth)"))
        return
    weights = ev.inception.weights
    if (local := _local(weights)) is not None and (why := _readable(local)):
        report.problems.append(Finding("evaluate.inception.weights", why))
    elif _is_url(weights) and ev.inception.sha256 is None and hash_prefix(weights.rsplit("/", 1)[-1]) is None:
        report.warnings.append(Finding("evaluate.inception.sha256", f"{weights} is fetched without a checksum "
                                       "(and its name carries no hash prefix)"))
    latent = s.teacher.mode == "fetch" and s.teacher.fetch.encoder == LATENT_ENCODER
    if latent and ev.vae is None:
        report.problems.append(Finding("evaluate.vae", f"the teacher works in {LATENT_ENCODER} latents: FID needs "
                                       "the local diffusers folder of stabilityai/sd-vae-ft-mse to decode samples"))
    elif latent and not (Path(ev.vae) / "config.json").is_file():
        report.problems.append(Finding("evaluate.vae", f"{ev.vae} is not a diffusers AutoencoderKL folder "
                                       "(no config.json)"))
    _check_ref_stats(s, report)


def _check_ref_stats(s: Settings, report: Report) -> None:
    ref = s.evaluate.ref_stats
    if ref.source is not None:
        if (local := _local(ref.source)) is not None and (why := _readable(local)):
            report.problems.append(Finding("evaluate.ref_stats.source", why))
        elif _is_url(ref.source) and ref.sha256 is None:
            report.warnings.append(Finding("evaluate.ref_stats.sha256", f"{ref.source} is fetched without a "
                                           "checksum"))
        return
    images, samples = s.dataset.resolution, sample_pixels(s)
    if images != samples:
        finding = Finding("evaluate.ref_stats.source", f"statistics computed here come from {images} px images "
                          f"(dataset.resolution) while the samples are {samples} px: the FID is not comparable to "
                          f"published numbers; provide {samples} px reference statistics (or set "
                          "evaluate.ref_stats.on_mismatch: warn)")
        (report.problems if ref.on_mismatch == "error" else report.warnings).append(finding)


def _check_training(s: Settings, report: Report) -> None:
    """What the training processes need (the job re-checks against the devices it gets)."""
    processes = step_budget.train_processes(s)
    if s.train.compile is not None and processes > 1:
        report.problems.append(Finding("train.compile", f"{s.train.compile} with {processes} processes "
                                       "(train.processes / resources.train.gpu): torch.compile cannot trace the "
                                       "DDP-wrapped model; set null, or train one process"))
    if s.train.batch_size % processes:
        report.problems.append(Finding("train.batch_size", f"the global batch {s.train.batch_size} does not split "
                                       f"over {processes} processes (train.processes / resources.train.gpu, times "
                                       "resources.train.nodes)"))


def _check_gpu_memory(s: Settings, report: Report, cache_dir) -> None:
    """The predicted per-GPU peak of each training stage against resources.train.gpu_mem_gb. Asked
    for only: the first prediction of an EDM2 net takes minutes on a CPU (then it is cached)."""
    gb = s.resources_of("train").gpu_mem_gb
    processes = step_budget.train_processes(s)
    if gb is None or s.train.batch_size % processes:
        return  # no card named, or no per-GPU batch (reported above)
    budget = int(gb * 1e9)
    for stage in (1, 2):
        mine = step_budget.step_memory(s, stage, s.train.jvp, budget, cache_dir)
        if mine["peak_bytes"] <= budget:
            continue
        other = step_budget.step_memory(s, stage, step_budget.OTHER_JVP[s.train.jvp], budget, cache_dir)
        report.problems.append(Finding("resources.train.gpu_mem_gb", _memory_message(s, mine, other, gb, processes)))


def _memory_message(s: Settings, mine: dict, other: dict, gb: float, processes: int) -> str:
    gib = 2 ** 30
    fit = (f"the largest batch that fits is train.batch_size: {mine['fit_batch'] * processes} ({mine['fit_batch']} "
           f"per GPU x {processes} processes, {mine['fit_peak_bytes'] / gib:.2f} GiB)" if mine["fit_batch"]
           else "not even a per-GPU batch of 1 fits")
    if other["peak_bytes"] < mine["peak_bytes"]:
        up_to = f"fits up to train.batch_size: {other['fit_batch'] * processes}" if other["fit_batch"] else \
            "fits no batch either"
        lean = f"train.jvp: {other['jvp']} needs less ({other['peak_bytes'] / gib:.2f} GiB at this batch; {up_to})"
    else:
        lean = (f"train.jvp: {other['jvp']} needs more ({other['peak_bytes'] / gib:.2f} GiB), no mode measured "
                f"here needs less")
    return (f"stage {mine['stage']}: the training step is predicted to need {mine['peak_bytes'] / gib:.2f} GiB per "
            f"GPU ({mine['precision']}, train.jvp: {mine['jvp']}, per-GPU batch {mine['batch']} of "
            f"train.batch_size {s.train.batch_size}), more than the {gb:g} GB ({gb * 1e9 / gib:.2f} GiB) of "
            f"resources.train.gpu_mem_gb; {fit}; {lean}. Lower train.batch_size, change train.jvp, or raise "
            "gpu_mem_gb if the card has more")


def check(s: Settings, run_dir, cache_dir=None) -> Report:
    """Every problem and warning of config `s` for the run folder `run_dir` (see the module doc);
    `cache_dir`: where memory predictions are kept (default: step_budget.STEP_COST_CACHE, in the working
    directory)."""
    report = Report()
    run_dir = Path(run_dir)
    _check_dataset(s, run_dir, report)
    _check_teacher(s, run_dir, report)
    _check_fid(s, report)
    _check_training(s, report)
    _check_gpu_memory(s, report, cache_dir)
    return report
