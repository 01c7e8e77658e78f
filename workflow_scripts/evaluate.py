"""Rule evaluate: one-step samples of a checkpoint, sample grid, metrics without external weights."""

import torch

from remeanflow.evaluate import evaluate_checkpoint
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    s.extra["metrics"] = evaluate_checkpoint(
        smk.input.net, smk.input.heldout, smk.input.images, smk.output.metrics, smk.output.grid,
        teacher_path=smk.input.teacher, initial_path=smk.input.initial, **s.config,
    )
