"""Rule couplings_merge: verify all shards together, write the manifest and truncation threshold."""

from remeanflow.couplings import merge_shards
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    manifest = merge_shards(
        list(snakemake.input.shards), snakemake.output[0], index_store=snakemake.input.index,  # noqa: F821
        quantile=s.config["truncation_quantile"], fixed_threshold=s.config["fixed_threshold"],
    )
    s.extra["truncation"] = manifest["truncation"]
