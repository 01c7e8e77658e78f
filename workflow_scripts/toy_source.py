"""Rule toy_source: write the deterministic toy ImageNet-style archive (embedded default only)."""

from remeanflow.data.toy import write_toy_archive
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821 - injected by Snakemake
    toy = s.settings.dataset.toy
    s.seeds["toy"] = toy.seed
    s.extra["summary"] = write_toy_archive(snakemake.output[0], **toy.to_dict(), progress=True)  # noqa: F821
