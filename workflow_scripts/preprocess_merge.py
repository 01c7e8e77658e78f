"""Rule preprocess_merge: concatenate the Zarr parts into images.zarr and labels.csv."""

from remeanflow.data.preprocess import merge_shards
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    s.extra["report"] = merge_shards(list(snakemake.input.parts), snakemake.output.images, snakemake.output.labels)  # noqa: F821
