"""Rule couplings_shard: teacher ODE couplings for one shard (resumable, multi-process capable)."""

from remeanflow import checkpoints, coupling_job
from remeanflow.launch import job_processes
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    c = s.settings.couplings
    net_kwargs = checkpoints.load_net(smk.input.teacher)["init_kwargs"]
    shape = [net_kwargs["img_channels"], net_kwargs["img_resolution"], net_kwargs["img_resolution"]]
    spec = dict(
        index=smk.input.index, teacher=smk.input.teacher, guide=smk.input.guide, work=smk.params.work,
        output=smk.output[0], shard=int(smk.wildcards.shard), shape=shape, couplings=c.to_dict(), seed=s.settings.seed,
    )
    s.seeds["noise"] = s.settings.seed
    processes = job_processes(c.processes, int(smk.resources.get("gpu", 0) or 0),
                              keys="couplings.processes / resources.couplings.gpu")
    s.extra["stats"] = coupling_job.launch(spec, processes, log_file=s.log_file)
