# remeanflow: Re-MeanFlow (one-step generation by MeanFlow training of EDM2 on rectified
# teacher couplings) as a Snakemake workflow. Stages, rules and artifacts: docs/architecture.md;
# the method and where it differs from the paper's code: docs/method.md.
import os


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/teacher.smk"
include: "rules/couplings.smk"
include: "rules/training.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/samples.smk"
include: "rules/ablations.smk"


# Bookkeeping rules run where Snakemake runs (no cluster job for seconds of work).
localrules:
    all,
    toy_source,
    report_stage,
    report,


rule all:
    default_target: True
    input:
        final_targets(),
