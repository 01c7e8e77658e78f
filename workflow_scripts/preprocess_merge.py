"""Rule preprocess_merge: concatenate the Zarr parts into images.zarr and labels.csv."""

import zarr

from remeanflow.data.preprocess import merge_shards
from remeanflow.misc import shard_range
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    c = s.settings.couplings
    # The number of couplings is known from here on (imagenet mode: passes x images): check the
    # sharding now, before the teacher or any other GPU stage runs.
    if c.index_mode == "imagenet":
        images = sum(zarr.open_group(part, mode="r")["labels"].shape[0] for part in smk.input.parts)
        try:
            shard_range(c.passes * images, 0, c.num_shards, c.batch)
        except ValueError as e:
            raise ValueError(f"config keys couplings.num_shards / couplings.batch: {e}") from None
    s.extra["report"] = merge_shards(list(smk.input.parts), smk.output.images, smk.output.labels,
                                     min_images_per_class=s.settings.dataset.min_images_per_class)
