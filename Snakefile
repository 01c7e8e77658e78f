# remeanflow: Re-MeanFlow (one-step generation by MeanFlow training of EDM2 on rectified
# teacher couplings) as a Snakemake workflow. See README.md and DESIGN.md.
import os


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/teacher.smk"
include: "rules/couplings.smk"
include: "rules/training.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
