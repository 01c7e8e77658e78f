"""Rule couplings_shard: teacher ODE couplings for one shard (resumable, multi-process capable)."""

import torch

from remeanflow import checkpoints, coupling_job
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    torch.set_num_threads(s.threads)
    net_kwargs = checkpoints.load_net(snakemake.input.teacher)["init_kwargs"]  # noqa: F821
    shape = [net_kwargs["img_channels"], net_kwargs["img_resolution"], net_kwargs["img_resolution"]]
    spec = dict(
        index=snakemake.input.index, teacher=snakemake.input.teacher, guide=snakemake.input.guide,  # noqa: F821
        work=snakemake.params.work, output=snakemake.output[0], shard=int(snakemake.wildcards.shard),  # noqa: F821
        shape=shape, cfg=s.config, seed=s.config["seed"],
    )
    s.seeds["noise"] = s.config["seed"]
    processes = max(s.config["processes"], int(snakemake.resources.get("gpu", 0) or 0), 1)  # noqa: F821
    s.extra["stats"] = coupling_job.launch(spec, processes, log_file=s.log_file)
