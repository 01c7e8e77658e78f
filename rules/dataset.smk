# Stage: dataset. Toy archive (default only) -> download (checksummed) -> sharded preprocess.


if config["dataset"]["toy"] is not None:

    rule toy_source:
        output:
            f"{RUN}/source/{config['dataset']['archive_name']}",
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
            cfg=config["dataset"]["toy"],
            code=code("data.toy"),
        script:
            "../workflow_scripts/toy_source.py"


rule download_dataset:
    input:
        [f"{RUN}/source/{config['dataset']['archive_name']}"]
        if config["dataset"]["toy"]
        else [],
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
        cfg={"source": dataset_source(), "sha256": config["dataset"]["sha256"]},
        code=code("data.download"),
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
        cfg={
            k: config["dataset"][k]
            for k in (
                "resolution",
                "preprocess_shards",
                "max_bad_fraction",
                "decode_workers",
            )
        },
        code=code("data"),
    script:
        "../workflow_scripts/preprocess_shard.py"


rule preprocess_merge:
    input:
        parts=expand(
            f"{RUN}/data/parts/part-{{shard}}.zarr",
            shard=shards(config["dataset"]["preprocess_shards"]),
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
        cfg={"resolution": config["dataset"]["resolution"]},
        code=code("data"),
    script:
        "../workflow_scripts/preprocess_merge.py"
