"""Rule evaluate_shard: one-step samples of a checkpoint for one shard of the sample ids -> features."""

import zarr

from remeanflow.evaluate import sample_shard
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    ev = s.settings.evaluate
    s.seeds["evaluate"] = ev.seed
    weights, vae = list(smk.input.weights), list(smk.input.vae)
    s.extra["shard"] = sample_shard(
        smk.input.net, smk.output[0], shard=int(smk.wildcards.shard), num_shards=ev.shards,
        num_samples=ev.fid_samples, seed=ev.seed,
        num_classes=len(zarr.open_group(smk.input.images, mode="r").attrs["synsets"]), batch=ev.batch,
        inception_weights=weights[0] if weights else None, inception_sha256=ev.inception.sha256,
        vae_path=vae[0] if vae else None, vae_batch=ev.vae_batch, pixel_resolution=ev.pixel_resolution,
        precision=ev.precision,
    )
