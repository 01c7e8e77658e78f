"""Rule evaluate_shard: one-step samples of a checkpoint for one shard of the sample ids -> features."""

import torch
import zarr

from remeanflow.evaluate import sample_shard
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    cfg = s.config
    s.seeds["evaluate"] = cfg["seed"]
    weights, vae = list(smk.input.weights), list(smk.input.vae)
    s.extra["shard"] = sample_shard(
        smk.input.net, smk.output[0], shard=int(smk.wildcards.shard), num_shards=cfg["shards"],
        num_samples=cfg["fid_samples"], seed=cfg["seed"],
        num_classes=len(zarr.open_group(smk.input.images, mode="r").attrs["synsets"]), batch=cfg["batch"],
        inception_weights=weights[0] if weights else None, inception_sha256=cfg["inception_sha256"],
        vae_path=vae[0] if vae else None,
        pixel_resolution=cfg["pixel_resolution"],
    )
