"""Rule evaluate_merge: FID over all shards of a checkpoint, held-out metrics and the sample grid."""

import zarr

from remeanflow.evaluate import evaluate_checkpoint, sampled_metrics
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    ev = s.settings.evaluate
    ref = list(smk.input.ref_stats)
    resolution = zarr.open_group(smk.input.images, mode="r").attrs["resolution"]
    sampled = sampled_metrics(
        list(smk.input.shards), num_samples=ev.fid_samples, inception_ref=ref[0] if ref else None,
        pixel_ref=smk.input.pixel_stats, ref_resolution=None if ev.ref_stats.source is not None else resolution,
    )
    s.extra["fid"] = sampled["fid"]
    s.extra["metrics"] = evaluate_checkpoint(
        smk.input.net, smk.input.heldout, smk.input.images, smk.output.metrics, smk.output.grid,
        teacher_path=smk.input.teacher, initial_path=smk.input.initial, pixel_ref_stats=smk.input.pixel_stats,
        sampled=sampled, batch=ev.batch, grid_per_class=ev.grid_per_class, pixel_resolution=ev.pixel_resolution,
        vae_path=vae[0] if (vae := list(smk.input.vae)) else None, vae_batch=ev.vae_batch, precision=ev.precision,
    )
