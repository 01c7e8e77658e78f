"""Rules train_stage1 / train_stage2: Re-MeanFlow training, one process or `accelerate launch`."""

import torch

from remeanflow import train
from remeanflow.checkpoints import net_sha256
from remeanflow.launch import launch_module
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    cfg = dict(s.config)
    sampler, couplings_seed = cfg.pop("sampler"), cfg.pop("couplings_seed")
    s.seeds["train"] = cfg["seed"]
    spec = dict(
        manifest=smk.input.manifest, init=smk.input.init, out_dir=str(smk.output.state).rsplit("/", 1)[0],
        work_dir=smk.params.work, stage=smk.params.stage, on_stale_work_dir="archive",
        # training refuses couplings made by another teacher, guide or sampler
        expected_fingerprint={"teacher_sha256": net_sha256(smk.input.teacher), "guide_sha256": net_sha256(smk.input.guide),
                              "sampler": sampler, "seed": couplings_seed},
        **{k: (tuple(v) if k == "betas" else v) for k, v in cfg.items()},
    )
    processes = max(smk.params.processes, int(smk.resources.get("gpu", 0) or 0), 1)
    if processes == 1:
        s.extra["summary"] = train.train_meanflow(**spec)
    else:
        launch_module("remeanflow.train", spec, processes, log_file=s.log_file)
