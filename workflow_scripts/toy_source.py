"""Rule toy_source: write the deterministic toy ImageNet-style archive (embedded default only)."""

from remeanflow.data.toy import write_toy_archive
from remeanflow.workflow import step

smk = snakemake  # noqa: F821 - injected by Snakemake
with step(smk) as s:
    toy = s.settings.dataset.toy
    s.seeds["toy"] = toy.seed
    s.extra["summary"] = write_toy_archive(smk.output[0], **toy.to_dict(), progress=True)
