"""Rule sample_sheet: a labelled grid of every class of the run from the final one-step generator."""

from remeanflow import generate
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    s.seeds["sample_sheet"] = smk.params.seed
    s.extra["samples"] = generate.sample(
        smk.input.net, per_class=smk.params.per_class, seed=smk.params.seed, batch=smk.params.batch,
        out=smk.output[0], grid=True, vae=next(iter(smk.input.vae), None), labels_csv=smk.input.labels,
        progress=False,
    )
