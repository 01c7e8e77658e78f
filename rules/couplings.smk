# Stage: reflow couplings. Index of (sample id, class) -> sharded teacher-ODE couplings in Zarr
# -> manifest with checksums, fingerprint and the global truncation threshold.


rule reflow_index:
    input:
        images=f"{RUN}/data/images.zarr",
    output:
        directory(f"{RUN}/reflow/index.zarr"),
    log:
        f"{RUN}/logs/reflow_index.log",
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        step=params_of("reflow_index"),
    script:
        "../workflow_scripts/reflow_index.py"


rule couplings_shard:
    input:
        index=f"{RUN}/reflow/index.zarr",
        teacher=f"{RUN}/teacher/net.pt",
        guide=f"{RUN}/teacher/guide.pt",
    output:
        directory(f"{RUN}/reflow/couplings/shard-{{shard}}.zarr"),
    log:
        f"{RUN}/logs/couplings_shard/{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/couplings_shard/{{shard}}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("couplings", "threads")
    resources:
        mem_mb=res("couplings", "mem_mb"),
        runtime=res("couplings", "runtime"),
        gpu=res("couplings", "gpu"),
    params:
        step=params_of("couplings_shard"),
        work=lambda wc: f"{RUN}/reflow/work/shard-{wc.shard}.zarr",
    script:
        "../workflow_scripts/couplings_shard.py"


rule couplings_merge:
    input:
        index=f"{RUN}/reflow/index.zarr",
        shards=expand(
            f"{RUN}/reflow/couplings/shard-{{shard}}.zarr",
            shard=shards(S.couplings.num_shards),
        ),
    output:
        f"{RUN}/reflow/manifest.json",
    log:
        f"{RUN}/logs/couplings_merge.log",
    benchmark:
        f"{RUN}/benchmarks/couplings_merge.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("couplings", "mem_mb"),
        runtime=res("couplings", "runtime"),
    params:
        step=params_of("couplings_merge"),
    script:
        "../workflow_scripts/couplings_merge.py"
