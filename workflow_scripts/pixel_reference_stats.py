"""Rule pixel_reference_stats: pixel statistics of the dataset for the pixel Fréchet distances."""

from remeanflow.fid import save_stats
from remeanflow.reference_stats import reference_pixel_stats
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    resolution = s.settings.evaluate.pixel_resolution
    save_stats(smk.output[0], *reference_pixel_stats(smk.input.images, resolution=resolution))
