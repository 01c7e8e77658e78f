"""Rules train_stage1 / train_stage2: Re-MeanFlow training, one process or `accelerate launch`."""

from remeanflow import train
from remeanflow.checkpoints import net_sha256
from remeanflow.launch import check_split, job_processes, launch_module
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    stage, settings = smk.params.stage, s.settings
    s.seeds["train"] = settings.seed
    spec = dict(
        manifest=smk.input.manifest, init=smk.input.init, out_dir=str(smk.output.state).rsplit("/", 1)[0],
        work_dir=smk.params.work, stage=stage, seed=settings.seed, on_stale_work_dir="archive",
        # training refuses couplings made by another teacher, guide or sampler
        expected_fingerprint={"teacher_sha256": net_sha256(smk.input.teacher), "guide_sha256": net_sha256(smk.input.guide),
                              "sampler": settings.couplings.sampler.to_dict(), "seed": settings.seed},
    )
    processes = job_processes(settings.train.processes, int(smk.resources.get("gpu", 0) or 0),
                              keys="train.processes / resources.train.gpu")
    check_split(settings.train.batch_size, processes, total_key="train.batch_size",
                keys="train.processes / resources.train.gpu")
    if processes == 1:
        s.extra["summary"] = train.train_meanflow(settings.train, **spec)
    else:  # the spec travels as JSON to every rank
        launch_module("remeanflow.train", {**spec, "settings": settings.train.to_dict()}, processes, log_file=s.log_file)
