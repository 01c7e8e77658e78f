"""Rule init_time_embedding: fit the new t/r embeddings to the teacher's log-sigma embedding."""

import json

import torch

from remeanflow import checkpoints
from remeanflow.fileio import atomic_path
from remeanflow.time_embedding import fit_time_embedding
from remeanflow.workflow import step

out = snakemake.output  # noqa: F821
with step(snakemake) as s:  # noqa: F821
    torch.set_num_threads(s.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = checkpoints.load_net(snakemake.input.teacher)  # noqa: F821
    cfg = s.config
    s.seeds["time_embedding"] = cfg["seed"]
    fit = fit_time_embedding(loaded["net"].to(device), steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                             betas=tuple(cfg["betas"]), seed=cfg["seed"], device=device)
    summary = {k: v for k, v in fit.items() if k != "history"}
    s.extra["fit"] = summary
    with atomic_path(out.fit) as tmp:
        tmp.write_text(json.dumps(fit, indent=1))
    checkpoints.save_net(out.net, loaded["net"].cpu(), encoder=loaded["encoder"],
                         meta={**loaded["meta"], "role": "stage1-init", "time_embedding_fit": summary})
