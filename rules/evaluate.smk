# Stage: evaluation. Once per run: held-out teacher couplings (fixed noise and classes), pixel
# statistics of the dataset and, when Inception weights are configured, the weights and the FID
# reference statistics. Per checkpoint: one-step samples in `evaluate.shards` jobs, then a merge
# that computes FID over exactly `evaluate.fid_samples` samples and writes metrics.json and a grid.
#
# A checkpoint is named by its eval folder: `stage1` / `stage2` is the stage's final EMA net,
# `stage1-step000004` the EMA snapshot that training wrote at step 4
# (train/work/stage1/snapshots/ema-step-00000004.pt, every train.snapshot_every steps). Any of
# them is evaluated by asking for results/<run>/eval/<name>/metrics.json.

EVAL = S.evaluate
# Without Inception weights FID is skipped (the metrics say so); everything else still runs.
FID = EVAL.inception.weights is not None
INCEPTION_WEIGHTS = [f"{RUN}/fid/inception.pth"] if FID else []
FID_REF_STATS = [f"{RUN}/fid/ref_stats.npz"] if FID else []
PIXEL_STATS = f"{RUN}/fid/pixel_stats.npz"
VAE = [EVAL.vae] if EVAL.vae is not None else []
# Reference statistics: computed from the images, or a provided file (a local one is an input,
# so that replacing it reruns the rule; a URL is fetched by the rule).
REF_SOURCE = EVAL.ref_stats.source
REF_INPUTS = (
    {"images": f"{RUN}/data/images.zarr", "weights": INCEPTION_WEIGHTS}
    if REF_SOURCE is None
    else ({} if "://" in REF_SOURCE else {"provided": REF_SOURCE})
)
SNAPSHOT = "{run}/train/work/{stage}/snapshots/ema-step-{step:08d}.pt"
# The net behind an eval name. A snapshot is not a rule output: when it is missing, Snakemake
# stops with MissingInputException naming the snapshot file (train that stage first).
EVAL_NET = lambda wc: (
    f"{RUN}/train/{wc.ckpt}/net_ema.pt"
    if "-step" not in wc.ckpt
    else SNAPSHOT.format(
        run=RUN, stage=wc.ckpt.split("-step")[0], step=int(wc.ckpt.split("-step")[1])
    )
)


rule heldout_couplings:
    input:
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
        images=f"{RUN}/data/images.zarr",
    output:
        f"{RUN}/eval/heldout.npz",
    log:
        f"{RUN}/logs/heldout_couplings.log",
    benchmark:
        f"{RUN}/benchmarks/heldout_couplings.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("heldout_couplings"),
    script:
        "../workflow_scripts/heldout_couplings.py"


rule pixel_reference_stats:
    input:
        images=f"{RUN}/data/images.zarr",
    output:
        PIXEL_STATS,
    log:
        f"{RUN}/logs/pixel_reference_stats.log",
    benchmark:
        f"{RUN}/benchmarks/pixel_reference_stats.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    params:
        step=params_of("pixel_reference_stats"),
    script:
        "../workflow_scripts/pixel_reference_stats.py"


if FID:

    rule fetch_inception:
        output:
            INCEPTION_WEIGHTS,
        log:
            f"{RUN}/logs/fetch_inception.log",
        benchmark:
            f"{RUN}/benchmarks/fetch_inception.tsv"
        conda:
            "../envs/torch.yaml"
        threads: 1
        resources:
            mem_mb=res("default", "mem_mb"),
            runtime=res("default", "runtime"),
        params:
            step=params_of("fetch_inception"),
        script:
            "../workflow_scripts/fetch_inception.py"


rule fid_reference_stats:
    input:
        unpack(lambda wc: REF_INPUTS),
    output:
        f"{RUN}/fid/ref_stats.npz",
    log:
        f"{RUN}/logs/fid_reference_stats.log",
    benchmark:
        f"{RUN}/benchmarks/fid_reference_stats.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("fid_reference_stats"),
    script:
        "../workflow_scripts/fid_reference_stats.py"


rule evaluate_shard:
    input:
        net=EVAL_NET,
        images=f"{RUN}/data/images.zarr",
        weights=INCEPTION_WEIGHTS,
        vae=VAE,
    output:
        f"{RUN}/eval/{{ckpt}}/shards/shard-{{shard}}.npz",
    log:
        f"{RUN}/logs/evaluate/{{ckpt}}/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate/{{ckpt}}/shard-{{shard}}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("evaluate_shard"),
    script:
        "../workflow_scripts/evaluate_shard.py"


rule evaluate_merge:
    input:
        net=EVAL_NET,
        shards=expand(
            f"{RUN}/eval/{{{{ckpt}}}}/shards/shard-{{shard}}.npz",
            shard=shards(EVAL.shards),
        ),
        heldout=f"{RUN}/eval/heldout.npz",
        images=f"{RUN}/data/images.zarr",
        teacher=f"{RUN}/teacher/net.pt",
        initial=f"{RUN}/time_emb/net.pt",
        pixel_stats=PIXEL_STATS,
        ref_stats=FID_REF_STATS,
        vae=VAE,
    output:
        metrics=f"{RUN}/eval/{{ckpt}}/metrics.json",
        grid=f"{RUN}/eval/{{ckpt}}/samples.png",
    log:
        f"{RUN}/logs/evaluate/{{ckpt}}/merge.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate/{{ckpt}}/merge.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("evaluate_merge"),
    script:
        "../workflow_scripts/evaluate_merge.py"
