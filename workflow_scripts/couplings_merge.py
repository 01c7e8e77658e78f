"""Rule couplings_merge: verify all shards together, write the manifest, truncation threshold and keep mask."""

from remeanflow.coupling_set import merge_shards
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    c = s.settings.couplings
    manifest = merge_shards(list(smk.input.shards), smk.output[0], index_store=smk.input.index,
                            quantile=c.truncation_quantile, fixed_threshold=c.fixed_threshold)
    s.extra["truncation"] = manifest["truncation"]
    # the sidecar names the mask training reads instead of the distances (the data itself stays in the manifest)
    s.extra["keep_mask"] = {k: manifest["keep_mask"][k] for k in ("count", "kept", "sha256")}
