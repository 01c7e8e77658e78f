"""Rule train_teacher: train the toy EDM2 teacher and keep an early EMA snapshot as the guide."""

import torch
import zarr

from remeanflow.data.preprocess import load_images
from remeanflow.teacher import train_teacher
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    torch.set_num_threads(s.threads)
    images, labels = load_images(snakemake.input.images)  # noqa: F821
    num_classes = len(zarr.open_group(snakemake.input.images, mode="r").attrs["synsets"])  # noqa: F821
    cfg = dict(s.config)
    seed, resolution = cfg.pop("seed"), cfg.pop("resolution")
    s.seeds["teacher"] = seed
    net_kwargs = {"label_dim": num_classes, "img_resolution": resolution, "img_channels": images.shape[1]}
    s.extra["summary"] = train_teacher(
        images, labels, **cfg, seed=seed, net_kwargs=net_kwargs,
        out_main=snakemake.output.main, out_guide=snakemake.output.guide,  # noqa: F821
        metrics_csv=snakemake.output.metrics,  # noqa: F821
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
