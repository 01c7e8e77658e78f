"""Rule preprocess_shard: decode one class range of the archive into a Zarr part (no extraction)."""

from remeanflow.data.preprocess import preprocess_shard
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    s.extra["report"] = preprocess_shard(
        snakemake.input.archive,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        shard=int(snakemake.wildcards.shard),  # noqa: F821
        num_shards=s.config["preprocess_shards"],
        resolution=s.config["resolution"],
        workers=s.config["decode_workers"],
        max_bad_fraction=s.config["max_bad_fraction"],
    )
