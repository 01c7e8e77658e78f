"""Rule preprocess_merge: concatenate the Zarr parts into images.zarr and labels.csv."""

from remeanflow.data.preprocess import merge_shards
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    s.extra["report"] = merge_shards(list(smk.input.parts), smk.output.images, smk.output.labels,
                                     min_images_per_class=s.settings.dataset.min_images_per_class)
