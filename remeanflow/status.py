"""`python -m remeanflow status [RUN_DIR] [--json] [--configfile FILE ...]`: where a run stands.

Reads files only (never writes, never starts anything), so it works while Snakemake runs, after a
kill and after completion. Per stage (dataset, teacher, reflow index, couplings, coupling merge,
time embedding, stage 1, stage 2, evaluation inputs, evaluation of each checkpoint, report):

* ``done``: every output of the stage exists with its provenance sidecar
  (``<output>.provenance.json``, written only after a job succeeded) and Snakemake does not mark
  any of them incomplete;
* ``running``: partial work exists: some outputs, an output without its sidecar yet, a
  temporary (``.<output>.tmp<pid>``), a work folder (``reflow/work/shard-XXXXX.zarr``,
  ``train/work/<stage>/``), an evaluation shard, an output that Snakemake marks incomplete
  (``.snakemake/incomplete``: a job started and has not finished -- it is running, or it was
  killed), or a log written in the last few minutes. A run killed mid-way shows its killed
  stages as running, with how long ago they were last updated;
* ``pending``: nothing of it exists yet (an earlier attempt that failed is named in the notes).

Per coupling shard: chunks done out of total, from the store's completion mask
(`couplings.completion_mask`; stores in progress are in ``reflow/work/``, finished ones in
``reflow/couplings/``). Per training stage: the newest checkpoint step (``ckpt-XXXXXXXX.pt`` names
in ``train/work/<stage>/``), the last step, loss and samples/s of the live ``metrics.csv``, the
number of iterations and the time left at the recent step time.

Where `iterations` comes from (it is not in a checkpoint's configuration, since a finished stage
can be extended): a finished stage's sidecar; else the stage's log (the line the training job
writes when it starts: "training from the start for N steps" / "resuming ... at step S of N");
else the run's configuration; else it is reported as unknown. The configuration is the repository's
``config.yaml`` merged with the ``--configfile`` files (as Snakemake merges them) and validated with
`config.validate`. Without ``--configfile``, the config files named in the newest Snakemake log of
the working directory are used when that log is about this run, else ``config.yaml`` alone when its
``run_name`` is this run's; ``--config`` overrides given to Snakemake on the command line are not
seen.

Exit codes: 0 = status printed; 2 = no run found (or several, listed), or an unreadable
``--configfile``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import provenance

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
STATES = ("done", "running", "pending")
# A log written this recently counts as a job at work.
RECENT_LOG_S = 300.0
# Running work not updated for this long is flagged as idle (killed or stalled?).
IDLE_S = 600.0
# Recent metrics rows that the step time (and so the time left) is averaged over.
RECENT_ROWS = 50
# Above this many shards, the shard table lists only the unfinished ones.
MAX_SHARD_ROWS = 16
# Top-level entries of a run folder (docs/architecture.md, data and artifact layout).
RUN_ENTRIES = ("source", "data", "teacher", "reflow", "time_emb", "train", "fid", "eval", "report", "logs", "benchmarks")
TRAIN_STAGES = ("stage1", "stage2")
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_EVAL_NAME_RE = re.compile(r"^stage[12](-step\d+)?$")
_ATTEMPT = "===== attempt started"
_PROGRESS_RE = re.compile(r"(\d+) of (\d+) steps \((\d+)%\) done")

STATUS_HELP = "show where a run stands: each stage done / running / pending, coupling shards, training progress"
STATUS_DESCRIPTION = (
    "Summarise where a run (results/<run_name>/) stands, from its files only: works during a run, after a kill "
    "and after completion, and changes nothing. Per stage: done (outputs with their provenance sidecars), running "
    "(partial work: work folders, temporaries, Snakemake's incomplete markers, a recently written log) or pending. "
    "Per coupling shard: chunks done out of total. Per training stage: newest checkpoint step out of the "
    "iterations, last loss, samples/s and the time left."
)
STATUS_EPILOG = (
    "RUN_DIR defaults to the configuration's <results_dir>/<run_name> with --configfile, else to the only run under "
    "results/. --configfile takes several files like Snakemake's (put RUN_DIR before it). Exit codes: 0 = status "
    "printed; 2 = no run found or several (listed), or an unreadable --configfile."
)


class StatusError(Exception):
    """A usage problem: no run, several runs, an unreadable config file (exit code 2)."""


# ----------------------------------------------------------------------------------------------
# Small file helpers (read-only).


def _now() -> float:
    return time.time()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _done(path: Path) -> bool:
    """An output is done when it exists with its provenance sidecar."""
    return path.exists() and provenance.sidecar_path(path).is_file()


def _temporaries(path: Path) -> list[Path]:
    """Temporaries of an output being written: `fileio.atomic_path`'s ``.<name>.tmp<pid>`` and the
    shard stores' ``.<name>.tmp-<pid>-<uuid>`` siblings."""
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return []
    prefix = f".{path.name}.tmp"
    return [path.parent / e for e in sorted(entries) if e.startswith(prefix)]


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _dig(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


# ----------------------------------------------------------------------------------------------
# Finding the run and its configuration.


def _looks_like_run(path: Path) -> bool:
    return path.is_dir() and any((path / e).exists() for e in RUN_ENTRIES)


def runs_under(results: Path) -> list[Path]:
    try:
        return sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def resolve_run_dir(run_dir: str | None, cfg: dict | None, results: Path = Path("results")) -> Path:
    """The run folder to report on (StatusError when there is none, or several to choose from)."""
    if run_dir is not None:
        path = Path(run_dir)
        if not path.is_dir():
            raise StatusError(f"{path}: no such run folder")
        if not _looks_like_run(path):
            inner = [p for p in runs_under(path) if _looks_like_run(p)]
            if inner:
                raise StatusError(f"{path} holds runs, not a run; name one: " + ", ".join(str(p) for p in inner))
        return path
    if cfg is not None:
        return Path(cfg["results_dir"]) / cfg["run_name"]
    found = runs_under(results)
    if not found:
        raise StatusError(f"no run under {results}/ (give RUN_DIR, or run this where the workflow runs)")
    if len(found) > 1:
        raise StatusError(f"several runs under {results}/; name one: " + ", ".join(str(p) for p in found))
    return found[0]


def config_sources(files: list[str | Path]) -> list[Path]:
    """The files a Snakemake run given `--configfile files` reads: config.yaml first, each once."""
    sources = [REPO_CONFIG] if REPO_CONFIG.is_file() else []
    for f in map(Path, files):
        if not (f.exists() and any(f.samefile(s) for s in sources if s.exists())):
            sources.append(f)
    return sources


def load_config(files: list[str | Path]) -> dict:
    """The repository's config.yaml merged with `files` (later ones win), validated: the complete
    config as Snakemake's rules see it (`config.validate`). StatusError on an unreadable file."""
    import yaml

    from . import config as config_mod

    merged: dict = {}
    for f in config_sources(files):
        try:
            data = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise StatusError(f"--configfile {f}: cannot read it: {e}") from e
        if not isinstance(data, dict):
            raise StatusError(f"--configfile {f}: not a mapping of config keys")
        merged = config_mod.merge(merged, data)
    try:
        return config_mod.validate(merged)
    except config_mod.ConfigError as e:
        raise StatusError(str(e)) from e


# ----------------------------------------------------------------------------------------------
# Snakemake's own records: incomplete markers, locks, its newest log.


def find_workdir(run_dir: Path) -> Path | None:
    """The Snakemake working directory of a run: the nearest folder above it with `.snakemake/`."""
    for d in [run_dir.resolve(), *run_dir.resolve().parents]:
        if (d / ".snakemake").is_dir():
            return d
    return None


def decode_marker(incomplete_dir: Path, marker: Path) -> str | None:
    """The output path that a `.snakemake/incomplete` marker stands for (Snakemake stores each as
    the urlsafe base64 of the path, split into '@'-prefixed folders when longer than a file name)."""
    parts = marker.relative_to(incomplete_dir).parts
    encoded = "".join(p.removeprefix("@") for p in parts)
    try:
        return base64.urlsafe_b64decode(encoded.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class SnakemakeState:
    workdir: Path
    incomplete: list[str] = field(default_factory=list)  # run-relative posix paths
    incomplete_mtime: dict[str, float] = field(default_factory=dict)
    locked: bool = False
    log: Path | None = None
    log_text: str = ""

    def to_dict(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"workdir": str(self.workdir), "locked": self.locked, "incomplete": self.incomplete}
        out.update(self.log_summary(now))
        return out

    def log_summary(self, now: float) -> dict[str, Any]:
        if self.log is None:
            return {"log": None}
        text = self.log_text
        progress = _PROGRESS_RE.findall(text)
        if "Nothing to be done" in text:
            outcome = "nothing to do"
        elif "Exiting because a job execution failed" in text or re.search(r"^Error in rule ", text, re.MULTILINE):
            outcome = "failed" if "Complete log" in text else "job failed, other jobs still running"
        elif "Complete log" in text:
            outcome = "finished"
        elif self.locked:
            outcome = "running (or killed: its locks remain)"
        else:
            outcome = "interrupted"
        mtime = _mtime(self.log)
        return {
            "log": str(self.log),
            "steps_done": int(progress[-1][0]) if progress else 0,
            "steps_total": int(progress[-1][1]) if progress else None,
            "outcome": outcome,
            "log_age_s": None if mtime is None else now - mtime,
        }

    def config_files(self) -> tuple[list[str], bool]:
        """(config files named in the log, whether --config overrides were given too)."""
        files: list[str] = []
        for line in self.log_text.splitlines():
            if line.strip().startswith("Config file(s):"):
                files = re.findall(r"'([^']*)'", line)
                break
        command = next((line for line in self.log_text.splitlines() if line.strip().startswith("Command:")), "")
        overrides = re.search(r"\s(--config|-C)(\s|=)", command) is not None
        return [str(self.workdir / f) if not os.path.isabs(f) else f for f in files], overrides


def snakemake_state(run_dir: Path) -> SnakemakeState | None:
    workdir = find_workdir(run_dir)
    if workdir is None:
        return None
    smk, run = workdir / ".snakemake", run_dir.resolve()
    state = SnakemakeState(workdir=workdir)
    incomplete = smk / "incomplete"
    if incomplete.is_dir():
        for root, _, files in os.walk(incomplete):
            for name in files:
                if name == "migration_underway":
                    continue
                marker = Path(root) / name
                target = decode_marker(incomplete, marker)
                if target is None:
                    continue
                path = Path(target) if os.path.isabs(target) else workdir / target
                try:
                    rel = path.resolve().relative_to(run).as_posix()
                except ValueError:  # another run's output
                    continue
                state.incomplete.append(rel)
                state.incomplete_mtime[rel] = _mtime(marker) or 0.0
        state.incomplete.sort()
    run_rel = _relative_to(run, workdir)
    for lock in sorted((smk / "locks").glob("*.lock")) if (smk / "locks").is_dir() else []:
        try:
            text = lock.read_text()
        except OSError:
            continue
        if run_rel in text or str(run) in text:
            state.locked = True
    logs = sorted((smk / "log").glob("*.snakemake.log")) if (smk / "log").is_dir() else []
    for log in reversed(logs):  # the newest log that is about this run
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        if f"{run_rel}/" in text or f"{run}/" in text:
            state.log, state.log_text = log, text
            break
    return state


def _relative_to(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def discover_config(run_dir: Path, smk: SnakemakeState | None) -> tuple[dict | None, str]:
    """The run's configuration when none is given: from the config files of Snakemake's newest log
    of this run, else config.yaml alone when its run_name is this run's. (config, where it came from)."""
    if smk is not None and smk.log is not None:
        files, overrides = smk.config_files()
        if files and all(Path(f).is_file() for f in files):
            try:
                cfg = load_config(files)
            except StatusError:
                cfg = None
            if cfg is not None and cfg["run_name"] == run_dir.name:
                names = " + ".join(Path(f).name for f in files)
                note = "; plus --config overrides not seen here" if overrides else ""
                return cfg, f"{names} (from Snakemake's log {smk.log.name}{note})"
    if REPO_CONFIG.is_file():
        try:
            cfg = load_config([])
        except StatusError:
            return None, "none"
        if cfg["run_name"] == run_dir.name:
            return cfg, f"{REPO_CONFIG.name} (its run_name is this run's)"
    return None, "none (iterations come from sidecars and logs; pass --configfile for more)"


# ----------------------------------------------------------------------------------------------
# Rule logs.


@dataclass
class LogInfo:
    path: Path
    age_s: float | None
    outcome: str | None  # "finished", "failed" or None (in progress, or killed) for the last attempt
    last_attempt: str


def read_log(path: Path, now: float) -> LogInfo | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    last = text[text.rfind(_ATTEMPT):] if _ATTEMPT in text else text
    if re.search(r"INFO remeanflow: rule \S+ finished in", last):
        outcome = "finished"
    elif re.search(r"remeanflow: rule \S+ failed", last):
        outcome = "failed"
    else:
        outcome = None
    mtime = _mtime(path)
    return LogInfo(path=path, age_s=None if mtime is None else now - mtime, outcome=outcome, last_attempt=last)


def logged_iterations(log: LogInfo | None, stage: int) -> int | None:
    """The iterations that the latest attempt of a training job announced when it started."""
    if log is None:
        return None
    found = None
    for m in re.finditer(rf"stage {stage}: (?:training from the start for (\d+) steps|resuming from .* at step \d+ of "
                         rf"(\d+))", log.last_attempt):
        found = int(m.group(1) or m.group(2))
    return found


# ----------------------------------------------------------------------------------------------
# Context shared by the stage checks.


@dataclass
class Context:
    run: Path
    cfg: dict | None
    smk: SnakemakeState | None
    now: float

    def rel(self, path: Path) -> str:
        return _relative_to(path, self.run)

    def markers(self, prefixes: list[str]) -> list[str]:
        """Incomplete markers on paths equal to or under one of the run-relative `prefixes`."""
        if self.smk is None:
            return []
        return [m for m in self.smk.incomplete if any(m == p or m.startswith(p.rstrip("/") + "/") for p in prefixes)]

    def logs(self, patterns: list[str]) -> list[LogInfo]:
        out = []
        for pattern in patterns:
            for p in sorted((self.run / "logs").glob(pattern)):
                if p.name.endswith(".history"):
                    continue
                info = read_log(p, self.now)
                if info is not None:
                    out.append(info)
        return out


def make_stage(ctx: Context, key: str, name: str, outputs: list[str], *, prefixes: list[str], logs: list[str],
               evidence: list[tuple[str, Path]] = (), detail: str = "", notes: list[str] = ()) -> dict[str, Any]:
    """State of one stage from its outputs, Snakemake's markers, its logs and `evidence` (what the
    caller found of its partial work: (description, path))."""
    outs = [ctx.run / o for o in outputs]
    missing = [ctx.rel(o) for o in outs if not _done(o)]
    found: list[tuple[str, Path | None]] = list(evidence)
    notes = list(notes)
    for o in outs:
        if o.exists() and not provenance.sidecar_path(o).is_file():
            found.append((f"{ctx.rel(o)} written, its sidecar not yet", o))
        for t in _temporaries(o):
            found.append((f"temporary {ctx.rel(t)}", t))
    marked = ctx.markers(prefixes)
    if marked:
        found.append((f"Snakemake marks {len(marked)} output(s) incomplete (a job started and has not finished)", None))
    log_infos = ctx.logs(logs)
    for info in log_infos:
        if info.outcome == "failed" and missing:
            notes.append(f"the last attempt in {ctx.rel(info.path)} failed {format_duration(info.age_s)} ago")
        elif info.outcome is None and info.age_s is not None and info.age_s < RECENT_LOG_S and missing:
            found.append((f"log {ctx.rel(info.path)} written {format_duration(info.age_s)} ago", info.path))
    done_some = len(missing) < len(outs)
    if not missing and not marked:
        state, found = "done", []  # what is left of its work does not matter any more
    elif found or done_some:
        state = "running"
    else:
        state = "pending"
    times = [_mtime(p) for _, p in found if p is not None]
    times += [ctx.smk.incomplete_mtime.get(m, 0.0) for m in marked] if ctx.smk is not None else []
    times = [t for t in times if t]
    age = ctx.now - max(times) if times and state == "running" else None
    if age is not None and age > IDLE_S:
        notes.append(f"no update for {format_duration(age)}: killed or stalled? (Snakemake resumes it)")
    return {
        "key": key, "name": name, "state": state, "detail": detail,
        "outputs": [ctx.rel(o) for o in outs], "missing": missing,
        "evidence": [text for text, _ in found], "updated_age_s": age, "notes": notes,
    }


# ----------------------------------------------------------------------------------------------
# Stages.


def _count_done(paths: list[Path]) -> int:
    return sum(_done(p) for p in paths)


def dataset_stage(ctx: Context) -> dict[str, Any]:
    run, cfg = ctx.run, ctx.cfg
    parts = sorted((run / "data" / "parts").glob("part-*.zarr"))
    total = _dig(cfg, "dataset", "preprocess_shards")
    if total is not None:
        parts = [run / "data" / "parts" / f"part-{k:05d}.zarr" for k in range(total)]
    done_parts = _count_done(parts)
    evidence: list[tuple[str, Path]] = []
    for folder in ("source", "data/raw", "data/parts"):
        for p in sorted((run / folder).glob("*")) if (run / folder).is_dir() else []:
            if not p.name.endswith(".provenance.json"):
                evidence.append((f"{ctx.rel(p)}", p))
    detail = f"parts {done_parts}/{total if total is not None else len(parts)}" if parts else ""
    return make_stage(ctx, "dataset", "dataset", ["data/images.zarr", "data/labels.csv"],
                      prefixes=["source", "data"], logs=["toy_source.log", "download_dataset.log",
                                                         "preprocess_shard/*.log", "preprocess_merge.log"],
                      evidence=evidence, detail=detail)


def teacher_stage(ctx: Context) -> dict[str, Any]:
    mode = _dig(ctx.cfg, "teacher", "mode")
    outputs = ["teacher/net.pt", "teacher/guide.pt"]
    if mode == "train":
        outputs.append("teacher/metrics.csv")
    elif mode == "fetch":
        outputs += ["teacher/raw/main.pkl", "teacher/raw/guide.pkl"]
    evidence = [(ctx.rel(p), p) for p in sorted((ctx.run / "teacher" / "raw").glob("*"))
                if not p.name.endswith(".provenance.json")]
    return make_stage(ctx, "teacher", "teacher", outputs, prefixes=["teacher"],
                      logs=["train_teacher.log", "fetch_teacher.log"], evidence=evidence)


def index_stage(ctx: Context) -> dict[str, Any]:
    return make_stage(ctx, "reflow_index", "reflow index", ["reflow/index.zarr"], prefixes=["reflow/index.zarr"],
                      logs=["reflow_index.log"])


def shard_status(ctx: Context) -> tuple[list[dict[str, Any]], int | None]:
    """Per coupling shard: where it is, chunks done / total (completion mask), state; and the
    number of shards (config, else the stores' attributes, else None)."""
    couplings_dir, work_dir = ctx.run / "reflow" / "couplings", ctx.run / "reflow" / "work"
    # published stores first: a work store of the same shard (a rerun in progress) replaces it below
    stores = [("couplings", s) for s in sorted(couplings_dir.glob("shard-*.zarr"))]
    stores += [("work", s) for s in sorted(work_dir.glob("shard-*.zarr"))]
    num_shards = _dig(ctx.cfg, "couplings", "num_shards")
    chunk = _dig(ctx.cfg, "couplings", "batch")
    if not stores and num_shards is None:
        return [], None
    from . import couplings  # imports torch: only when there are shards to look at

    attrs_seen: dict | None = None
    rows: dict[int, dict[str, Any]] = {}
    for where, store in stores:
        m = re.fullmatch(r"shard-(\d+)\.zarr", store.name)
        if not m:
            continue
        k = int(m.group(1))
        published = where == "couplings"
        if published and not _done(store):
            where = "couplings (no sidecar yet)"
        row: dict[str, Any] = {"shard": k, "where": where, "path": ctx.rel(store), "chunks_done": None,
                               "chunks_total": None, "error": None}
        try:
            attrs = couplings.read_shard_attrs(store)
            mask = couplings.completion_mask(store)
            row["chunks_done"], row["chunks_total"] = int(mask.sum()), int(attrs["num_chunks"])
            attrs_seen = attrs_seen or attrs
        except Exception as e:  # a damaged or half-created store: say so, keep going
            row["error"] = f"{type(e).__name__}: {e}"
        mtime = _mtime(_store_progress_path(store))
        row["updated_age_s"] = None if mtime is None else ctx.now - mtime
        rows[k] = row
    if num_shards is None and attrs_seen is not None:
        num_shards = int(attrs_seen["num_shards"])
    if chunk is None and attrs_seen is not None:
        chunk = int(attrs_seen["chunk"])
    n_samples = _index_size(ctx.run / "reflow" / "index.zarr")
    out = []
    for k in range(max([num_shards or 0, *(r + 1 for r in rows)])):
        row = rows.get(k) or {"shard": k, "where": "-", "path": None, "chunks_done": 0, "chunks_total": None,
                              "error": None, "updated_age_s": None}
        if row["chunks_total"] is None and None not in (n_samples, num_shards, chunk) and k < num_shards:
            try:
                start, stop = couplings.shard_range(n_samples, k, num_shards, chunk)
                row["chunks_total"] = -(-(stop - start) // chunk)
            except ValueError:
                pass
        marked = ctx.markers([f"reflow/couplings/shard-{k:05d}.zarr"])
        if row["where"] == "couplings" and not marked:
            row["state"] = "done"
        elif row["where"] != "-" or marked:
            row["state"] = "running"
        else:
            row["state"] = "pending"
        out.append(row)
    return out, num_shards


def _store_progress_path(store: Path) -> Path:
    """What changes when a chunk of a shard store is marked done: the folder of the mask's chunk files."""
    marks = store / "done" / "c"
    return marks if marks.is_dir() else store


def _index_size(index: Path) -> int | None:
    if not _done(index):
        return None
    try:
        import zarr

        return int(zarr.open_group(str(index), mode="r", zarr_format=3).attrs["N"])
    except Exception:  # no readable index: the totals of pending shards stay unknown
        return None


def couplings_stage(ctx: Context, shards: list[dict[str, Any]], num_shards: int | None) -> dict[str, Any]:
    n = num_shards if num_shards is not None else len(shards)
    outputs = [f"reflow/couplings/shard-{k:05d}.zarr" for k in range(n)]
    evidence = [(f"work store {r['path']} ({r['chunks_done']} chunks done)", _store_progress_path(ctx.run / r["path"]))
                for r in shards if r["where"] == "work"]
    detail = ""
    if shards:
        done = sum(r["state"] == "done" for r in shards)
        chunks_done = sum(r["chunks_done"] or 0 for r in shards)
        totals = [r["chunks_total"] for r in shards]
        total = str(sum(totals)) if None not in totals else "?"
        detail = f"shards {done}/{n}, chunks {chunks_done}/{total}"
    stage = make_stage(ctx, "couplings", "couplings", outputs, prefixes=["reflow/couplings"],
                       logs=["couplings_shard/*.log"], evidence=evidence, detail=detail)
    if n == 0 and stage["state"] == "done":  # shard count unknown and nothing on disk
        stage["state"] = "pending"
    return stage


def merge_stage(ctx: Context) -> dict[str, Any]:
    return make_stage(ctx, "couplings_merge", "coupling merge", ["reflow/manifest.json"],
                      prefixes=["reflow/manifest.json"], logs=["couplings_merge.log"])


def time_embedding_stage(ctx: Context) -> dict[str, Any]:
    return make_stage(ctx, "time_embedding", "time embedding", ["time_emb/net.pt", "time_emb/fit.json"],
                      prefixes=["time_emb"], logs=["init_time_embedding.log"])


# ----------------------------------------------------------------------------------------------
# Training.


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV (`train_state.METRICS_COLUMNS`); a line being written is skipped."""
    rows: list[dict[str, float]] = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    rows.append({k: float(v) for k, v in row.items() if k is not None})
                except (TypeError, ValueError):
                    continue
    except OSError:
        return []
    return [r for r in rows if "step" in r]


def checkpoint_steps(work: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in a training work folder, newest first."""
    found = [(int(m.group(1)), p) for p in work.glob("ckpt-*.pt") if (m := _CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _checkpoint_config(path: Path) -> dict | None:
    """The `config` of a training checkpoint (memory-mapped, weights only: nothing runs, little is read)."""
    try:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a checkpoint being written or damaged: no batch size from it
        return None
    return obj.get("config") if isinstance(obj, dict) else None


def training_status(ctx: Context, stage: str) -> dict[str, Any]:
    n = int(stage[-1])
    out_dir, work = ctx.run / "train" / stage, ctx.run / "train" / "work" / stage
    outputs = [out_dir / f for f in ("train_state.pt", "net_ema.pt", "metrics.csv")]
    finished = all(_done(o) for o in outputs)
    sidecar = provenance.read(out_dir / "metrics.csv") if _done(out_dir / "metrics.csv") else None
    ckpts = checkpoint_steps(work) if work.is_dir() else []
    live = work / "metrics.csv"
    rows = read_metrics(out_dir / "metrics.csv") if finished else read_metrics(live)
    log = next(iter(ctx.logs([f"train_{stage}.log"])), None)
    notes: list[str] = []

    cfg_iterations = _dig(ctx.cfg, "train", stage, "iterations")
    iterations, source = None, None
    if finished and _dig(sidecar, "config", "train", stage, "iterations") is not None:
        iterations, source = int(sidecar["config"]["train"][stage]["iterations"]), "sidecar"
    elif finished and rows:
        iterations, source = int(rows[-1]["step"]), "metrics.csv"
    elif logged_iterations(log, n) is not None:
        iterations, source = logged_iterations(log, n), "log"
    elif cfg_iterations is not None:
        iterations, source = int(cfg_iterations), "config"
    if cfg_iterations is not None and iterations is not None and int(cfg_iterations) != iterations:
        if finished:
            notes.append(f"the configuration now asks for {cfg_iterations} iterations: the next Snakemake run "
                         "extends or retrains this stage")
        else:
            notes.append(f"the configuration says {cfg_iterations} iterations, the job's log {iterations}")

    step = int(rows[-1]["step"]) if rows else (ckpts[0][0] if ckpts else None)
    recent = [r for r in rows[-RECENT_ROWS:] if r.get("samples_per_s", 0) > 0]
    samples_per_s = sum(r["samples_per_s"] for r in recent) / len(recent) if recent else None

    batch_size, batch_source = _dig(ctx.cfg, "train", "batch_size"), "config"
    for s in TRAIN_STAGES:
        if batch_size is None:
            batch_size, batch_source = _dig(provenance.read(ctx.run / "train" / s / "metrics.csv"),
                                            "config", "train", "batch_size"), "sidecar"
    step_s, step_source = None, None
    if batch_size and recent:
        step_s, step_source = sum(batch_size / r["samples_per_s"] for r in recent) / len(recent), "samples/s"
    elif recent and ckpts:
        cfg = _checkpoint_config(ckpts[0][1])
        if cfg and cfg.get("batch_size"):
            batch_size, batch_source = cfg["batch_size"], "checkpoint"
            step_s, step_source = sum(batch_size / r["samples_per_s"] for r in recent) / len(recent), "samples/s"
    if step_s is None and len(ckpts) >= 2:  # wall clock between the two newest checkpoints
        (s1, p1), (s0, p0) = ckpts[0], ckpts[1]
        t1, t0 = _mtime(p1), _mtime(p0)
        if t1 and t0 and s1 > s0 and t1 > t0:
            step_s, step_source = (t1 - t0) / (s1 - s0), "checkpoint times"

    remaining = None if iterations is None or step is None else max(iterations - step, 0)
    if finished:
        remaining = 0
    eta = None if remaining is None or step_s is None else remaining * step_s
    if remaining is None and not finished and step is not None:
        notes.append("iterations unknown (pass --configfile)")

    evidence: list[tuple[str, Path]] = []
    if not finished:
        if ckpts:
            evidence.append((f"checkpoint {ctx.rel(ckpts[0][1])}", ckpts[0][1]))
        if live.is_file():
            evidence.append((f"live {ctx.rel(live)} ({len(rows)} rows)", live))
    detail = _training_detail(step, iterations, ckpts, finished)
    stage_row = make_stage(ctx, stage, f"stage {n}", [f"train/{stage}/{o.name}" for o in outputs],
                           prefixes=[f"train/{stage}"], logs=[f"train_{stage}.log"], evidence=evidence,
                           detail=detail, notes=notes)
    last = rows[-1] if rows else {}
    stage_row["training"] = {
        "stage": stage, "state": stage_row["state"], "step": step,
        "checkpoint_step": ckpts[0][0] if ckpts else None,
        "checkpoint": ctx.rel(ckpts[0][1]) if ckpts else None,
        "iterations": iterations, "iterations_source": source,
        "last_loss": last.get("loss"), "last_mse": last.get("mse"),
        "samples_per_s": samples_per_s, "batch_size": batch_size, "batch_size_source": batch_source if batch_size else None,
        "step_s": step_s, "step_time_source": step_source,
        "remaining_steps": remaining, "eta_s": eta,
        "metrics": ctx.rel(out_dir / "metrics.csv") if finished else (ctx.rel(live) if live.is_file() else None),
        "rows": len(rows),
    }
    return stage_row


def _training_detail(step, iterations, ckpts, finished) -> str:
    if step is None:
        return ""
    total = "?" if iterations is None else str(iterations)
    text = f"step {step}/{total}"
    if ckpts and not finished:
        text += f", checkpoint {ckpts[0][0]}"
    return text


# ----------------------------------------------------------------------------------------------
# Evaluation and report.


def eval_inputs_stage(ctx: Context) -> dict[str, Any]:
    outputs = ["eval/heldout.npz", "fid/pixel_stats.npz"]
    weights = _dig(ctx.cfg, "evaluate", "inception", "weights")
    fid = weights is not None if ctx.cfg is not None else (
        (ctx.run / "fid" / "ref_stats.npz").exists() or (ctx.run / "logs" / "fid_reference_stats.log").exists())
    if fid:
        outputs += ["fid/ref_stats.npz"]
        if weights is not None or (ctx.run / "fid" / "inception.pth").exists():
            outputs += ["fid/inception.pth"]
    return make_stage(ctx, "eval_inputs", "eval inputs", outputs, prefixes=["eval/heldout.npz", "fid"],
                      logs=["heldout_couplings.log", "pixel_reference_stats.log", "fid_reference_stats.log",
                            "fetch_inception.log"])


def eval_stage(ctx: Context, name: str) -> dict[str, Any]:
    shards_dir = ctx.run / "eval" / name / "shards"
    total = _dig(ctx.cfg, "evaluate", "shards")
    found = sorted(shards_dir.glob("shard-*.npz"))
    done = sum(_done(p) for p in found)
    evidence = [(f"evaluation shard {ctx.rel(p)}", p) for p in found]
    detail = f"shards {done}/{total if total is not None else '?'}" if found or total else ""
    return make_stage(ctx, f"eval_{name}", f"eval {name}", [f"eval/{name}/metrics.json", f"eval/{name}/samples.png"],
                      prefixes=[f"eval/{name}"], logs=[f"evaluate/{name}/*.log"], evidence=evidence, detail=detail)


def eval_names(run: Path) -> list[str]:
    """stage1, stage2 and any evaluated snapshot (eval/stage1-step00000100/)."""
    extra = sorted(p.name for p in (run / "eval").glob("stage*") if p.is_dir() and _EVAL_NAME_RE.match(p.name))
    return list(TRAIN_STAGES) + [n for n in extra if n not in TRAIN_STAGES]


def report_stage(ctx: Context) -> dict[str, Any]:
    figures = [ctx.run / "report" / "figures" / s / f for s in TRAIN_STAGES for f in ("training.png", "samples.png")]
    evidence = [(f"figure {ctx.rel(p)}", p) for p in figures if p.exists()]
    detail = f"stage figures {sum(_done(p) for p in figures)}/{len(figures)}" if evidence else ""
    return make_stage(ctx, "report", "report", ["report/index.html", "report/figures/teacher_loss.png",
                                                "report/figures/coupling_distances.png"],
                      prefixes=["report"], logs=["report_stage/*.log", "report.log"], evidence=evidence, detail=detail)


# ----------------------------------------------------------------------------------------------
# The whole status.


# What each stage reads (rules/*.smk), by stage key; evaluations of snapshots read like eval_stageN.
UPSTREAM = {
    "teacher": ("dataset",), "reflow_index": ("dataset",), "couplings": ("reflow_index", "teacher"),
    "couplings_merge": ("couplings",), "time_embedding": ("teacher",),
    "stage1": ("couplings_merge", "time_embedding"), "stage2": ("stage1",), "eval_inputs": ("teacher",),
    "eval_stage1": ("stage1", "eval_inputs", "time_embedding"), "eval_stage2": ("stage2", "eval_inputs", "time_embedding"),
    "report": ("eval_stage1", "eval_stage2"),
}


def _upstream(key: str) -> list[str]:
    """Every stage that `key` depends on, directly or not."""
    if key not in UPSTREAM and key.startswith("eval_stage"):  # eval_stage1-step00000100
        key = key.split("-step")[0]
    seen: list[str] = []
    todo = list(UPSTREAM.get(key, ()))
    while todo:
        k = todo.pop(0)
        if k not in seen:
            seen.append(k)
            todo += UPSTREAM.get(k, ())
    return seen


def _note_upstream(stages: list[dict[str, Any]]) -> None:
    """A done stage whose inputs are being remade (an upstream stage not done) will be rerun."""
    by_key = {s["key"]: s for s in stages}
    for s in stages:
        if s["state"] != "done":
            continue
        upstream = set(_upstream(s["key"]))
        behind = [u["name"] for u in stages if u["key"] in upstream and by_key[u["key"]]["state"] != "done"]
        if behind:
            s["notes"].append(f"upstream not done ({', '.join(behind)}): will likely be rerun")


def collect(run_dir, cfg: dict | None = None, config_source: str | None = None, now: float | None = None) -> dict:
    """Everything `status` reports, as JSON-ready values. `cfg`: a validated config (or None: the
    run's configuration is looked for as the module docstring says)."""
    run = Path(run_dir)
    now = _now() if now is None else now
    smk = snakemake_state(run)
    if cfg is None:
        cfg, config_source = discover_config(run, smk)
    elif config_source is None:
        config_source = "given"
    ctx = Context(run=run, cfg=cfg, smk=smk, now=now)
    shards, num_shards = shard_status(ctx)
    stages = [dataset_stage(ctx), teacher_stage(ctx), index_stage(ctx), couplings_stage(ctx, shards, num_shards),
              merge_stage(ctx), time_embedding_stage(ctx)]
    stages += [training_status(ctx, s) for s in TRAIN_STAGES]
    stages.append(eval_inputs_stage(ctx))
    stages += [eval_stage(ctx, name) for name in eval_names(run)]
    stages.append(report_stage(ctx))
    training = [s.pop("training") for s in stages if "training" in s]
    _note_upstream(stages)
    counts = {state: sum(s["state"] == state for s in stages) for state in STATES}
    return {
        "run_dir": str(run),
        "checked_at": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config_source,
        "snakemake": None if smk is None else smk.to_dict(now),
        "summary": counts,
        "complete": counts["done"] == len(stages),
        "stages": stages,
        "shards": shards,
        "training": training,
    }


# ----------------------------------------------------------------------------------------------
# Text output.


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def format_text(status: dict) -> str:
    lines = [f"run: {status['run_dir']}  (checked {status['checked_at']})", f"config: {status['config']}"]
    smk = status["snakemake"]
    if smk is None:
        lines.append("snakemake: no .snakemake folder above the run")
    else:
        text = f"snakemake: {'locks held' if smk['locked'] else 'no locks held'}"
        if smk.get("log"):
            total = "?" if smk["steps_total"] is None else smk["steps_total"]
            text += (f"; last run {Path(smk['log']).name}: {smk['steps_done']} of {total} jobs done, "
                     f"{smk['outcome']}, log written {format_duration(smk['log_age_s'])} ago")
        if smk["incomplete"]:
            text += f"; {len(smk['incomplete'])} output(s) marked incomplete"
        lines.append(text)
    c = status["summary"]
    lines.append(f"stages: {c['done']} done, {c['running']} running, {c['pending']} pending"
                 + ("  (complete)" if status["complete"] else ""))
    lines.append("")
    rows = []
    for s in status["stages"]:
        extra = [s["detail"]] if s["detail"] else []
        if s["state"] == "running" and s["updated_age_s"] is not None and s["updated_age_s"] <= IDLE_S:
            extra.append(f"updated {format_duration(s['updated_age_s'])} ago")
        extra += s["notes"]
        rows.append([s["name"], s["state"], "; ".join(extra)])
    lines.append(table(["STAGE", "STATE", "DETAIL"], rows))

    shards = status["shards"]
    if shards:
        shown = shards if len(shards) <= MAX_SHARD_ROWS else [r for r in shards if r["state"] != "done"]
        lines += ["", "coupling shards" + ("" if shown is shards else
                                          f" (not done; {len(shards) - len(shown)} of {len(shards)} done)")]
        srows = []
        for r in shown:
            total = "?" if r["chunks_total"] is None else r["chunks_total"]
            done = "?" if r["chunks_done"] is None else r["chunks_done"]
            note = r["error"] or (f"updated {format_duration(r['updated_age_s'])} ago"
                                  if r["state"] == "running" and r.get("updated_age_s") is not None else "")
            srows.append([f"{r['shard']:05d}", r["state"], f"{done}/{total}", r["where"], note])
        if srows:
            lines.append(table(["SHARD", "STATE", "CHUNKS", "WHERE", "NOTE"], srows))

    lines += ["", "training"]
    trows = []
    for t in status["training"]:
        its = "unknown" if t["iterations"] is None else f"{t['iterations']} ({t['iterations_source']})"
        eta = "-" if t["state"] == "done" else (format_duration(t["eta_s"]) if t["eta_s"] is not None else "?")
        trows.append([t["stage"], t["state"], "-" if t["step"] is None else t["step"],
                      "-" if t["checkpoint_step"] is None else t["checkpoint_step"], its, _fmt(t["last_loss"]),
                      _fmt(t["samples_per_s"], 3), eta])
    lines.append(table(["STAGE", "STATE", "STEP", "CHECKPOINT", "ITERATIONS", "LOSS", "SAMPLES/S", "TIME LEFT"], trows))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.


def run_status(args) -> int:
    try:
        cfg, source = None, None
        if args.configfile:
            cfg = load_config(args.configfile)
            source = " + ".join(str(f) for f in config_sources(args.configfile))
        run = resolve_run_dir(args.run_dir, cfg)
    except StatusError as e:
        print(f"remeanflow status: {e}", file=sys.stderr)
        return 2
    if cfg is not None and cfg["run_name"] != run.name:
        source += f" (its run_name is {cfg['run_name']!r}, not this run's {run.name!r})"
    status = collect(run, cfg, source)
    try:
        print(json.dumps(status, indent=2) if args.json else format_text(status))
        sys.stdout.flush()
    except BrokenPipeError:  # `status | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _split_run_dir(args) -> None:
    """`status --configfile a.yaml RUN_DIR`: --configfile took RUN_DIR too (it takes several values,
    like Snakemake's); a folder among its values is the run folder."""
    if args.run_dir is None and args.configfile:
        folders = [f for f in args.configfile if Path(f).is_dir()]
        if len(folders) == 1:
            args.run_dir = folders[0]
            args.configfile = [f for f in args.configfile if f != folders[0]]


def _main(args) -> int:
    _split_run_dir(args)
    return run_status(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `status` subcommand to `python -m remeanflow` (sets `func`, which returns the exit code)."""
    p = subparsers.add_parser("status", help=STATUS_HELP, description=STATUS_DESCRIPTION, epilog=STATUS_EPILOG)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="the run folder (results/<run_name>); default: the only run under results/")
    p.add_argument("--json", action="store_true", help="machine-readable output (stages, shards, training, snakemake)")
    p.add_argument("--configfile", nargs="+", action="extend", metavar="FILE", default=[],
                   help="config files merged over the repository's config.yaml, as given to Snakemake "
                        "(for the number of iterations, shards and parts of a run in progress)")
    p.set_defaults(func=_main)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remeanflow.status")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
