"""Rule init_time_embedding: fit the new t/r embeddings to the teacher's log-sigma embedding."""

import json

import torch

from remeanflow import checkpoints
from remeanflow.fileio import atomic_path
from remeanflow.time_embedding import fit_time_embedding
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = checkpoints.load_net(smk.input.teacher)
    fit_cfg = s.settings.time_embedding
    s.seeds["time_embedding"] = s.settings.seed
    fit = fit_time_embedding(loaded["net"].to(device), steps=fit_cfg.steps, batch=fit_cfg.batch, lr=fit_cfg.lr,
                             betas=fit_cfg.betas, seed=s.settings.seed, device=device)
    summary = {k: v for k, v in fit.items() if k != "history"}
    s.extra["fit"] = summary
    with atomic_path(smk.output.fit) as tmp:
        tmp.write_text(json.dumps(fit, indent=1))
    checkpoints.save_net(smk.output.net, loaded["net"].cpu(), encoder=loaded["encoder"],
                         meta={**loaded["meta"], "role": "stage1-init", "time_embedding_fit": summary})
