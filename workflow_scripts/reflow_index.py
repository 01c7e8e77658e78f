"""Rule reflow_index: the (sample id, class) list the couplings are generated for."""

import zarr

from remeanflow.reflow_index import build_index
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    group = zarr.open_group(snakemake.input.images, mode="r")  # noqa: F821
    cfg = s.config
    s.seeds["index"] = cfg["seed"]
    s.extra["summary"] = build_index(
        snakemake.output[0], mode=cfg["index_mode"], labels=group["labels"][...] if cfg["index_mode"] == "imagenet" else None,  # noqa: F821
        passes=cfg["passes"], num_samples=cfg["num_samples"], num_classes=len(group.attrs["synsets"]), seed=cfg["seed"],
    )
