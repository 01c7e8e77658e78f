"""Glue between Snakemake `script:` entry points and the library.

Every workflow script is `with step(snakemake) as s: <call one library function>`. The context
manager sends logging to the rule's log file, sets the rule's thread count, gives a job with a
`gpu` resource its own GPUs on a local run (`gpus.claim`) and sets up CUDA
(`gpus.configure_cuda`), gives the script the typed settings (`s.settings`), times the step, and
on success writes a provenance sidecar for every output; on failure it writes nothing (outputs are
created atomically by the library, so Snakemake sees no complete-looking file either).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import gpus, provenance
from . import settings as settings_mod

log = logging.getLogger("remeanflow")
SCRIPTS = Path(__file__).resolve().parent.parent / "workflow_scripts"


def _named(namedlist) -> dict[str, list[str]]:
    """Snakemake Namedlist -> {name: [paths]}; unnamed entries go under 'input'."""
    out: dict[str, list[str]] = {}
    named_paths = set()
    for name, value in namedlist.items():
        paths = [str(v) for v in (value if isinstance(value, list) else [value])]
        out[name] = paths
        named_paths.update(paths)
    rest = [str(p) for p in namedlist if str(p) not in named_paths]
    if rest:
        out.setdefault("input", []).extend(rest)
    return out


def history_path(log_file) -> Path:
    """The append-only record of every attempt of a rule's log: Snakemake removes a job's log
    before it runs the job again, so a killed attempt's lines survive only here."""
    log_file = Path(log_file)
    return log_file.with_name(log_file.name + ".history")


def setup_logging(log_file=None, level=logging.INFO) -> None:
    """Log to stderr, to the rule's log file and to its append-only history (`history_path`).
    Snakemake removes a job's log before a rerun; the log then starts with the earlier attempts'
    lines from the history (a killed attempt's included), then this attempt's header. Child
    processes (accelerate ranks) write to both files too (`launch.launch_module`)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        log_file, history = Path(log_file), history_path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        header = f"===== attempt started {provenance.now()} (pid {os.getpid()}) =====\n"
        earlier = history.read_text() if history.is_file() and not log_file.exists() else ""
        with open(log_file, "a") as f:
            f.write(earlier + header)
        with open(history, "a") as f:
            f.write(header)
        handlers += [logging.FileHandler(log_file, mode="a"), logging.FileHandler(history, mode="a")]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)


@dataclass
class StepContext:
    smk: object
    settings: settings_mod.Settings  # the whole validated config, typed
    config: dict  # what enters this rule (`settings.rule_config`): recorded and hashed in the sidecars
    seeds: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def params(self):
        return self.smk.params

    @property
    def log_file(self) -> str | None:
        return str(self.smk.log[0]) if len(self.smk.log) else None

    @property
    def threads(self) -> int:
        return int(getattr(self.smk, "threads", 1) or 1)


def step_params(rule: str, script: str, settings: settings_mod.Settings) -> dict:
    """The one `params:` value of a rule: the settings that enter it and the code version of its
    script (`provenance.script_code_hash`). Snakemake reruns the rule when either changes."""
    return {
        "settings": settings_mod.rule_config(settings, rule),
        "code": provenance.script_code_hash(SCRIPTS / f"{script}.py"),
    }


def gpu_request(smk) -> int:
    """The `gpu` resource of a Snakemake job (0 when the rule has none)."""
    resources = getattr(smk, "resources", None)
    return int(resources.get("gpu", 0) or 0) if resources is not None else 0


def job_name(smk) -> str:
    wildcards = ",".join(f"{k}={v}" for k, v in smk.wildcards.items())
    return f"{smk.rule}[{wildcards}]" if wildcards else smk.rule


@contextlib.contextmanager
def step(smk, *, outputs: list[str] | None = None):
    """Run one rule's body with logging, the rule's thread count, timing and provenance.

    `outputs` limits which outputs get sidecars (default: all).
    """
    setup_logging(smk.log[0] if len(smk.log) else None)
    params = smk.params.step
    ctx = StepContext(smk=smk, settings=settings_mod.load(smk.config), config=params["settings"])
    if "torch" in sys.modules:  # the data rules' environment need not have torch
        sys.modules["torch"].set_num_threads(ctx.threads)
    started, t0 = provenance.now(), time.time()
    log.info("rule %s started; outputs: %s", smk.rule, list(smk.output))
    # The job's own GPUs (local runs; a no-op under Slurm and without GPUs), claimed before anything
    # touches CUDA, then the per-process CUDA setup.
    with gpus.claim(gpu_request(smk), job=job_name(smk)) as devices:
        if devices is not None:
            ctx.extra["gpus"] = devices
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            gpus.configure_cuda("cuda")
        try:
            yield ctx
        except Exception:
            log.exception("rule %s failed", smk.rule)
            raise
    ctx.extra.setdefault("seconds", round(time.time() - t0, 3))
    for out in outputs if outputs is not None else list(smk.output):
        provenance.write(
            out, rule=smk.rule, config=ctx.config, inputs=_named(smk.input), wildcards=dict(smk.wildcards.items()),
            seeds=ctx.seeds, started=started, rule_code_hash=params["code"], extra=ctx.extra,
        )
    log.info("rule %s finished in %.1f s", smk.rule, time.time() - t0)
