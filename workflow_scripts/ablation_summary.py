"""Rule ablations: one row per variant (remeanflow/ablations.py) -> ablations/summary.csv and summary.png."""

from remeanflow import ablations
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    abl = s.settings.ablations
    s.extra["summary"] = ablations.write_summary(
        smk.params.variants, smk.input.reference, smk.output.table, smk.output.figure, checkpoint=abl.checkpoint,
        reference_heun_steps=abl.reference_heun_steps,
    )
