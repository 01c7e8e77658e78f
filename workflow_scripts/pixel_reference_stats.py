"""Rule pixel_reference_stats: pixel statistics of the dataset for the pixel Fréchet distances."""

import torch

from remeanflow.evaluate import reference_pixel_stats
from remeanflow.fid import save_stats
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    save_stats(smk.output[0], *reference_pixel_stats(smk.input.images, resolution=s.config["pixel_resolution"]))
