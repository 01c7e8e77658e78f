# Stage: Re-MeanFlow training. Fit the t/r embeddings to the teacher, then stage 1 (plain
# MeanFlow target) and stage 2 (CFG target, grad clip). Each stage resumes from the newest
# checkpoint in its work folder, which Snakemake does not own and so never deletes.


from remeanflow.launch import gpu_resources

# What training reads: the couplings' manifest, or for the data-trained baseline (train.source: data,
# the ablations' variant (a) run on its own) the preprocessed images, so that no couplings are made for it.
if S.train.source == "data":
    TRAIN_DATA = {"images": f"{RUN}/data/images.zarr"}
else:
    TRAIN_DATA = {"manifest": f"{RUN}/reflow/manifest.json"}


rule init_time_embedding:
    input:
        teacher=f"{RUN}/teacher/net.pt",
    output:
        net=f"{RUN}/time_emb/net.pt",
        fit=f"{RUN}/time_emb/fit.json",
    log:
        f"{RUN}/logs/init_time_embedding.log",
    benchmark:
        f"{RUN}/benchmarks/init_time_embedding.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=min(res("train", "gpu"), 1),
    params:
        step=params_of("init_time_embedding"),
    script:
        "../workflow_scripts/init_time_embedding.py"


rule train_stage1:
    input:
        **TRAIN_DATA,
        init=f"{RUN}/time_emb/net.pt",
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
    output:
        state=f"{RUN}/train/stage1/train_state.pt",
        net=f"{RUN}/train/stage1/net_ema.pt",
        metrics=f"{RUN}/train/stage1/metrics.csv",
    log:
        f"{RUN}/logs/train_stage1.log",
    benchmark:
        f"{RUN}/benchmarks/train_stage1.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("train", "threads")
    resources:
        **gpu_resources(res("train", "nodes"), res("train", "gpu")),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        nodes=res("train", "nodes"),
    params:
        step=params_of("train_stage1", "train_stage"),
        stage=1,
        work=f"{RUN}/train/work/stage1",
    script:
        "../workflow_scripts/train_stage.py"


# Stage 2 continues from stage 1's train_state.pt; everything else is stage 1's rule.
use rule train_stage1 as train_stage2 with:
    input:
        **TRAIN_DATA,
        init=f"{RUN}/train/stage1/train_state.pt",
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
    output:
        state=f"{RUN}/train/stage2/train_state.pt",
        net=f"{RUN}/train/stage2/net_ema.pt",
        metrics=f"{RUN}/train/stage2/metrics.csv",
    log:
        f"{RUN}/logs/train_stage2.log",
    benchmark:
        f"{RUN}/benchmarks/train_stage2.tsv"
    params:
        step=params_of("train_stage2", "train_stage"),
        stage=2,
        work=f"{RUN}/train/work/stage2",
