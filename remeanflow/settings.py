"""Typed settings of every stage: the one place that says what each config key is.

Each config section is a frozen dataclass; each field is declared once with `setting(...)`: its
type (the annotation), default (the paper's value where the paper gives one), bounds or choices,
a one-line doc, and the rules whose outputs it changes (`rules`, the section's rules when not
given; `rules=()` for settings that change no result, e.g. how many processes run a job). From
these declarations come:

* the JSON schema (`json_schema`, written to `schemas/config.schema.yaml` by
  `python -m remeanflow schema`; a test keeps the two equal),
* validation with messages that name the key (`config.validate`), after coercing the strings that
  Snakemake makes of nested `--config` values (`coerce`),
* each rule's config hash (`rule_config`: the values of every field that enters that rule), the
  `params:` value that makes Snakemake rerun the rule when one of them changes,
* the objects the library takes (`load(config).train.stage(1)`, ...).

Adding a setting is one `setting(...)` line here (plus its value in `config.yaml` when the toy
default differs from the paper's); no rule file names individual settings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, Optional

import yaml

from . import settings_base
from .settings_base import Section, build, section_schema, select, setting

__all__ = ["build", "coerce", "json_schema", "load", "rule_config", "rules_named", "schema_yaml"]

SHA256_PATTERN = "^(sha256:)?[0-9a-fA-F]{64}$"


# ----------------------------------------------------------------------------------------------
# Dataset.


@dataclasses.dataclass(frozen=True)
class ToySettings(Section):
    """The deterministic toy ImageNet-style archive of the embedded default."""

    RULES = ("toy_source",)
    num_classes: int = setting(10, "classes (40 shape x colour looks, repeated beyond 40)", ge=2, le=1000)
    images_per_class: int = setting(120, "images per class", ge=1)
    size: int = setting(32, "side of the generated (non-square) JPEGs, px", ge=8)
    seed: int = setting(0, "generator seed", ge=0)


@dataclasses.dataclass(frozen=True)
class DatasetSettings(Section):
    """Download and preprocessing of the train archive (ImageNet layout: a tar of per-class tars)."""

    RULES = ("preprocess_shard", "preprocess_merge")
    toy: Optional[ToySettings] = setting(None, "generate the toy archive in-pipeline (null for a real dataset)",
                                         rules=())
    source: Optional[str] = setting(None, "http(s) URL, file:// URL or local path of the train archive",
                                    rules=("download_dataset",))
    archive_name: str = setting("ILSVRC2012_img_train.tar", "file name of the archive under data/raw/",
                                pattern="^[^/]+$", rules=())
    sha256: Optional[str] = setting(None, "expected sha256 of the archive (null: not checked)",
                                    pattern=SHA256_PATTERN, rules=("download_dataset",))
    resolution: int = setting(64, "ADM center crop to this size, px", ge=8,
                              rules=("preprocess_shard", "preprocess_merge", "train_teacher"))
    preprocess_shards: int = setting(20, "preprocess_shard jobs (class ranges)", ge=1,
                                     rules=("preprocess_shard",))
    max_bad_fraction: float = setting(1e-4, "undecodable images tolerated (counted and listed) before the rule "
                                      "fails", ge=0, le=1, rules=("preprocess_shard",))
    decode_workers: int = setting(16, "JPEG decoding processes per shard job", ge=1, rules=())
    min_images_per_class: int = setting(1, "a class with fewer decodable images is an error naming it; 0 accepts "
                                        "empty classes", ge=0, rules=("preprocess_shard", "preprocess_merge"))


@dataclasses.dataclass(frozen=True)
class DownloadSettings(Section):
    """Bounds of every download (dataset archive, EDM2 pickles, Inception weights, reference
    statistics): what is fetched is checked by its sha256, so these change no result."""

    attempts: int = setting(5, "attempts per file; a dropped connection, a server that ignores Range (restart "
                            "from 0) or an HTTP error counts one", ge=1)
    max_seconds: float = setting(86400.0, "bound on the whole download of one file, all attempts", gt=0)
    retry_wait_s: float = setting(5.0, "pause before the next attempt (doubled each time, at most 60 s)", ge=0)


# ----------------------------------------------------------------------------------------------
# Teacher.


@dataclasses.dataclass(frozen=True)
class TeacherTrainSettings(Section):
    """The small EDM2 teacher trained in-pipeline (embedded default; EDM2's loss and EMA)."""

    RULES = ("train_teacher",)
    preset: str = setting("toy-16", "network preset (`networks.PRESETS`)")
    steps: int = setting(600, "optimiser steps", ge=1)
    batch_size: int = setting(64, "batch", ge=1)
    lr_ref: float = setting(0.01, "EDM2 reference learning rate", gt=0)
    rampup_steps: Optional[int] = setting(None, "learning-rate ramp-up steps (null: steps // 10)", ge=0)
    guide_step: int = setting(100, "the EMA at this step is kept as the autoguidance guide", ge=1)
    ema_std: float = setting(0.05, "power-function EMA relative std", gt=0)
    P_mean: float = setting(-0.4, "log-normal sigma distribution: mean")
    P_std: float = setting(1.0, "log-normal sigma distribution: std", gt=0)
    label_dropout: float = setting(0.0, "class dropout to the null class (autoguidance needs no unconditional "
                                   "model)", ge=0, lt=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guide_step > self.steps:
            raise ValueError(f"config key teacher.train.guide_step = {self.guide_step}: must lie in [1, steps="
                             f"{self.steps}] (the guide is the EMA snapshot at that step)")


@dataclasses.dataclass(frozen=True)
class TeacherFetchSettings(Section):
    """Published EDM2 pickles (main net + autoguidance guide), converted without running their code."""

    RULES = ("fetch_teacher",)
    main: Optional[str] = setting(None, "EDM2 pickle URL or path of the main model")
    main_sha256: Optional[str] = setting(None, "expected sha256 of the main pickle", pattern=SHA256_PATTERN)
    guide: Optional[str] = setting(None, "EDM2 pickle URL or path of the autoguidance guide")
    guide_sha256: Optional[str] = setting(None, "expected sha256 of the guide pickle", pattern=SHA256_PATTERN)
    # Declared rather than read from the pickles so that the pre-run checks (`preflight`) know before
    # anything is fetched whether decoding needs the VAE and what size the samples will have.
    encoder: Literal["StandardRGBEncoder", "StabilityVAEEncoder"] = setting(
        "StabilityVAEEncoder", "EDM2 encoder of the pickles: StabilityVAEEncoder = SD-VAE latents (pixels need "
        "evaluate.vae), StandardRGBEncoder = pixels; checked when fetched", rules=())
    resolution: int = setting(64, "img_resolution of the pickles (the latent side for StabilityVAEEncoder); "
                              "checked when fetched", ge=1, rules=())


@dataclasses.dataclass(frozen=True)
class TeacherSettings(Section):
    mode: Literal["train", "fetch"] = setting("fetch", "train the toy teacher, or fetch published EDM2 pickles",
                                              rules=())
    train: TeacherTrainSettings = setting(factory=TeacherTrainSettings, doc="teacher.mode train", rules=())
    fetch: TeacherFetchSettings = setting(factory=TeacherFetchSettings, doc="teacher.mode fetch", rules=())


# ----------------------------------------------------------------------------------------------
# Couplings.

_SAMPLER_RULES = ("couplings_shard", "heldout_couplings", "train_stage1", "train_stage2")


@dataclasses.dataclass(frozen=True)
class SamplerSettings(Section):
    """The teacher ODE: EDM Heun (last step Euler) with autoguidance D_guide + w (D_main - D_guide)."""

    # Explicit rules: `CouplingSettings` inherits these fields and has RULES of its own.
    heun_steps: int = setting(32, "EDM Heun steps (32 -> 63 evaluations per net)", ge=1, rules=_SAMPLER_RULES)
    sigma_min: float = setting(0.002, "lowest noise level", gt=0, rules=_SAMPLER_RULES)
    sigma_max: float = setting(80.0, "highest noise level", gt=0, rules=_SAMPLER_RULES)
    rho: float = setting(7.0, "EDM time-step exponent", gt=0, rules=_SAMPLER_RULES)
    guidance: float = setting(2.1, "autoguidance weight w (paper: 1.70 at 64, 2.10 at 512)", ge=1,
                              rules=_SAMPLER_RULES)


@dataclasses.dataclass(frozen=True)
class CouplingSettings(SamplerSettings):
    """Reflow index, sharded coupling stores and the truncation threshold of their merge."""

    RULES = ("couplings_shard",)
    index_mode: Literal["imagenet", "random"] = setting(
        "imagenet", "imagenet: the dataset labels repeated `passes` times; random: uniform classes",
        rules=("reflow_index",))
    passes: int = setting(4, "imagenet mode: times the dataset labels are repeated", ge=1, rules=("reflow_index",))
    num_samples: Optional[int] = setting(None, "random mode: number of couplings", ge=1, rules=("reflow_index",))
    num_shards: int = setting(64, "couplings_shard jobs", ge=1)
    batch: int = setting(256, "generation batch = one Zarr chunk", ge=1)
    noise_dtype: Literal["float16", "float32"] = setting("float32", "stored dtype of the noise")
    endpoint_dtype: Literal["float16", "float32"] = setting("float32", "stored dtype of the teacher endpoint")
    store_noise: bool = setting(True, "store the noise; false: a compact store whose readers regenerate it from "
                                "(sample_id, seed), checked against its digest (a quarter of the bytes with float16 "
                                "endpoints)")
    precision: Literal["fp16", "bf16", "fp32"] = setting(
        "fp16", "teacher arithmetic: autocast dtype of the ODE's denoiser evaluations (fp16: EDM2 and the official "
        "code; fp32: no autocast), on every device (CPU autocast for fp16/bf16); part of the couplings' fingerprint; "
        "the held-out teacher couplings use it too", rules=("couplings_shard", "heldout_couplings"))
    fast_path: bool = setting(False, "the fused guided denoiser of `accel` (channels-last, SDPA attention; compiled "
                              "on CUDA); off until a GPU run of benchmarks/gpu_bench.py shows its numerics")
    truncation_quantile: float = setting(0.9, "keep couplings below this global quantile of mean((n-x)^2)", gt=0,
                                         le=1, rules=("couplings_merge",))
    fixed_threshold: Optional[float] = setting(None, "official-code mode: a fixed distance threshold (0.87) "
                                               "instead of the quantile", rules=("couplings_merge",))
    processes: int = setting(1, "processes per shard job (one per GPU)", ge=1, rules=())

    def __post_init__(self) -> None:
        if self.precision == "auto":  # accepted before the official fp16 became the default; say what replaced it
            raise ValueError("config key couplings.precision = 'auto' is no longer accepted (it meant bf16 on CUDA, "
                             "fp32 on the CPU): name the precision, one of ['fp16', 'bf16', 'fp32']")
        super().__post_init__()
        if self.index_mode == "random" and self.num_samples is None:
            raise ValueError("config key couplings.num_samples must be set when couplings.index_mode is random")
        # random mode knows the number of couplings now; imagenet mode once the images exist
        chunks = -(-self.num_samples // self.batch) if self.index_mode == "random" else None
        if chunks is not None and self.num_shards > chunks:
            raise ValueError(f"config key couplings.num_shards = {self.num_shards}: more shards than the {chunks} "
                             f"generation chunks of {self.batch} ({self.num_samples} couplings); every shard needs "
                             "at least one chunk")

    @property
    def sampler(self) -> SamplerSettings:
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)})


# ----------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class TimeEmbeddingSettings(Section):
    """Fit of the new t/r embeddings to the teacher's log-sigma embedding."""

    RULES = ("init_time_embedding",)
    steps: int = setting(10000, "Adam steps (0: no fit, both layers stay copies of the teacher's embedding; the "
                         "ablation of the fit)", ge=0)
    batch: int = setting(1024, "(t, r) pairs per step", ge=1)
    lr: float = setting(1e-3, "Adam learning rate", gt=0)
    betas: tuple[float, float] = setting((0.9, 0.99), "Adam betas", ge=0, lt=1)


@dataclasses.dataclass(frozen=True)
class TimeSamplerSettings(Section):
    """(t, r) of one training batch (`meanflow.sample_t_r`)."""

    RULES = ("train_stage1", "train_stage2")
    a: float = setting(4.0, "U-shaped p(t) ~ exp(a t) + exp(a (1 - t)) on [0, 1]; 0: uniform t (plain MeanFlow's "
                       "uniform sampler, the ablation of the U shape)", ge=0)
    p_mean: float = setting(-0.8, "t - r = sigmoid(N(p_mean, p_std))")
    p_std: float = setting(1.0, "t - r = sigmoid(N(p_mean, p_std))", gt=0)
    high_t: float = setting(0.95, "high-variance rule: where t > high_t and r < high_r, r = 0 (official code: "
                            "t > 0.8, i.e. high_t 0.8)", ge=0, le=1)
    high_r: float = setting(0.4, "high-variance rule: r threshold (paper and official code: 0.4)", ge=0, le=1)
    ratio_r_neq_t: float = setting(0.25, "fraction of samples with r != t", ge=0, le=1)


@dataclasses.dataclass(frozen=True)
class StageSettings(Section):
    """What differs between stage 1 (plain target) and stage 2 (CFG target)."""

    iterations: int = setting(50000, "optimiser steps of the stage", ge=1)
    grad_clip: Optional[float] = setting(None, "max gradient norm (paper: stage 2 1.0)", gt=0)
    w_max: Optional[float] = setting(None, "stage 2: w' ~ U(1, w_max) (paper: 3.0 at 64, 2.5 at 512); stage 1: "
                                     "null", ge=1)


TRACKERS = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]


@dataclasses.dataclass(frozen=True)
class TrainSettings(Section):
    """Re-MeanFlow training (both stages); `stage(n)` is what one stage's training takes."""

    RULES = ("train_stage1", "train_stage2")
    batch_size: int = setting(128, "global batch (split over processes)", ge=1)
    lr: float = setting(1e-4, "Adam learning rate (official README: 2e-4)", gt=0)
    betas: tuple[float, float] = setting((0.9, 0.99), "Adam betas (official code: 0.9, 0.95)", ge=0, lt=1)
    eps: float = setting(1e-8, "Adam epsilon", gt=0)
    weight_decay: float = setting(0.0, "Adam weight decay", ge=0)
    ema_decay: float = setting(0.9999, "EMA decay per step", ge=0, lt=1)
    class_dropout: float = setting(0.1, "probability of the null class", ge=0, lt=1)
    null_target: Literal["official", "plain"] = setting(
        "official", "stage 2: target of the rows dropped to the null class; official: the guided target like every "
        "row (w v + (1 - w) u(x_t, t, t | null)), plain: v_hat = v", rules=("train_stage2",))
    carry_optimizer: bool = setting(
        True, "stage 2 continues stage 1's Adam state (moments and step count, as the official single run does; "
        "lr, betas, eps and weight decay still from these settings); false: a fresh Adam", rules=("train_stage2",))
    jvp: Literal["tangent", "forward", "forward-fused", "autograd"] = setting(
        "tangent", "how du/dt is computed (`meanflow.jvp_t`)")
    compile: Optional[Literal["inductor", "eager", "aot_eager", "cudagraphs"]] = setting(
        None, "torch.compile backend of the training loss; null = eager")
    p: float = setting(0.5, "adaptive loss weight power", ge=0)
    c: float = setting(0.01, "adaptive loss weight constant", gt=0)
    time_sampler: TimeSamplerSettings = setting(factory=TimeSamplerSettings, doc="(t, r) sampler")
    source: Literal["couplings", "data"] = setting(
        "couplings", "what training reads: couplings (the method); data: the real images of data/images.zarr with "
        "fresh standard-normal noise per sample (`data_stream`, the ablations' baseline; no truncation, no coupling "
        "fingerprint)")
    seed: Optional[int] = setting(None, "seed of the training draws and of the data order (null: the top-level "
                                  "seed); repeats training over one coupling set (the ablations' seeds)", ge=0)
    trackers: tuple[TRACKERS, ...] = setting((), "experiment trackers (accelerate's) that get every "
                                                     "metric of the CSV per step and the one-step sample grid at "
                                                     "each snapshot, logged under the stage's work folder; "
                                                     "e.g. [tensorboard]", rules=())
    checkpoint_every: int = setting(1000, "steps between resumable checkpoints", ge=1, rules=())
    snapshot_every: Optional[int] = setting(None, "keep an EMA snapshot every N steps (evaluate it as "
                                            "eval/<stage>-stepNNNNNNNN)", ge=1, rules=())
    window_chunks: int = setting(16, "shuffle buffer, in coupling chunks", ge=1)
    processes: int = setting(1, "processes per training job (one per GPU)", ge=1, rules=())
    stage1: StageSettings = setting(factory=StageSettings, doc="stage 1", rules=("train_stage1",))
    stage2: StageSettings = setting(factory=lambda: StageSettings(grad_clip=1.0, w_max=2.5), doc="stage 2",
                                    rules=("train_stage2",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage1.w_max is not None:
            raise ValueError("config key train.stage1.w_max must be null: stage 1 trains without guidance")
        if self.stage2.w_max is None:
            raise ValueError("config key train.stage2.w_max must be a number >= 1: stage 2 draws w' ~ U(1, w_max)")

    def stage(self, n: int) -> StageSettings:
        if n not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {n!r}")
        return self.stage1 if n == 1 else self.stage2


# ----------------------------------------------------------------------------------------------
# Evaluation.

_SHARD, _MERGE = "evaluate_shard", "evaluate_merge"


@dataclasses.dataclass(frozen=True)
class InceptionSettings(Section):
    RULES = ("fetch_inception",)
    weights: Optional[str] = setting(None, "pt_inception-2015-12-05-6726825d.pth as an http(s) URL, file:// URL "
                                     "or local path; null = FID skipped (metrics say so)")
    sha256: Optional[str] = setting(None, "expected sha256 of the weights; null = check only the hash prefix in "
                                    "the file name (torch.hub convention)", pattern=SHA256_PATTERN,
                                    rules=("fetch_inception", _SHARD))


@dataclasses.dataclass(frozen=True)
class RefStatsSettings(Section):
    RULES = ("fid_reference_stats",)
    source: Optional[str] = setting(None, "provided pytorch-fid .npz (mu, sigma) as URL or path; null = computed "
                                    "from data/images.zarr with the Inception weights",
                                    rules=("fid_reference_stats", _MERGE))
    sha256: Optional[str] = setting(None, "expected sha256 of the provided file", pattern=SHA256_PATTERN)
    on_mismatch: Literal["error", "warn"] = setting(
        "error", "statistics computed here from images of another size than the decoded samples (not comparable "
        "to published FIDs): stop before the run, or warn (and the metrics note it)", rules=())


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    """Held-out teacher couplings, sharded one-step samples, FID and the pixel metrics."""

    RULES = (_SHARD, _MERGE)
    num_samples: int = setting(50000, "held-out teacher couplings (error against the teacher, grid)", ge=2,
                               rules=("heldout_couplings",))
    seed: int = setting(1000003, "held-out and sampled noise/labels: a seed no training coupling uses", ge=0,
                        rules=("heldout_couplings", _SHARD))
    batch: int = setting(256, "evaluation batch", ge=1,
                         rules=("heldout_couplings", "fid_reference_stats", _SHARD, _MERGE))
    grid_per_class: int = setting(1, "samples per class in the grid", ge=1, rules=(_MERGE,))
    pixel_resolution: Optional[int] = setting(None, "area-downsample samples and reference to this size for the "
                                              "pixel Frechet distance; null = native", ge=1,
                                              rules=("pixel_reference_stats", _SHARD, _MERGE))
    fid_samples: int = setting(50000, "one-step samples that FID is computed over, exactly", ge=2)
    shards: int = setting(8, "evaluate_shard jobs per checkpoint (the result does not depend on it)", ge=1,
                          rules=(_SHARD,))
    inception: InceptionSettings = setting(factory=InceptionSettings, doc="Inception weights for FID", rules=())
    ref_stats: RefStatsSettings = setting(factory=RefStatsSettings, doc="FID reference statistics", rules=())
    vae: Optional[str] = setting(None, "local diffusers AutoencoderKL folder that decodes latent nets to pixels; "
                                 "required for FID of latent nets; never fetched from a hub", rules=())
    precision: Literal["fp16", "bf16", "fp32"] = setting(
        "bf16", "autocast of the one-step samples and the VAE decoding (Inception always runs in fp32: its "
        "features define FID); recorded with what it means on the device (TF32 on CUDA)", rules=(_SHARD, _MERGE))
    vae_batch: int = setting(32, "images per VAE decode call (memory, not results; EDM2 uses 8)", ge=1, rules=())
    require_fid: bool = setting(True, "stop before the run when FID cannot be computed (no Inception weights, a "
                                "latent teacher without evaluate.vae); false: FID is skipped and metrics say so",
                                rules=())


# ----------------------------------------------------------------------------------------------
# Ablations.


@dataclasses.dataclass(frozen=True)
class AblationSettings(Section):
    """Which variants `snakemake ablations` runs (rules/ablations.smk, remeanflow/ablations.py); the
    variants themselves are the overlays presets/ablations/<name>.yaml."""

    RULES = ("ablations",)
    variants: tuple[str, ...] = setting((), "variant names (presets/ablations/<name>.yaml) to run; empty: all of "
                                        "them")
    checkpoint: Literal["stage1", "stage2"] = setting("stage2", "the checkpoint each variant is evaluated at "
                                                      "(stage1: no stage-2 training; for quick runs)")
    reference_heun_steps: int = setting(64, "Heun steps of the reference endpoints that each coupling sampler's "
                                        "endpoint error is measured against (held-out noise)", ge=1,
                                        rules=("ablations", "ablation_heldout_reference"))


# ----------------------------------------------------------------------------------------------
# Resources and the whole config.


@dataclasses.dataclass(frozen=True)
class ResourceSettings(Section):
    """Per-job resources of a rule group (Snakemake resources; the Slurm profile maps them)."""

    threads: int = setting(1, "CPU threads", ge=1)
    mem_mb: int = setting(2000, "memory, MB", ge=1)
    gpu: int = setting(0, "GPUs per job (per node with nodes > 1); multi-GPU rules launch one process per GPU", ge=0)
    nodes: int = setting(1, "machines of a training job (read by the training rules only): one srun task per node "
                            "starts that node's processes; the global batch splits over nodes x processes per node",
                         ge=1)
    runtime: int = setting(30, "minutes", ge=1)
    cpus_per_gpu: Optional[int] = setting(None, "Slurm --cpus-per-gpu", ge=1)
    gpu_mem_gb: Optional[float] = setting(None, "memory of one GPU, decimal GB (read by the training group only): "
                                          "the checks before the run refuse a training step whose predicted "
                                          "per-GPU peak exceeds it (`plan --gpu-mem`); null: no check", gt=0)
    slurm_partition: Optional[str] = setting(None, "Slurm partition")
    slurm_account: Optional[str] = setting(None, "Slurm account")


@dataclasses.dataclass(frozen=True)
class Settings(Section):
    """The whole configuration (`config.yaml` merged with any --configfile and --config)."""

    RULES = ()
    run_name: str = setting("toy", "outputs go to <results_dir>/<run_name>/: one plain path component (letters, "
                            "digits, '_', '.', '-'; not '.' or '..')", pattern=r"^(?!\.\.?$)[A-Za-z0-9_.-]+$")
    results_dir: str = setting("results", "folder of all runs: a relative path that stays inside the working "
                               "directory once normalised (see results_dir_outside_workdir)")
    results_dir_outside_workdir: bool = setting(False, "allow an absolute results_dir, or one that leaves the "
                                                "working directory (e.g. ../scratch): outputs are then written "
                                                "there")
    seed: int = setting(0, "training couplings, teacher, index and training draws", ge=0,
                        rules=("toy_source", "train_teacher", "reflow_index", "couplings_shard",
                               "init_time_embedding", "train_stage1", "train_stage2"))
    dataset: DatasetSettings = setting(factory=DatasetSettings, doc="dataset")
    download: DownloadSettings = setting(factory=DownloadSettings, doc="bounds of every download")
    teacher: TeacherSettings = setting(factory=TeacherSettings, doc="teacher")
    couplings: CouplingSettings = setting(factory=CouplingSettings, doc="couplings")
    time_embedding: TimeEmbeddingSettings = setting(factory=TimeEmbeddingSettings, doc="time embedding fit")
    train: TrainSettings = setting(factory=TrainSettings, doc="Re-MeanFlow training")
    evaluate: EvalSettings = setting(factory=EvalSettings, doc="evaluation")
    ablations: AblationSettings = setting(factory=AblationSettings, doc="the ablation target (`snakemake ablations`)",
                                          rules=())
    resources: dict[str, ResourceSettings] = setting(factory=lambda: {"default": ResourceSettings()},
                                                     doc="per rule group (default, preprocess, teacher, couplings, "
                                                         "train, evaluate); `default` fills missing groups")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_results_dir()

    def _check_results_dir(self) -> None:
        # Lexical: the rules join results_dir and run_name as text (rules/common.smk), so the
        # normalised text is where outputs go; a symlink the user made is the user's choice.
        if not self.results_dir:
            raise ValueError("config key results_dir = '': must name a folder (e.g. results); an empty one would "
                             "put the run at /<run_name>")
        norm = os.path.normpath(self.results_dir)
        inside = not os.path.isabs(norm) and norm != os.pardir and not norm.startswith(os.pardir + os.sep)
        if not inside and not self.results_dir_outside_workdir:
            raise ValueError(f"config key results_dir = {self.results_dir!r}: must be a relative path inside the "
                             f"working directory (normalised: {norm!r}); to write runs there on purpose, set "
                             "results_dir_outside_workdir: true")

    def resources_of(self, group: str) -> ResourceSettings:
        return self.resources.get(group, self.resources["default"])


# ----------------------------------------------------------------------------------------------
# The whole config.


def coerce(config: dict) -> dict:
    """`config` with the strings Snakemake makes of nested `--config` values turned into the
    declared types (`settings_base.coerce`)."""
    return settings_base.coerce(config, Settings)


def load(config: dict) -> Settings:
    """Typed settings of a config that `config.validate` accepted."""
    return build(Settings, config)


def json_schema() -> dict:
    """The schema of the whole config, generated from the settings classes."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "description": "remeanflow workflow configuration. GENERATED from remeanflow/settings.py by "
                       "`python -m remeanflow schema`; edit the settings classes, not this file. Unknown keys are "
                       "errors; missing keys take the paper's defaults.",
        **section_schema(Settings),
    }


def schema_yaml() -> str:
    return yaml.safe_dump(json_schema(), sort_keys=False, width=110)


def rule_config(settings: Settings, rule: str) -> dict[str, Any]:
    """The settings that change `rule`'s outputs, as nested plain values ({section: {key: value}}):
    the rule's `params:` value (Snakemake reruns it when one changes) and its provenance config."""
    return select(settings, rule) or {}


def rules_named() -> frozenset[str]:
    """Every rule name that a settings field says it enters (checked against the rule files by a test)."""
    return settings_base.rules_named(Settings)
