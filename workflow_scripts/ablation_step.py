"""Rules ablation_* (rules/ablations.smk): one job of an ablation variant, run by the main pipeline's
own workflow script (`params.main`), so that no variant has a code path of its own.

The script sees the variant's configuration, the base config merged with the variant's overlay
(`params.overlay`: a file under presets/ablations/, read again here, or the reference sampler's
overlay itself) and validated as every config is (`config.validate`; the same merge as
`ablations.variant_config`), and `params.variant` as its `params.step`: the settings the job's rule
gets under the variant and the main script's code version, which its provenance sidecars record.
Everything else (inputs, outputs, log, wildcards, threads, resources) is the job's own.

Imports stay minimal on purpose: this script's code version enters every ablation job.
"""

import runpy
from pathlib import Path

import yaml

from remeanflow import config as rmf_config


class _Override:
    """`base` with some attributes replaced; every other attribute is the base's."""

    def __init__(self, base, **attrs):
        self.__dict__.update(attrs, _base=base)

    def __getattr__(self, name):
        return getattr(self._base, name)


smk = snakemake  # noqa: F821
checkout = Path(smk.scriptdir).parent
overlay = smk.params.overlay
if isinstance(overlay, str):
    overlay = yaml.safe_load((checkout / overlay).read_text()) or {}
job = _Override(smk, config=rmf_config.validate(rmf_config.merge(smk.config, overlay)),
                params=_Override(smk.params, step=smk.params.variant))
runpy.run_path(str(Path(smk.scriptdir) / f"{smk.params.main}.py"), init_globals={"snakemake": job},
               run_name="__main__")
