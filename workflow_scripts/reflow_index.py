"""Rule reflow_index: the (sample id, class) list the couplings are generated for."""

import zarr

from remeanflow.reflow_index import build_index
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    group = zarr.open_group(smk.input.images, mode="r")
    c = s.settings.couplings
    s.seeds["index"] = s.settings.seed
    s.extra["summary"] = build_index(
        smk.output[0], mode=c.index_mode, labels=group["labels"][...] if c.index_mode == "imagenet" else None,
        passes=c.passes, num_samples=c.num_samples, num_classes=len(group.attrs["synsets"]), seed=s.settings.seed,
    )
