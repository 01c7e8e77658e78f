# Shared helpers: config validation, run paths, per-rule resources and code versions.
import shlex
import sys
from pathlib import Path

from remeanflow import config as rmf_config
from remeanflow import provenance as rmf_prov

rmf_config.validate(config)

RUN = f"{config['results_dir']}/{config['run_name']}"
PYTHON = shlex.quote(sys.executable)


def res(group, key):
    return rmf_config.rule_resources(config, group)[key]


def code(*modules):
    """Hash of the library modules a rule runs; a params value, so editing them reruns the rule."""
    return rmf_prov.code_hash(list(modules))


def shards(n):
    return [f"{i:05d}" for i in range(n)]


def dataset_archive():
    return f"{RUN}/data/raw/{config['dataset']['archive_name']}"


def dataset_source():
    """The toy archive (made by `toy_source`) through file://, or the configured source."""
    if config["dataset"]["toy"] is not None:
        return (
            f"file://{Path(RUN).resolve()}/source/{config['dataset']['archive_name']}"
        )
    if not config["dataset"]["source"]:
        raise ValueError(
            "config key dataset.source must be set when dataset.toy is null"
        )
    return config["dataset"]["source"]


def train_cfg(stage):
    """Config subset of one training stage: shared keys, the stage's own, and what the couplings were made with."""
    keys = [k for k in config["train"] if k not in ("stage1", "stage2", "processes")]
    return {
        **{k: config["train"][k] for k in keys},
        **config["train"][stage],
        "seed": config["seed"],
        "couplings_seed": config["seed"],
        "sampler": {
            k: config["couplings"][k]
            for k in ("heun_steps", "sigma_min", "sigma_max", "rho", "guidance")
        },
    }


def final_targets():
    return [f"{RUN}/reflow/manifest.json", f"{RUN}/report/index.html"] + [
        f"{RUN}/eval/{stage}/metrics.json" for stage in ("stage1", "stage2")
    ]
