"""Run report: figures and one self-contained HTML page (docs/architecture.md).

What a run produced, on one page that can be mailed or archived without the results tree:

* per evaluated checkpoint: the sample grid made by `evaluate.evaluate_checkpoint`, the metrics
  table of its ``metrics.json`` (one-step model, untrained initial model, the teacher's single
  step and multi-step endpoints) and the training curves of its ``train/<stage>/metrics.csv``;
* the teacher's training loss (``teacher/metrics.csv``);
* the distribution of the coupling distances mean((n - x)^2) with the truncation threshold
  (``reflow/manifest.json``, docs/method.md, "MeanFlow loss" step 1);
* a provenance table of every artifact in the lineage of those files (`provenance.lineage`).

The page is self-contained: images are inlined as base64 ``data:`` URIs and the style sheet is
inline; it loads nothing, runs no script and uses no web font.

Figures are drawn with matplotlib's object-oriented API (`matplotlib.figure.Figure`, rendered by
Agg), which touches no global pyplot state and needs no display.

Input formats read here (errors name the file and the key or column):

* training metrics CSV: columns ``step, loss, mse, w_pi, grad_norm, kept_fraction`` (numbers;
  ``nan``/``inf`` are counted and shown as gaps);
* teacher metrics CSV: columns ``role, step, loss`` (one curve per role);
* evaluation JSON: ``format`` = `EVAL_FORMAT`, ``rows`` = [{name, fd_pixels, mse_vs_teacher,
  nfe, ...}] on the held-out teacher couplings, ``notes`` (strings), optional ``sampled``
  {num_samples, fid, fd_pixels, nfe} (the sharded one-step evaluation) and ``fid`` (number or null);
* coupling manifest: ``truncation`` {mode, quantile, threshold, kept, dropped} and
  ``distance_stats.histogram`` {counts [B], edges [B + 1]}.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import math
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import provenance
from .fileio import atomic_path

EVAL_FORMAT = "remeanflow-eval-v1"  # evaluate.METRICS_FORMAT, without importing torch here
TRAIN_COLUMNS = ("step", "loss", "mse", "w_pi", "grad_norm", "kept_fraction")
TEACHER_COLUMNS = ("step", "loss")
METRIC_COLUMNS = ("fd_pixels", "mse_vs_teacher", "nfe")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 100

# What each evaluation row is, for the table (rows with other names are shown with their name).
ROW_LABELS = {
    "one_step": "Re-MeanFlow, one step",
    "initial_one_step": "initial model (fitted time embedding), one step",
    "teacher_1step": "teacher, one Euler step",
    "teacher_endpoint": "teacher, multi-step ODE endpoint",
}

# ----------------------------------------------------------------------------------------------
# Reading inputs.


def _load_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    return obj


def read_csv_columns(path, numeric: Sequence[str], text: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Columns of a metrics CSV: `numeric` ones as float64 arrays, `text` ones as str arrays.

    ``nan``/``inf`` cells are kept (plots show them as gaps and say how many); empty or other
    non-numeric cells are errors naming the file, line and column, as is a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics CSV {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from e
    missing = [c for c in (*numeric, *text) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(numeric) + list(text)}, "
                         f"found {list(df.columns)}")
    if len(df) == 0:
        raise ValueError(f"{path}: no data rows")
    out: dict[str, np.ndarray] = {c: df[c].to_numpy(dtype=str) for c in text}
    for c in numeric:
        cells = df[c].str.strip()
        values = pd.to_numeric(cells, errors="coerce")
        bad = values.isna() & (cells.str.lower() != "nan")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path}: line {i + 2}, column {c!r}: {df[c].iloc[i]!r} is not a number")
        out[c] = values.to_numpy(dtype=np.float64)
    return out


def read_eval_metrics(path) -> dict:
    """An evaluation ``metrics.json`` (format `EVAL_FORMAT`), checked for what the report shows."""
    metrics = _load_json(path, "evaluation metrics")
    if metrics.get("format") != EVAL_FORMAT:
        raise ValueError(f"{path}: 'format' is {metrics.get('format')!r}, expected {EVAL_FORMAT!r}")
    rows = metrics.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: 'rows' must be a non-empty list of metric rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: rows[{i}] must be an object, got {type(row).__name__}")
        missing = [k for k in ("name", *METRIC_COLUMNS) if k not in row]
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks key(s) {missing}")
    notes = metrics.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"{path}: 'notes' must be a list of strings")
    return metrics


@dataclasses.dataclass(frozen=True)
class CouplingDistances:
    """The manifest's distance histogram and truncation (`coupling_set.distance_stats`, `truncation`)."""

    counts: np.ndarray  # [B]
    edges: np.ndarray  # [B + 1]
    truncation: dict
    stats: dict

    @property
    def threshold(self) -> float | None:
        return self.truncation.get("threshold")

    @property
    def kept_fraction(self) -> float | None:
        """Fraction of all couplings that training keeps (None when nothing was counted)."""
        total = self.truncation.get("kept", 0) + self.truncation.get("dropped", 0)
        return self.truncation["kept"] / total if total else None


def read_coupling_distances(manifest_path) -> CouplingDistances:
    manifest = _load_json(manifest_path, "coupling manifest")
    trunc = manifest.get("truncation")
    if not isinstance(trunc, dict) or "threshold" not in trunc:
        raise ValueError(f"{manifest_path}: 'truncation' must be an object with a 'threshold' key")
    stats = manifest.get("distance_stats")
    hist = stats.get("histogram") if isinstance(stats, dict) else None
    if not isinstance(hist, dict) or "counts" not in hist or "edges" not in hist:
        raise ValueError(f"{manifest_path}: 'distance_stats.histogram' must hold 'counts' and 'edges'")
    counts, edges = np.asarray(hist["counts"], dtype=np.float64), np.asarray(hist["edges"], dtype=np.float64)
    if counts.ndim != 1 or edges.shape != (counts.size + 1,) or counts.size == 0:
        raise ValueError(f"{manifest_path}: 'distance_stats.histogram' needs B >= 1 counts and B + 1 edges, "
                         f"got {counts.shape} counts and {edges.shape} edges")
    if not (np.isfinite(edges).all() and np.all(np.diff(edges) >= 0)):
        raise ValueError(f"{manifest_path}: 'distance_stats.histogram.edges' must be finite and non-decreasing")
    return CouplingDistances(counts=counts, edges=edges, truncation=trunc, stats=stats)


# ----------------------------------------------------------------------------------------------
# Figures.


def _save_figure(fig: Figure, path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, metadata={"Software": None})


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps, ignoring non-finite values (NaN where none is finite):
    one batch's loss is too noisy (random t, r and classes per sample) to read a trend from."""
    s = pd.Series(np.where(np.isfinite(values), values, np.nan))
    return s.rolling(window, min_periods=1).mean().to_numpy()


def nonfinite_notes(columns: Mapping[str, np.ndarray], keys: Iterable[str], prefix: str = "") -> list[str]:
    """One note per column with NaN/inf values: plots show them as gaps, the report says so."""
    notes = []
    for key in keys:
        n = int(np.count_nonzero(~np.isfinite(columns[key])))
        if n:
            notes.append(f"{prefix}{key}: {n} of {columns[key].size} values are NaN/inf (gaps in the curve)")
    return notes


def _trend(ax, steps: np.ndarray, values: np.ndarray, *, color: str = "C0", label: str | None = None) -> None:
    """Raw per-step values (faint) and their moving average over ~2% of the run (solid)."""
    window = max(1, steps.size // 50)
    ax.plot(steps, values, lw=0.6, alpha=0.35, color=color)
    if label is None and window > 1:
        label = f"mean of {window} steps"
    ax.plot(steps, moving_average(values, window), lw=1.5, color=color, label=label)


def _curve(ax, steps: np.ndarray, values: np.ndarray, *, log: bool, label: str) -> None:
    """One training-curve panel."""
    _trend(ax, steps, values)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    finite = values[np.isfinite(values)]
    # a log axis only pays off over more than a decade; over less it just crowds the tick labels
    if log and finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def plot_training_curves(
    columns: Mapping[str, np.ndarray], out_png, *, title: str, grad_clip: float | None = None,
    expected_kept: float | None = None,
) -> list[str]:
    """Training curves of one stage (`TRAIN_COLUMNS`) -> PNG; returns notes on non-finite values.

    Panels: MeanFlow loss (adaptive-weighted, docs/method.md, MeanFlow loss step 8), the unweighted MSE of u
    against its target, the gradient norm before clipping (with the clip level), the per-batch
    fraction of couplings kept by the truncation (with the manifest's global fraction), and w' of
    the CFG target (step 6) when it is not 1 throughout, i.e. in a CFG stage.
    """
    steps = columns["step"]
    panels = [("loss", "MeanFlow loss (adaptive weight)", True), ("mse", "MSE of u vs target", True),
              ("grad_norm", "gradient norm (before clipping)", True), ("kept_fraction", "kept fraction of batch", False)]
    if np.any(columns["w_pi"] != 1.0):
        panels.append(("w_pi", "CFG scale w'", False))
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, label, log) in zip(axes, panels):
        _curve(ax, steps, columns[key], log=log, label=label)
        if key == "grad_norm" and grad_clip is not None:
            ax.axhline(grad_clip, color="C3", ls="--", lw=1, label=f"clip {grad_clip:g}")
        if key == "kept_fraction" and expected_kept is not None:
            ax.axhline(expected_kept, color="C3", ls="--", lw=1, label=f"whole set {expected_kept:.3f}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    _save_figure(fig, out_png)
    return nonfinite_notes(columns, [k for k, _, _ in panels], f"{title}: ")


def plot_teacher_loss(columns: Mapping[str, np.ndarray] | None, out_png) -> list[str]:
    """The teacher's EDM2 training loss, one curve per role (main net, guide) -> PNG; returns notes.

    `columns` None: the teacher was fetched (published checkpoints), there is no training log;
    the figure says so.
    """
    fig = Figure(figsize=(7.0, 3.2), layout="constrained")
    ax = fig.subplots()
    notes = []
    if columns is None:
        ax.text(0.5, 0.5, "teacher fetched (published checkpoints): no training log in this run",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save_figure(fig, out_png)
        return notes
    for i, role in enumerate(sorted(set(columns["role"].tolist()))):
        pick = columns["role"] == role
        steps, loss = columns["step"][pick], columns["loss"][pick]
        _trend(ax, steps, loss, color=f"C{i}", label=f"{role} ({steps.size} steps)")
        notes += nonfinite_notes({"loss": loss}, ["loss"], f"teacher {role}: ")
    _finish_single(fig, ax, "step", "EDM2 loss", "Teacher training", out_png)
    return notes


def _finish_single(fig, ax, xlabel: str, ylabel: str, title: str, out_png) -> None:
    """Labels, title, grid and legend of a one-panel figure, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, out_png)


def plot_distance_histogram(dist: CouplingDistances, out_png) -> None:
    """Histogram of the coupling distances mean((n - x)^2) with the truncation threshold -> PNG."""
    fig = Figure(figsize=(7.0, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.stairs(dist.counts, dist.edges, fill=True, alpha=0.6, color="C0", label="couplings")
    t = dist.truncation
    if dist.threshold is not None:
        how = f"quantile {t['quantile']:g}" if t.get("mode") == "quantile" else t.get("mode", "")
        ax.axvline(dist.threshold, color="C3", ls="--", lw=1.5,
                   label=f"threshold {dist.threshold:.4g} ({how}): kept {t.get('kept')}, dropped {t.get('dropped')}")
    _finish_single(fig, ax, "distance mean((n - x)²)", "couplings", "Coupling distances and truncation", out_png)


def copy_figure(src, dst) -> None:
    """Copy a PNG (checked) to `dst` atomically."""
    png_size(src)  # raises on anything but a PNG
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def stage_figures(
    train_metrics, eval_samples, manifest, out_training_png, out_samples_png, *, stage: str,
    grad_clip: float | None = None,
) -> dict:
    """Figures of one checkpoint: its training curves and a copy of its sample grid (so that both
    are outputs of a report rule and can carry captions in ``snakemake --report``)."""
    notes = plot_training_curves(
        read_csv_columns(train_metrics, TRAIN_COLUMNS), out_training_png, title=f"Training, {stage}",
        grad_clip=grad_clip, expected_kept=read_coupling_distances(manifest).kept_fraction,
    )
    copy_figure(eval_samples, out_samples_png)
    return {"stage": stage, "notes": notes}


# ----------------------------------------------------------------------------------------------
# Provenance table.


def _display_path(path, root: Path | None) -> str:
    p = Path(path)
    if root is not None:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(p)


def provenance_rows(artifacts: Iterable, root=None) -> list[dict]:
    """One row per distinct artifact in the lineage of `artifacts` (`provenance.lineage`).

    Row: path (relative to `root` when under it), rule ('source' without a sidecar), sha256,
    config hash, commit, dirty flag, finished time, ``changed`` (the artifact's current sha256
    differs from what a consumer recorded: the consumer is stale), ``missing``. Sorted by
    finished time, sources first.
    """
    root = Path(root) if root is not None else None
    rows: dict[str, dict] = {}

    def visit(node: dict, recorded: str | None) -> None:
        key = str(Path(node["path"]).resolve())
        row = rows.get(key)
        if row is None:
            row = rows[key] = dict(
                path=_display_path(node["path"], root), rule=node["rule"] or "source", sha256=node.get("sha256"),
                config_hash=node.get("config_hash"), commit=node.get("commit"), dirty=node.get("dirty"),
                finished=node.get("finished"), missing=bool(node.get("missing")), changed=False,
            )
        if recorded is not None and node.get("sha256") is not None and recorded != node["sha256"]:
            row["changed"] = True
        for child in node["inputs"]:
            visit(child, child.get("recorded_sha256"))

    # One visited-set across all roots: a subtree already listed (e.g. the couplings under both
    # stages) is not walked again, and an input without a sidecar is hashed once, not per root.
    seen: set[str] = set()
    for artifact in artifacts:
        visit(provenance.lineage(artifact, seen), None)
    return sorted(rows.values(), key=lambda r: (r["finished"] is not None, r["finished"] or "", r["path"]))


# ----------------------------------------------------------------------------------------------
# HTML.


def png_data_uri(path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI (the file must be a PNG)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file (expected the PNG signature)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as a dash, everything HTML-escaped."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG from its IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file (expected the PNG signature and an IHDR chunk)")
    return struct.unpack(">II", data[16:24])


def _figure(path, alt: str, caption: str, min_width: int = 0) -> str:
    """An inlined PNG; images narrower than `min_width` are shown enlarged by an integer factor
    (sample grids of small images would otherwise be a few dozen pixels wide)."""
    width = png_size(path)[0]
    factor = max(1, min(8, min_width // width))
    size = f' width="{width * factor}"' if factor > 1 else ""
    return (f'<figure><img src="{png_data_uri(path)}" alt="{html.escape(alt)}"{size}>'
            f"<figcaption>{caption}</figcaption></figure>")


def _notes(notes: Sequence[str]) -> str:
    return "<ul class=\"notes\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else ""


def metrics_table_html(metrics: dict) -> str:
    """Tables of one ``metrics.json``: a row per generator on the held-out teacher couplings (FID
    column when rows carry one), the sampled one-step evaluation (FID over ``sampled.num_samples``
    samples) when present, and the notes (e.g. why FID was skipped)."""
    rows = metrics["rows"]
    with_fid = any("fid" in r for r in rows)
    header = ["generator", "row", "FD (pixels)", "MSE vs teacher", "NFE", "samples"] + (["FID"] if with_fid else [])
    body = []
    for r in rows:
        cells = [html.escape(ROW_LABELS.get(r["name"], r["name"])), f"<code>{html.escape(str(r['name']))}</code>",
                 _fmt(r["fd_pixels"]), _fmt(r["mse_vs_teacher"]), _fmt(r["nfe"]), _fmt(r.get("num_samples"))]
        body.append(cells + ([_fmt(r.get("fid"))] if with_fid else []))
    parts = [_table(header, body, "metrics")]
    notes = list(metrics.get("notes", []))
    sampled = metrics.get("sampled")
    if isinstance(sampled, dict):
        parts.append(_table(["sampled one-step evaluation", ""], [
            ["samples (uniform classes)", _fmt(sampled.get("num_samples"))], ["FID", _fmt(sampled.get("fid"))],
            ["FD (pixels)", _fmt(sampled.get("fd_pixels"))], ["NFE", _fmt(sampled.get("nfe"))],
        ], "metrics"))
    elif metrics.get("fid") is not None:
        notes.insert(0, f"FID: {_fmt(metrics['fid'])}")
    return "".join(parts) + _notes(notes)


def provenance_table_html(rows: Sequence[dict]) -> str:
    def commit(r):
        if r["commit"] is None:
            return "—"
        return f"<code>{r['commit'][:10]}</code>" + (' <span class="warn">dirty</span>' if r["dirty"] else "")

    def flags(r):
        out = []
        if r["changed"]:
            out.append('<span class="warn">changed after use</span>')
        if r["missing"]:
            out.append('<span class="warn">missing</span>')
        return " ".join(out)

    body = [[f"<code>{html.escape(r['path'])}</code>", html.escape(r["rule"]),
             f"<code>{(r['sha256'] or '—')[:12]}</code>", f"<code>{(r['config_hash'] or '—')[:12]}</code>",
             commit(r), html.escape(r["finished"] or "—"), flags(r)] for r in rows]
    return _table(["artifact", "rule", "sha256", "config hash", "commit", "finished", "status"], body, "provenance")


def provenance_summary(rows: Sequence[dict]) -> list[str]:
    """Warnings a reader must see first: mixed or uncommitted code, stale or missing inputs."""
    made = [r for r in rows if r["rule"] != "source"]
    commits = sorted({r["commit"] for r in made if r["commit"]})
    out = []
    if len(commits) > 1:
        out.append(f"artifacts were made by {len(commits)} different commits: {', '.join(c[:10] for c in commits)}")
    if dirty := [r for r in made if r["dirty"]]:
        out.append(f"{len(dirty)} of {len(made)} artifacts were made from a checkout with uncommitted changes")
    if changed := [r["path"] for r in rows if r["changed"]]:
        out.append(f"{len(changed)} artifact(s) changed after a later step used them: {', '.join(changed)}")
    if missing := [r["path"] for r in rows if r["missing"]]:
        out.append(f"{len(missing)} artifact(s) of the lineage are missing: {', '.join(missing)}")
    return out


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5em;color:#1d2127;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:1.8em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #d4d7de;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef0f4}table.metrics td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums}
table.provenance{font-size:.8em}code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
figure{margin:.8em 0}figure img{max-width:100%;image-rendering:pixelated;border:1px solid #d4d7de}
figcaption{font-size:.85em;color:#4a4f59}.warn{color:#a40000;font-weight:600}
ul.notes{font-size:.85em;color:#4a4f59}.meta{color:#4a4f59;font-size:.9em}
"""


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """What the report shows of one evaluated checkpoint."""

    eval_metrics: Path
    train_metrics: Path
    samples_png: Path  # the sample grid (copied by `stage_figures`)
    training_png: Path  # the training curves (`stage_figures`)


def _grid_caption(metrics: dict) -> str:
    grid = metrics.get("grid") or {}
    cols = ", ".join(f"<code>{html.escape(str(c))}</code>" for c in grid.get("columns", []))
    labels = ", ".join(str(x) for x in grid.get("labels", []))
    return (f"One-step samples from the held-out noise (seed {_fmt(metrics.get('seed'))}). Columns, left to right: "
            f"{cols}. One row per held-out sample; classes {labels}.")


SECTIONS = ("metrics", "samples", "training", "teacher", "couplings", "provenance")


def _head(run_name: str, num_artifacts: int) -> str:
    title = html.escape(run_name)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Re-MeanFlow report: {title}</title>'
            f"<style>{_CSS}</style></head><body><h1>Re-MeanFlow run <code>{title}</code></h1>"
            f'<p class="meta">Report generated {html.escape(provenance.now())}; {num_artifacts} artifacts in the '
            "lineage.</p><nav>" + "".join(f'<a href="#{a}">{a.capitalize()}</a>' for a in SECTIONS) + "</nav>")


def _couplings_section(distances: CouplingDistances, couplings_png) -> str:
    t, st = distances.truncation, distances.stats
    summary = [
        ["couplings", _fmt(t.get("kept", 0) + t.get("dropped", 0))], ["kept", _fmt(t.get("kept"))],
        ["dropped", _fmt(t.get("dropped"))], ["mode", _fmt(t.get("mode"))],
        ["quantile", _fmt(t.get("quantile"))], ["threshold", _fmt(t.get("threshold"))],
        ["mean ± std", f"{_fmt(st.get('mean'))} ± {_fmt(st.get('std'))}"],
        ["min / max", f"{_fmt(st.get('min'))} / {_fmt(st.get('max'))}"],
    ]
    caption = ("Per-coupling distance mean((n - x)²) over the whole set; training drops couplings above the "
               "threshold (MeanFlow loss step 1).")
    return _figure(couplings_png, "coupling distance histogram", caption) + _table(["truncation", ""], summary)


_TRAINING_CAPTION = ("Faint: per-step values; solid: moving mean. Dashed: the gradient clip level, and the fraction "
                     "of the whole coupling set that the truncation keeps.")
_TEACHER_CAPTION = "EDM2 training loss of the teacher, one curve per role in its log."
_PROVENANCE_INTRO = ('<p class="meta">Every artifact behind this page, oldest first (<code>python -m remeanflow '
                     "provenance &lt;artifact&gt;</code> prints the tree).</p>")


# The columns of ablations/summary.csv the page shows (the CSV has all of them).
ABLATION_COLUMNS = ("variant", "group", "description", "train_seed", "heun_steps", "truncation_quantile",
                    "endpoint_mse_vs_ref", "one_step_mse_vs_teacher", "fd_pixels_sampled", "fid", "train_seconds",
                    "artifacts")


def read_ablations(run_dir) -> tuple[list[dict], Path] | None:
    """The ablation table and figure of a run (`snakemake ablations`), None when it has not run."""
    folder = Path(run_dir) / "ablations"
    table, figure = folder / "summary.csv", folder / "summary.png"
    if not (table.is_file() and figure.is_file()):
        return None
    with open(table, newline="") as f:
        return list(csv.DictReader(f)), figure


def _ablations_section(rows: Sequence[dict], figure) -> str:
    intro = ("<p>Training variants over this run's teacher and coupling set (<code>snakemake ablations</code>, "
             "presets/ablations/), each evaluated with the same held-out noise and metrics; the data variants "
             "train on the images with fresh independent noise. Endpoint error: each coupling sampler's "
             "held-out endpoints against the reference sampler's. Full table: ablations/summary.csv.</p>")
    table = _table(ABLATION_COLUMNS, ([html.escape(r.get(c) or "") for c in ABLATION_COLUMNS] for r in rows))
    return intro + table + _figure(figure, "ablation summary", "One-step error and pixel Frechet distance per "
                                   "variant (colour: the claim it tests); endpoint error per Heun steps.")


def render_report(
    *, run_name: str, stages: Mapping[str, StageInputs], metrics: Mapping[str, dict], teacher_png, couplings_png,
    distances: CouplingDistances, provenance_table: Sequence[dict], notes: Sequence[str] = (),
    ablations: tuple[Sequence[dict], Any] | None = None,
) -> str:
    """The report page as one self-contained HTML string (`metrics`: `read_eval_metrics` per stage;
    `ablations`: the rows of ablations/summary.csv and its figure, when the ablations ran)."""
    def section(anchor: str, title: str, body: str) -> str:
        return f'<h2 id="{anchor}">{title}</h2>{body}'

    def per_stage(fn) -> str:
        return "".join(f"<h3>{html.escape(stage)}</h3>{fn(stage, s)}" for stage, s in stages.items())

    warnings = provenance_summary(provenance_table)
    parts = [
        _head(run_name, len(provenance_table)),
        '<div class="warn"><p>Provenance warnings:</p>' + _notes(warnings) + "</div>" if warnings else "",
        section("metrics", "Metrics per checkpoint", per_stage(lambda stage, s: metrics_table_html(metrics[stage]))),
        section("samples", "Samples", per_stage(lambda stage, s: _figure(
            s.samples_png, f"sample grid {stage}", _grid_caption(metrics[stage]), min_width=480))),
        section("training", "Training curves", per_stage(lambda stage, s: _figure(
            s.training_png, f"training curves {stage}", _TRAINING_CAPTION))),
        section("teacher", "Teacher", _figure(teacher_png, "teacher loss", _TEACHER_CAPTION)),
        section("couplings", "Couplings", _couplings_section(distances, couplings_png)),
        section("ablations", "Ablations", _ablations_section(*ablations)) if ablations else "",
        section("provenance", "Provenance", _PROVENANCE_INTRO + provenance_table_html(provenance_table)),
        section("notes", "Notes", _notes(notes)) if notes else "",
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def build_report(
    out_html, out_teacher_png, out_couplings_png, *, run_name: str, teacher_metrics=None, manifest,
    stages: Mapping[str, StageInputs], lineage_of: Sequence = (), root=None,
) -> dict:
    """Draw the run-level figures and write the self-contained report page.

    `teacher_metrics`: the teacher's training log, None for a fetched teacher. `lineage_of`:
    artifacts whose lineage fills the provenance table (with the stage inputs, `manifest` and
    `teacher_metrics`); `root`: folder the table's paths are shown relative to. Every input is
    read and checked before anything is written. Returns a summary (artifact count, provenance
    warnings, notes on non-finite values).
    """
    distances = read_coupling_distances(manifest)
    metrics = {stage: read_eval_metrics(s.eval_metrics) for stage, s in stages.items()}
    teacher = None if teacher_metrics is None else read_csv_columns(teacher_metrics, TEACHER_COLUMNS, text=("role",))
    notes = []
    for stage, s in stages.items():
        notes += nonfinite_notes(read_csv_columns(s.train_metrics, TRAIN_COLUMNS), TRAIN_COLUMNS, f"{stage}: ")
    stage_files = [p for s in stages.values() for p in dataclasses.astuple(s)]
    rows = provenance_rows([*([teacher_metrics] if teacher is not None else []), manifest, *stage_files, *lineage_of], root)

    notes = plot_teacher_loss(teacher, out_teacher_png) + notes
    plot_distance_histogram(distances, out_couplings_png)
    page = render_report(run_name=run_name, stages=stages, metrics=metrics, teacher_png=out_teacher_png,
                         couplings_png=out_couplings_png, distances=distances, provenance_table=rows, notes=notes,
                         ablations=read_ablations(root) if root is not None else None)
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return {"artifacts": len(rows), "warnings": provenance_summary(rows), "notes": notes, "bytes": len(page)}
