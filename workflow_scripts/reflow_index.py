"""Rule reflow_index: the (sample id, class) list the couplings are generated for."""

import zarr

from remeanflow.couplings import shard_range
from remeanflow.reflow_index import build_index
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    group = zarr.open_group(smk.input.images, mode="r")
    c = s.settings.couplings
    s.seeds["index"] = s.settings.seed
    # The number of couplings is known from here on: check the sharding before any teacher runs
    # (this rule has a higher priority than the teacher's).
    total = c.passes * group["labels"].shape[0] if c.index_mode == "imagenet" else c.num_samples
    try:
        shard_range(total, 0, c.num_shards, c.batch)
    except ValueError as e:
        raise ValueError(f"config keys couplings.num_shards / couplings.batch: {e}") from None
    s.extra["summary"] = build_index(
        smk.output[0], mode=c.index_mode, labels=group["labels"][...] if c.index_mode == "imagenet" else None,
        passes=c.passes, num_samples=c.num_samples, num_classes=len(group.attrs["synsets"]), seed=s.settings.seed,
    )
