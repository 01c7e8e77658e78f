# Target `ablations` (not part of `all`): the paper's claims in miniature. Training variants (the
# overlays presets/ablations/<name>.yaml; `ablations.variants` selects some) over the run's one
# teacher, index and coupling set, each evaluated with the same held-out noise and metrics, then one
# table and figure (ablations/summary.csv, summary.png). `ablations.Plan` decides per variant and
# stage whether the artifact is the base run's own (same settings of every rule up to it: shared,
# runs once) or the variant's, under ablations/<variant>/ with the main layout. Every variant job
# runs the main pipeline's own script with the variant's config (workflow_scripts/ablation_step.py);
# its `params: variant` holds the settings its rule gets under the variant, so Snakemake reruns
# exactly the variant jobs whose settings change.

from remeanflow import ablations as rmf_ablations

ABL = rmf_ablations.Plan(config, S.ablations.variants)
ABL_RUN = f"{RUN}/ablations/{{variant}}"
ABL_LOG = f"{RUN}/logs/ablations/{{variant}}"
ABL_BENCH = f"{RUN}/benchmarks/ablations/{{variant}}"


# input and params functions (remeanflow/ablations.py: no functions in rule files)
ABL_IN = rmf_ablations.RuleInputs(ABL, RUN)


localrules:
    ablations,


rule ablation_couplings_shard:
    input:
        index=f"{RUN}/reflow/index.zarr",
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
    output:
        directory(f"{ABL_RUN}/reflow/couplings/shard-{{shard}}.zarr"),
    log:
        f"{ABL_LOG}/couplings_shard/{{shard}}.log",
    benchmark:
        f"{ABL_BENCH}/couplings_shard/{{shard}}.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
    conda:
        "../envs/torch.yaml"
    threads: res("couplings", "threads")
    resources:
        mem_mb=res("couplings", "mem_mb"),
        runtime=res("couplings", "runtime"),
        gpu=res("couplings", "gpu"),
    params:
        step=params_of("ablation_couplings_shard", "ablation_step"),
        variant=ABL_IN.variant("couplings_shard"),
        overlay=ABL_IN.overlay,
        main="couplings_shard",
        work=lambda wc: f"{RUN}/ablations/{wc.variant}/reflow/work/shard-{wc.shard}.zarr",
    script:
        "../workflow_scripts/ablation_step.py"


rule ablation_couplings_merge:
    input:
        index=f"{RUN}/reflow/index.zarr",
        shards=ABL_IN.shards(S.couplings.num_shards),
    output:
        f"{ABL_RUN}/reflow/manifest.json",
    log:
        f"{ABL_LOG}/couplings_merge.log",
    benchmark:
        f"{ABL_BENCH}/couplings_merge.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("couplings", "mem_mb"),
        runtime=res("couplings", "runtime"),
    params:
        step=params_of("ablation_couplings_merge", "ablation_step"),
        variant=ABL_IN.variant("couplings_merge"),
        overlay=ABL_IN.overlay,
        main="couplings_merge",
    script:
        "../workflow_scripts/ablation_step.py"


rule ablation_init_time_embedding:
    input:
        teacher=f"{RUN}/teacher/net.pt",
    output:
        net=f"{ABL_RUN}/time_emb/net.pt",
        fit=f"{ABL_RUN}/time_emb/fit.json",
    log:
        f"{ABL_LOG}/init_time_embedding.log",
    benchmark:
        f"{ABL_BENCH}/init_time_embedding.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
    conda:
        "../envs/torch.yaml"
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=min(res("train", "gpu"), 1),
    params:
        step=params_of("ablation_init_time_embedding", "ablation_step"),
        variant=ABL_IN.variant("init_time_embedding"),
        overlay=ABL_IN.overlay,
        main="init_time_embedding",
    script:
        "../workflow_scripts/ablation_step.py"


rule ablation_train_stage1:
    input:
        unpack(ABL_IN.train(1)),
    output:
        state=f"{ABL_RUN}/train/stage1/train_state.pt",
        net=f"{ABL_RUN}/train/stage1/net_ema.pt",
        metrics=f"{ABL_RUN}/train/stage1/metrics.csv",
    log:
        f"{ABL_LOG}/train_stage1.log",
    benchmark:
        f"{ABL_BENCH}/train_stage1.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
    conda:
        "../envs/torch.yaml"
    threads: res("train", "threads")
    resources:
        **gpu_resources(res("train", "nodes"), res("train", "gpu")),
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        nodes=res("train", "nodes"),
    params:
        step=params_of("ablation_train_stage1", "ablation_step"),
        variant=ABL_IN.variant("train_stage1", "train_stage"),
        overlay=ABL_IN.overlay,
        main="train_stage",
        stage=1,
        work=lambda wc: f"{RUN}/ablations/{wc.variant}/train/work/stage1",
    script:
        "../workflow_scripts/ablation_step.py"


use rule ablation_train_stage1 as ablation_train_stage2 with:
    input:
        unpack(ABL_IN.train(2)),
    output:
        state=f"{ABL_RUN}/train/stage2/train_state.pt",
        net=f"{ABL_RUN}/train/stage2/net_ema.pt",
        metrics=f"{ABL_RUN}/train/stage2/metrics.csv",
    log:
        f"{ABL_LOG}/train_stage2.log",
    benchmark:
        f"{ABL_BENCH}/train_stage2.tsv"
    params:
        step=params_of("ablation_train_stage2", "ablation_step"),
        variant=ABL_IN.variant("train_stage2", "train_stage"),
        overlay=ABL_IN.overlay,
        main="train_stage",
        stage=2,
        work=lambda wc: f"{RUN}/ablations/{wc.variant}/train/work/stage2",


# Held-out teacher couplings of a variant's coupling sampler (the same held-out noise and classes),
# only for the endpoint error against the reference; evaluation always uses the base run's.
rule ablation_heldout_couplings:
    input:
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
        images=f"{RUN}/data/images.zarr",
    output:
        f"{ABL_RUN}/eval/heldout.npz",
    log:
        f"{ABL_LOG}/heldout_couplings.log",
    benchmark:
        f"{ABL_BENCH}/heldout_couplings.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("ablation_heldout_couplings", "ablation_step"),
        variant=ABL_IN.variant("heldout_couplings"),
        overlay=ABL_IN.overlay,
        main="heldout_couplings",
    script:
        "../workflow_scripts/ablation_step.py"


# The reference endpoints: the base sampler with ablations.reference_heun_steps steps.
use rule ablation_heldout_couplings as ablation_heldout_reference with:
    output:
        f"{RUN}/ablations/reference/heldout.npz",
    log:
        f"{RUN}/logs/ablations/reference/heldout_couplings.log",
    benchmark:
        f"{RUN}/benchmarks/ablations/reference/heldout_couplings.tsv"
    params:
        step=params_of("ablation_heldout_reference", "ablation_step"),
        variant=ABL.step("reference", "heldout_couplings", "heldout_couplings"),
        overlay=ABL.overlay("reference"),
        main="heldout_couplings",


rule ablation_evaluate_shard:
    input:
        net=ABL_IN.eval_net,
        images=f"{RUN}/data/images.zarr",
        weights=INCEPTION_WEIGHTS,
        vae=VAE,
    output:
        f"{ABL_RUN}/eval/{{ckpt}}/shards/shard-{{shard}}.npz",
    log:
        f"{ABL_LOG}/evaluate/{{ckpt}}/shard-{{shard}}.log",
    benchmark:
        f"{ABL_BENCH}/evaluate/{{ckpt}}/shard-{{shard}}.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
        ckpt="stage[12]",
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("ablation_evaluate_shard", "ablation_step"),
        variant=ABL_IN.variant("evaluate_shard"),
        overlay=ABL_IN.overlay,
        main="evaluate_shard",
    script:
        "../workflow_scripts/ablation_step.py"


rule ablation_evaluate_merge:
    input:
        net=ABL_IN.eval_net,
        shards=expand(
            f"{RUN}/ablations/{{{{variant}}}}/eval/{{{{ckpt}}}}/shards/shard-{{shard}}.npz",
            shard=shards(EVAL.shards),
        ),
        heldout=f"{RUN}/eval/heldout.npz",
        images=f"{RUN}/data/images.zarr",
        teacher=f"{RUN}/teacher/net.pt",
        initial=ABL_IN.at("time_emb", "time_emb/net.pt"),
        pixel_stats=PIXEL_STATS,
        ref_stats=FID_REF_STATS,
        vae=VAE,
    output:
        metrics=f"{ABL_RUN}/eval/{{ckpt}}/metrics.json",
        grid=f"{ABL_RUN}/eval/{{ckpt}}/samples.png",
    log:
        f"{ABL_LOG}/evaluate/{{ckpt}}/merge.log",
    benchmark:
        f"{ABL_BENCH}/evaluate/{{ckpt}}/merge.tsv"
    wildcard_constraints:
        variant=rmf_ablations.NAME_PATTERN,
        ckpt="stage[12]",
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("ablation_evaluate_merge", "ablation_step"),
        variant=ABL_IN.variant("evaluate_merge"),
        overlay=ABL_IN.overlay,
        main="evaluate_merge",
    script:
        "../workflow_scripts/ablation_step.py"


rule ablations:
    input:
        unpack(ABL_IN.summary),
    output:
        table=f"{RUN}/ablations/summary.csv",
        figure=f"{RUN}/ablations/summary.png",
    log:
        f"{RUN}/logs/ablations/summary.log",
    benchmark:
        f"{RUN}/benchmarks/ablations/summary.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        step=params_of("ablations", "ablation_summary"),
        variants=ABL.entries(RUN),
    message:
        f"ablation summary of {len(ABL.variants)} variants: {', '.join(ABL.variants)}"
    script:
        "../workflow_scripts/ablation_summary.py"
