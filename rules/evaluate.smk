# Stage: evaluation. Held-out teacher couplings (fixed noise and classes) once, then per
# checkpoint: one-step samples, a sample grid and the metrics that need no external weights.


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
        cfg={
            **{k: config["evaluate"][k] for k in ("num_samples", "seed", "batch")},
            **{
                k: config["couplings"][k]
                for k in ("heun_steps", "sigma_min", "sigma_max", "rho", "guidance")
            },
        },
        code=code("evaluate", "sampling", "networks", "checkpoints"),
    script:
        "../workflow_scripts/heldout_couplings.py"


rule evaluate:
    input:
        net=f"{RUN}/train/{{stage}}/net_ema.pt",
        heldout=f"{RUN}/eval/heldout.npz",
        images=f"{RUN}/data/images.zarr",
        teacher=f"{RUN}/teacher/net.pt",
        initial=f"{RUN}/time_emb/net.pt",
    output:
        metrics=f"{RUN}/eval/{{stage}}/metrics.json",
        grid=f"{RUN}/eval/{{stage}}/samples.png",
    log:
        f"{RUN}/logs/evaluate/{{stage}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate/{{stage}}.tsv"
    wildcard_constraints:
        stage="stage[12]",
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        cfg={
            "batch": config["evaluate"]["batch"],
            "grid_per_class": config["evaluate"]["grid_per_class"],
        },
        code=code("evaluate", "fid", "sampling", "networks", "checkpoints"),
    script:
        "../workflow_scripts/evaluate.py"
