"""Rule train_teacher: train the toy EDM2 teacher and keep an early EMA snapshot as the guide."""

import torch
import zarr

from remeanflow.data.preprocess import load_images
from remeanflow.teacher import train_teacher
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    images, labels = load_images(smk.input.images)
    num_classes = len(zarr.open_group(smk.input.images, mode="r").attrs["synsets"])
    s.seeds["teacher"] = s.settings.seed
    net_kwargs = {"label_dim": num_classes, "img_resolution": s.settings.dataset.resolution,
                  "img_channels": images.shape[1]}
    s.extra["summary"] = train_teacher(
        images, labels, s.settings.teacher.train, seed=s.settings.seed, net_kwargs=net_kwargs,
        out_main=smk.output.main, out_guide=smk.output.guide, metrics_csv=smk.output.metrics,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
