# Stage: teacher. Train a small EDM2 teacher on the toy data (default) or convert published EDM2
# pickles (main + autoguidance guide). Both produce teacher/net.pt and teacher/guide.pt.


if S.teacher.mode == "train":

    rule train_teacher:
        input:
            images=f"{RUN}/data/images.zarr",
        output:
            main=f"{RUN}/teacher/net.pt",
            guide=f"{RUN}/teacher/guide.pt",
            metrics=f"{RUN}/teacher/metrics.csv",
        log:
            f"{RUN}/logs/train_teacher.log",
        benchmark:
            f"{RUN}/benchmarks/train_teacher.tsv"
        conda:
            "../envs/torch.yaml"
        threads: res("teacher", "threads")
        resources:
            mem_mb=res("teacher", "mem_mb"),
            runtime=res("teacher", "runtime"),
            gpu=res("teacher", "gpu"),
        params:
            step=params_of("train_teacher"),
        script:
            "../workflow_scripts/train_teacher.py"

else:

    rule fetch_teacher:
        output:
            main=f"{RUN}/teacher/net.pt",
            guide=f"{RUN}/teacher/guide.pt",
            main_pkl=f"{RUN}/teacher/raw/main.pkl",
            guide_pkl=f"{RUN}/teacher/raw/guide.pkl",
        log:
            f"{RUN}/logs/fetch_teacher.log",
        benchmark:
            f"{RUN}/benchmarks/fetch_teacher.tsv"
        conda:
            "../envs/torch.yaml"
        threads: 1
        resources:
            mem_mb=res("teacher", "mem_mb"),
            runtime=res("teacher", "runtime"),
        params:
            step=params_of("fetch_teacher"),
        script:
            "../workflow_scripts/fetch_teacher.py"
