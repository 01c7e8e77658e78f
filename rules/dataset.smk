# Stage: dataset. Toy archive (default only) -> download (checksummed) -> sharded preprocess.


if S.dataset.toy is not None:

    rule toy_source:
        output:
            f"{RUN}/source/{S.dataset.archive_name}",
        log:
            f"{RUN}/logs/toy_source.log",
        benchmark:
            f"{RUN}/benchmarks/toy_source.tsv"
        conda:
            "../envs/data.yaml"
        threads: 1
        resources:
            mem_mb=res("default", "mem_mb"),
            runtime=res("default", "runtime"),
        params:
            step=params_of("toy_source"),
        script:
            "../workflow_scripts/toy_source.py"


rule download_dataset:
    input:
        [f"{RUN}/source/{S.dataset.archive_name}"] if S.dataset.toy else [],
    output:
        archive=dataset_archive(),
        checksum=dataset_archive() + ".sha256",
    log:
        f"{RUN}/logs/download_dataset.log",
    benchmark:
        f"{RUN}/benchmarks/download_dataset.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("preprocess", "runtime"),
    params:
        step=params_of("download_dataset"),
    script:
        "../workflow_scripts/download_dataset.py"


rule preprocess_shard:
    input:
        archive=dataset_archive(),
    output:
        directory(f"{RUN}/data/parts/part-{{shard}}.zarr"),
    log:
        f"{RUN}/logs/preprocess_shard/{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/preprocess_shard/{{shard}}.tsv"
    conda:
        "../envs/data.yaml"
    threads: res("preprocess", "threads")
    resources:
        mem_mb=res("preprocess", "mem_mb"),
        runtime=res("preprocess", "runtime"),
    params:
        step=params_of("preprocess_shard"),
    script:
        "../workflow_scripts/preprocess_shard.py"


rule preprocess_merge:
    input:
        parts=expand(
            f"{RUN}/data/parts/part-{{shard}}.zarr",
            shard=shards(S.dataset.preprocess_shards),
        ),
    output:
        images=directory(f"{RUN}/data/images.zarr"),
        labels=f"{RUN}/data/labels.csv",
    log:
        f"{RUN}/logs/preprocess_merge.log",
    benchmark:
        f"{RUN}/benchmarks/preprocess_merge.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("preprocess", "mem_mb"),
        runtime=res("preprocess", "runtime"),
    params:
        step=params_of("preprocess_merge"),
    script:
        "../workflow_scripts/preprocess_merge.py"
