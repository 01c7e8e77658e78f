"""Rule heldout_couplings: teacher endpoints for fixed held-out noise and classes (evaluation)."""

import torch
import zarr

from remeanflow.evaluate import make_heldout
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    cfg = s.config
    s.seeds["heldout"] = cfg["seed"]
    num_classes = len(zarr.open_group(smk.input.images, mode="r").attrs["synsets"])
    s.extra["summary"] = make_heldout(
        smk.input.teacher, smk.input.guide, smk.output[0], num_samples=cfg["num_samples"], seed=cfg["seed"],
        num_classes=num_classes, heun_steps=cfg["heun_steps"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
        rho=cfg["rho"], guidance=cfg["guidance"], batch=cfg["batch"],
    )
