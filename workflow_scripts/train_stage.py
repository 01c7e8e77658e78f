"""Rules train_stage1 / train_stage2: Re-MeanFlow training, one process or `accelerate launch`.

Under Slurm every run of more than one process goes through `launch_nodes` (one `srun` task per
node, each an `accelerate launch` of its node's ranks), also with one node, so that the path of
multi-node runs is the one every cluster run takes; outside Slurm one node launches locally.
"""

from remeanflow import train
from remeanflow.checkpoints import net_sha256
from remeanflow.launch import check_split, job_processes, launch_module, launch_nodes, under_slurm
from remeanflow.workflow import step


def gpus_per_node(resources) -> int:
    """`gpu`, or with several nodes the count in `gres` (gpu:N or gpu:<model>:N; rules/training.smk)."""
    if int(resources.get("gpu", 0) or 0):
        return int(resources.get("gpu"))
    gres = [part for part in str(resources.get("gres", "") or "").split(",") if part.startswith("gpu")]
    return int(gres[0].rsplit(":", 1)[1]) if gres and ":" in gres[0] else 0


smk = snakemake  # noqa: F821
with step(smk) as s:
    stage, settings = smk.params.stage, s.settings
    # train.seed repeats training over one coupling set (the ablations' seeds); the couplings keep theirs
    seed = settings.seed if settings.train.seed is None else settings.train.seed
    s.seeds["train"] = seed
    data = settings.train.source == "data"
    spec = dict(
        manifest=None if data else smk.input.manifest, init=smk.input.init,
        out_dir=str(smk.output.state).rsplit("/", 1)[0], work_dir=smk.params.work, stage=stage, seed=seed,
        on_stale_work_dir="archive",
        # training refuses couplings made by another teacher, guide or sampler
        expected_fingerprint={"teacher_sha256": net_sha256(smk.input.teacher),
                              "guide_sha256": net_sha256(smk.input.guide),
                              "sampler": settings.couplings.sampler.to_dict(), "seed": settings.seed},
    )
    if data:  # the data-trained baseline reads the images (both training rules declare them then)
        spec["images"] = smk.input.images
    nodes = int(smk.resources.get("nodes", 1) or 1)
    keys = "train.processes / resources.train.gpu" + (" x resources.train.nodes" if nodes > 1 else "")
    # the first node's devices stand for every node's: Slurm gives each the same gres
    processes = job_processes(settings.train.processes, gpus_per_node(smk.resources), keys=keys)
    check_split(settings.train.batch_size, nodes * processes, total_key="train.batch_size", keys=keys)
    run = {**spec, "settings": settings.train.to_dict()}  # as JSON to every rank when launched
    if nodes * processes == 1:
        s.extra["summary"] = train.train_meanflow(settings.train, **spec)
    elif under_slurm():
        launch_nodes("remeanflow.train", run, nodes=nodes, processes_per_node=processes, threads=smk.threads,
                     spec_dir=spec["out_dir"], log_file=s.log_file)
    elif nodes > 1:
        raise RuntimeError(f"resources.train.nodes = {nodes} needs a Slurm job (SLURM_JOB_ID is not set): run with "
                           "--profile profiles/slurm, or set resources.train.nodes to 1")
    else:
        launch_module("remeanflow.train", run, processes, log_file=s.log_file)
