# Stage: the run report. Per evaluated checkpoint its training curves and sample grid, then one
# self-contained HTML page (results/<run>/report/index.html) with every figure inlined, the
# metrics tables and the provenance of every artifact. The figures are also `report()` outputs,
# so `snakemake --report report.html` shows them with captions.

REPORT_STAGES = ["stage1", "stage2"]
# The ablation table and figure (`snakemake ablations`), shown when present: as inputs, so that the
# report is redone once they appear or change (the ablations are not part of `all`).
ABLATION_SUMMARY = [
    p
    for p in (f"{RUN}/ablations/summary.csv", f"{RUN}/ablations/summary.png")
    if os.path.exists(p)
]


report: "../report/workflow.rst"


rule report_stage:
    input:
        train=f"{RUN}/train/{{stage}}/metrics.csv",
        grid=f"{RUN}/eval/{{stage}}/samples.png",
        manifest=f"{RUN}/reflow/manifest.json",
    output:
        training=report(
            f"{RUN}/report/figures/{{stage}}/training.png",
            caption="../report/training.rst",
            category="Training",
            subcategory="{stage}",
        ),
        samples=report(
            f"{RUN}/report/figures/{{stage}}/samples.png",
            caption="../report/samples.rst",
            category="Samples",
            subcategory="{stage}",
        ),
    log:
        f"{RUN}/logs/report_stage/{{stage}}.log",
    benchmark:
        f"{RUN}/benchmarks/report_stage/{{stage}}.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        step=params_of("report_stage", "report"),
    script:
        "../workflow_scripts/report.py"


rule report:
    input:
        # a fetched teacher (published checkpoints) has no training log
        teacher=([f"{RUN}/teacher/metrics.csv"] if S.teacher.mode == "train" else []),
        manifest=f"{RUN}/reflow/manifest.json",
        metrics=expand(f"{RUN}/eval/{{stage}}/metrics.json", stage=REPORT_STAGES),
        train=expand(f"{RUN}/train/{{stage}}/metrics.csv", stage=REPORT_STAGES),
        samples=expand(
            f"{RUN}/report/figures/{{stage}}/samples.png", stage=REPORT_STAGES
        ),
        training=expand(
            f"{RUN}/report/figures/{{stage}}/training.png", stage=REPORT_STAGES
        ),
        ablations=ABLATION_SUMMARY,
    output:
        html=report(
            f"{RUN}/report/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
        teacher=report(
            f"{RUN}/report/figures/teacher_loss.png",
            caption="../report/teacher.rst",
            category="Teacher",
        ),
        couplings=report(
            f"{RUN}/report/figures/coupling_distances.png",
            caption="../report/couplings.rst",
            category="Couplings",
        ),
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    params:
        step=params_of("report", "report"),
        stages=REPORT_STAGES,
    script:
        "../workflow_scripts/report.py"
