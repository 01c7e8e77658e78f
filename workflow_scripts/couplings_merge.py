"""Rule couplings_merge: verify all shards together, write the manifest and truncation threshold."""

from remeanflow.coupling_set import merge_shards
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    c = s.settings.couplings
    manifest = merge_shards(list(smk.input.shards), smk.output[0], index_store=smk.input.index,
                            quantile=c.truncation_quantile, fixed_threshold=c.fixed_threshold)
    s.extra["truncation"] = manifest["truncation"]
