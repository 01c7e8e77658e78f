# Shared helpers: config validation, typed settings, run paths, per-rule resources and params.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from remeanflow import config as rmf_config
from remeanflow import preflight as rmf_preflight
from remeanflow import settings as rmf_settings
from remeanflow.workflow import step_params

# The complete config (missing keys filled with their defaults): job scripts read it too.
_validated = rmf_config.validate(config)
config.clear()
config.update(_validated)
S = rmf_settings.load(config)

# A second Snakemake started here while another runs would first meet Snakemake's
# incomplete-files check, whose advice (--rerun-incomplete) is dangerous while the first is active.
if workflow.is_main_process and any(Path(".snakemake/locks").glob("*.lock")):
    sys.stderr.write(
        "\nremeanflow: ANOTHER SNAKEMAKE RUN IS ACTIVE in this directory (or one was killed): "
        ".snakemake/locks holds its locks. While it runs, do not use --rerun-incomplete or --unlock; "
        "wait for it. If no run is active, `snakemake --unlock` first.\n\n"
    )

RUN = f"{S.results_dir}/{S.run_name}"
PYTHON = shlex.quote(sys.executable)

# Everything the final targets need from outside the run, checked before any job (preflight.py).
if workflow.is_main_process:
    _preflight = rmf_preflight.check(S, RUN)
    if _preflight.warnings:
        sys.stderr.write(_preflight.warning_message() + "\n")
    if _preflight.problems:
        raise WorkflowError(_preflight.error_message())


wildcard_constraints:
    shard=r"\d{5}",
    stage=r"stage[12]",
    ckpt=r"stage[12](-step\d+)?",


def res(group, key):
    return getattr(S.resources_of(group), key)


def params_of(rule, script=None):
    """The rule's one params value: the settings that enter it and its script's code version."""
    return step_params(rule, script or rule, S)


def shards(n):
    return [f"{i:05d}" for i in range(n)]


def dataset_archive():
    return f"{RUN}/data/raw/{S.dataset.archive_name}"


def final_targets():
    return [f"{RUN}/reflow/manifest.json", f"{RUN}/report/index.html"] + [
        f"{RUN}/eval/{stage}/metrics.json" for stage in ("stage1", "stage2")
    ]
