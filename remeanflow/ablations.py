"""The ablation DAG (`snakemake ablations`, rules/ablations.smk): the paper's claims in miniature.

A variant is a config overlay, presets/ablations/<name>.yaml, that changes only training-side
settings (couplings sampler and truncation, time-embedding fit, training); the same file runs
alone on top of any config with `--configfile`. Every variant of one ablation run shares the
run's data, teacher, reflow index, held-out couplings and evaluation settings.

`Plan` resolves, per variant and per stage, whether the stage's artifact is the base run's own
(when every rule up to that stage gets the same settings under the variant as under the base
config) or the variant's, under `<run>/ablations/<variant>/` with the main layout. So a variant
that changes only the truncation quantile gets its own manifest over the base coupling shards,
one that changes only training trains on the base manifest, and a variant equal to the base
(`full`) is the main pipeline's own training and evaluation: shared jobs run once.

`write_summary` gathers one row per variant into `ablations/summary.csv` and draws
`ablations/summary.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import config as rmf_config
from . import settings as rmf_settings
from .provenance import read as read_sidecar
from .provenance import script_code_hash

REPO = Path(__file__).resolve().parent.parent
OVERLAY_DIR = "presets/ablations"  # relative to the checkout (params hold no absolute paths)
SCRIPTS = REPO / "workflow_scripts"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
RESERVED = ("reference", "summary")  # <run>/ablations/reference/, summary.csv

# Which of the paper's claims each variant tests, and in what order the table lists them. A variant
# file not named here is listed last, in group "other".
GROUPS = {
    "full": ("a, b, c, d", "the full method (the base config)"),
    "full-seed1": ("a", "the full method, training seed 1"),
    "data": ("a", "real images + independent noise instead of couplings"),
    "data-seed1": ("a", "real images + independent noise, training seed 1"),
    "no-tuned-hyperparameters": ("b", "loss weight p, c and interval p_mean -> plain MeanFlow's"),
    "no-tuned-hyperparameters-seed1": ("b", "plain MeanFlow's p, c, p_mean, training seed 1"),
    "no-time-embedding-fit": ("b", "no fit: t/r embeddings = copies of the teacher's"),
    "uniform-t": ("b", "uniform t instead of U-shaped"),
    "uniform-t-seed1": ("b", "uniform t, training seed 1"),
    "no-high-variance-rule": ("b", "high-variance (r, t) rule off"),
    "truncation-1.0": ("b, c", "no truncation (quantile 1.0)"),
    "truncation-0.95": ("c", "truncation quantile 0.95"),
    "truncation-0.9": ("c", "truncation quantile 0.9"),
    "truncation-0.85": ("c", "truncation quantile 0.85"),
    "heun-2": ("d", "couplings from 2 Heun steps"),
    "heun-4": ("d", "couplings from 4 Heun steps"),
    "heun-8": ("d", "couplings from 8 Heun steps"),
    "heun-16": ("d", "couplings from 16 Heun steps"),
}

# What a variant may change, and the rules whose settings must stay the base's (a variant shares
# the run's data, teacher, index and evaluation).
SHARED_RULES = ("toy_source", "download_dataset", "preprocess_shard", "preprocess_merge", "train_teacher",
                "fetch_teacher", "reflow_index", "pixel_reference_stats", "fetch_inception", "fid_reference_stats",
                "evaluate_shard", "evaluate_merge")
# Each stage's artifact with the rules whose settings decide it (itself and everything upstream
# that a variant may change).
_COUPLINGS = ("couplings_shard",)
_MANIFEST = _COUPLINGS + ("couplings_merge",)
_TIME_EMB = ("init_time_embedding",)
STAGE_RULES = {
    "shards": _COUPLINGS,
    "manifest": _MANIFEST,
    "time_emb": _TIME_EMB,
    "heldout": ("heldout_couplings",),
    "stage1": _MANIFEST + _TIME_EMB + ("train_stage1",),
    "stage2": _MANIFEST + _TIME_EMB + ("train_stage1", "train_stage2"),
}

COLUMNS = ("variant", "group", "description", "changes", "trained_on", "train_seed", "heun_steps",
           "truncation_quantile", "couplings_kept", "endpoint_mse_vs_ref", "one_step_mse_vs_teacher",
           "one_step_fd_pixels_heldout", "fd_pixels_sampled", "fid", "train_seconds", "artifacts")
DATA_SOURCE = "data/images.zarr (pixels -> [-1, 1]) + fresh N(0, I) noise per sample and epoch; no truncation"


class AblationError(ValueError):
    """A bad overlay or variant selection; the message names the file or the config key."""


def overlay_path(name: str) -> str:
    return f"{OVERLAY_DIR}/{name}.yaml"


def available(repo: Path = REPO) -> list[str]:
    """Every variant name under presets/ablations/, in table order."""
    names = [p.stem for p in (repo / OVERLAY_DIR).glob("*.yaml")]
    order = list(GROUPS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def load_overlay(name: str, repo: Path = REPO) -> dict:
    path = repo / overlay_path(name)
    if not path.is_file():
        raise AblationError(f"config key ablations.variants names {name!r}, but {overlay_path(name)} does not exist "
                            f"(variants: {', '.join(available(repo))})")
    overlay = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise AblationError(f"{overlay_path(name)}: an overlay must be a mapping of config keys")
    return overlay


def variant_config(base: dict, overlay: dict) -> dict:
    """The complete config of a variant: the base config merged with its overlay, as Snakemake merges
    a --configfile, then validated (`config.validate`). The job scripts rebuild it the same way."""
    return rmf_config.validate(rmf_config.merge(base, overlay))


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    overlay: dict
    settings: rmf_settings.Settings

    @property
    def changes(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in _flatten(self.overlay).items()) or "(none)"


class Plan:
    """The variants of one ablation run and where each stage's artifact of each lives."""

    def __init__(self, base_config: dict, names=(), repo: Path = REPO, reference_heun_steps: int | None = None):
        self.base_config = base_config
        self.base = rmf_settings.load(base_config)
        self.repo = repo
        # No overlays at all (a checkout without presets/) is an error only when the target is built
        # (`require_variants`): the rest of the workflow does not need them.
        names = list(names) or available(repo)
        self.variants: dict[str, Variant] = {}
        for name in names:
            self._check_name(name)
            overlay = load_overlay(name, repo)
            try:
                cfg = variant_config(base_config, overlay)
            except rmf_config.ConfigError as e:
                raise AblationError(f"{overlay_path(name)}: {e}") from None
            variant = Variant(name, overlay, rmf_settings.load(cfg))
            self._check_shared(variant)
            self.variants[name] = variant
        steps = reference_heun_steps or self.base.ablations.reference_heun_steps
        self.reference_overlay = {"couplings": {"heun_steps": steps}}
        self.reference = rmf_settings.load(variant_config(base_config, self.reference_overlay))

    def require_variants(self) -> None:
        if not self.variants:
            raise AblationError(f"no ablation variants: {OVERLAY_DIR}/ holds no *.yaml overlay")

    def _check_name(self, name: str) -> None:
        import re

        if not re.fullmatch(NAME_PATTERN, name) or name in RESERVED:
            raise AblationError(f"config key ablations.variants: {name!r} is not a variant name (letters, digits, "
                                f"'.', '_', '-'; not {' or '.join(RESERVED)})")

    def _check_shared(self, variant: Variant) -> None:
        for key in ("run_name", "results_dir", "results_dir_outside_workdir"):
            if key in variant.overlay:
                raise AblationError(f"{overlay_path(variant.name)}: sets {key}; a variant's outputs go to "
                                    f"<run>/ablations/{variant.name}/ (to run it alone elsewhere, pass --config "
                                    f"run_name=... instead)")
        for rule in SHARED_RULES:
            if rmf_settings.rule_config(variant.settings, rule) != rmf_settings.rule_config(self.base, rule):
                raise AblationError(f"{overlay_path(variant.name)} changes the settings of rule {rule} "
                                    f"({rmf_settings.rule_config(variant.settings, rule)}): the variants of an "
                                    "ablation share the run's data, teacher, index and evaluation")

    # -- where each artifact lives -----------------------------------------------------------------

    def is_base(self, name: str, stage: str) -> bool:
        """True when every rule that decides `stage`'s artifact gets the base's settings."""
        s = self.variants[name].settings
        if stage in ("stage1", "stage2") and s.train.source == "data":  # reads no couplings
            rules = tuple(r for r in STAGE_RULES[stage] if r not in _MANIFEST)
        else:
            rules = STAGE_RULES[stage]
        return all(rmf_settings.rule_config(s, r) == rmf_settings.rule_config(self.base, r) for r in rules)

    def prefix(self, run: str, name: str, stage: str) -> str:
        """`run` for a shared artifact, else the variant's folder (same layout below it)."""
        return run if self.is_base(name, stage) else f"{run}/ablations/{name}"

    def trains_on_data(self, name: str) -> bool:
        return self.variants[name].settings.train.source == "data"

    def checkpoint(self) -> str:
        return self.base.ablations.checkpoint

    # -- params of the variant jobs ----------------------------------------------------------------

    def step(self, name: str, rule: str, script: str) -> dict:
        """The `params: variant` value of a variant job: the settings `rule` gets under the variant
        (so Snakemake reruns exactly the variant jobs whose settings change), the code version of
        the main pipeline's script that it runs and that script's own text."""
        settings = self.reference if name == "reference" else self.variants[name].settings
        path = SCRIPTS / f"{script}.py"
        return {"settings": rmf_settings.rule_config(settings, rule), "code": script_code_hash(path),
                "script": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}

    def overlay(self, name: str):
        """What the job script merges over the base config: the overlay file (read again by the
        job), or the reference's overlay itself."""
        return self.reference_overlay if name == "reference" else overlay_path(name)

    def stages(self) -> list[str]:
        """The training stages a variant runs: up to the evaluated checkpoint."""
        return ["stage1"] if self.checkpoint() == "stage1" else ["stage1", "stage2"]

    def entries(self, run: str) -> list[dict]:
        """Per variant, what its summary row is made of (`summary_rows`): its description and
        settings, and the paths of its metrics, held-out couplings, manifest and trained nets."""
        ck, out = self.checkpoint(), []
        for name, v in self.variants.items():
            s, data = v.settings, self.trains_on_data(name)
            group, description = GROUPS.get(name, ("other", ""))
            own = [stage for stage in ("shards", "manifest", "time_emb", *self.stages())
                   if not self.is_base(name, stage) and not (data and stage in ("shards", "manifest"))]
            out.append(dict(
                variant=name, group=group, description=description, changes=v.changes,
                trained_on=DATA_SOURCE if data else "couplings",
                train_seed=s.seed if s.train.seed is None else s.train.seed,
                heun_steps=s.couplings.heun_steps, truncation_quantile=s.couplings.truncation_quantile,
                metrics=f"{self.prefix(run, name, ck)}/eval/{ck}/metrics.json",
                heldout=None if data else f"{self.prefix(run, name, 'heldout')}/eval/heldout.npz",
                manifest=None if data else f"{self.prefix(run, name, 'manifest')}/reflow/manifest.json",
                train=[f"{self.prefix(run, name, st)}/train/{st}/net_ema.pt" for st in self.stages()],
                artifacts=("own " + ", ".join(own)) if own else "the base run's",
            ))
        return out


# ----------------------------------------------------------------------------------------------
# Input and params functions of rules/ablations.smk (Snakemake's lint wants no functions in rule
# files); `wc` are a job's wildcards.


class RuleInputs:
    """The input and params functions of the ablation rules of the run at `run` (`<results>/<name>`)."""

    def __init__(self, plan: Plan, run: str):
        self.plan, self.run = plan, run

    def at(self, stage: str, path: str):
        """The input at `path` (below a run folder) of a variant's `stage`: the base's or the variant's."""
        return lambda wc: f"{self.plan.prefix(self.run, wc.variant, stage)}/{path}"

    def variant(self, rule: str, script: str | None = None):
        return lambda wc: self.plan.step(wc.variant, rule, script or rule)

    def overlay(self, wc):
        return self.plan.overlay(wc.variant)

    def shards(self, num_shards: int):
        return lambda wc: [self.at("shards", f"reflow/couplings/shard-{i:05d}.zarr")(wc) for i in range(num_shards)]

    def train(self, stage: int):
        def inputs(wc) -> dict:
            init = self.at("time_emb", "time_emb/net.pt") if stage == 1 else \
                self.at("stage1", "train/stage1/train_state.pt")
            named = {"init": init(wc), "teacher": f"{self.run}/teacher/net.pt", "guide": f"{self.run}/teacher/guide.pt"}
            if self.plan.trains_on_data(wc.variant):
                named["images"] = f"{self.run}/data/images.zarr"
            else:
                named["manifest"] = self.at("manifest", "reflow/manifest.json")(wc)
            return named

        return inputs

    def eval_net(self, wc):
        return self.at(wc.ckpt, f"train/{wc.ckpt}/net_ema.pt")(wc)

    def summary(self, wc) -> dict:
        self.plan.require_variants()
        entries = self.plan.entries(self.run)
        return {
            "metrics": [e["metrics"] for e in entries],
            "heldout": sorted({e["heldout"] for e in entries if e["heldout"]}),
            "reference": f"{self.run}/ablations/reference/heldout.npz",
        }


# ----------------------------------------------------------------------------------------------
# The summary table and figure.


def _one_step(metrics: dict) -> dict:
    rows = {r["name"]: r for r in metrics.get("rows", [])}
    if "one_step" not in rows:
        raise ValueError("metrics.json has no 'one_step' row")
    return rows["one_step"]


def endpoint_error(heldout: str | Path, reference: str | Path) -> float:
    """Mean over the held-out samples of mean((x - x_ref)^2): a coupling sampler's endpoints against
    the reference sampler's, from the same noise and classes."""
    from .heldout import load_heldout

    a, b = load_heldout(heldout), load_heldout(reference)
    if not (np.array_equal(a.noise, b.noise) and np.array_equal(a.labels, b.labels)):
        raise ValueError(f"{heldout} and {reference} hold different noise or classes: not comparable")
    diff = a.teacher_endpoint.astype(np.float64) - b.teacher_endpoint.astype(np.float64)
    return float(np.mean(diff.reshape(len(diff), -1) ** 2))


def _train_seconds(paths: list[str]) -> float | None:
    total = 0.0
    for p in paths:
        record = read_sidecar(p)
        if record is None or "seconds" not in record.get("extra", {}):
            return None
        total += float(record["extra"]["seconds"])
    return total


def _kept(manifest: str | None) -> float | None:
    if manifest is None:
        return None
    t = json.loads(Path(manifest).read_text())["truncation"]
    return t["kept"] / (t["kept"] + t["dropped"])


def summary_rows(entries: list[dict], reference: str) -> list[dict]:
    """One table row per entry of `entries` (the `params: variants` of rule ablations: name, group,
    changes, trained_on, train_seed, heun_steps, truncation_quantile, metrics, heldout, manifest,
    train, artifacts)."""
    rows = []
    for e in entries:
        metrics = json.loads(Path(e["metrics"]).read_text())
        one = _one_step(metrics)
        data = e["trained_on"] != "couplings"
        rows.append({
            **{k: e[k] for k in ("variant", "group", "description", "changes", "trained_on", "train_seed",
                                 "artifacts")},
            "heun_steps": None if data else e["heun_steps"],
            "truncation_quantile": None if data else e["truncation_quantile"],
            "couplings_kept": None if data else _kept(e["manifest"]),
            "endpoint_mse_vs_ref": None if data else endpoint_error(e["heldout"], reference),
            "one_step_mse_vs_teacher": one.get("mse_vs_teacher"),
            "one_step_fd_pixels_heldout": one.get("fd_pixels"),
            "fd_pixels_sampled": (metrics.get("sampled") or {}).get("fd_pixels"),
            "fid": metrics.get("fid"),
            "train_seconds": _train_seconds(e["train"]),
        })
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_summary(entries: list[dict], reference: str, out_csv, out_png, *, checkpoint: str,
                  reference_heun_steps: int) -> dict:
    from .fileio import atomic_path

    rows = summary_rows(entries, reference)
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([_fmt(r[c]) for c in COLUMNS])
    plot_summary(rows, out_png, checkpoint=checkpoint, reference_heun_steps=reference_heun_steps)
    return {"variants": len(rows), "checkpoint": checkpoint}


def read_summary(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_summary(rows: list[dict], out_png, *, checkpoint: str, reference_heun_steps: int) -> None:
    """Two bar panels (one-step error against the teacher; pixel Frechet distance of the sampled
    set) over the variants, colour = group; a third panel: endpoint error against the reference
    sampler per Heun steps of the coupling sets.

    The bar panels are logarithmic, each bar is labelled with its value and a dashed line marks the
    first row's (the reference variant's): one diverged variant (e.g. 2-step couplings, FD ~800)
    would otherwise flatten every other bar against the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    names = [r["variant"] for r in rows]
    groups = sorted({r["group"] for r in rows})
    colors = {g: f"C{i}" for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.0, 0.35 * len(rows) + 2.0)))
    for ax, key, title in ((axes[0], "one_step_mse_vs_teacher", f"one-step MSE vs teacher ({checkpoint})"),
                           (axes[1], "fd_pixels_sampled", f"pixel Frechet distance, sampled ({checkpoint})")):
        # log axis: NaN (not measured) and 0 have no bar (None)
        values = [v if v == v and v > 0 else None for v in (_num(r[key]) for r in rows)]
        shown = [v for v in values if v is not None]
        ax.barh(range(len(rows)), [v or 0 for v in values], color=[colors[r["group"]] for r in rows])
        if shown:
            ax.set_xscale("log")
            ax.set_xlim(min(shown) / 1.5, max(shown) * 3)
            if values[0] is not None:
                ax.axvline(values[0], color="0.3", linestyle="--", linewidth=0.8)
        for y, v in enumerate(values):
            if v is not None:
                ax.annotate(f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3, which="both")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups]
    fig.legend(handles, [f"claim {g}" for g in groups], fontsize=8, loc="lower center", ncol=len(groups))
    points = sorted({(int(r["heun_steps"]), r["endpoint_mse_vs_ref"]) for r in rows
                     if r["heun_steps"] is not None and r["endpoint_mse_vs_ref"] is not None})
    ax = axes[2]
    if points:
        ax.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], "o-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("Heun steps of the coupling set")
    ax.set_title(f"endpoint MSE vs {reference_heun_steps}-step reference (held-out noise)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend below the panels
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
