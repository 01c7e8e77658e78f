"""Rule download_dataset: fetch the train archive (http(s) with resume, file://, path), verify sha256."""

from pathlib import Path

from remeanflow.data.download import download
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    dataset = s.settings.dataset
    # The toy archive (rule toy_source) goes through file://, so the real ingestion path runs; its
    # location is taken here, not from params, so that a moved run is not out of date.
    source = Path(smk.input[0]).resolve().as_uri() if dataset.toy is not None else dataset.source
    if not source:
        raise ValueError("config key dataset.source must be set when dataset.toy is null")
    s.extra["source"] = source
    s.extra["sha256"] = download(source, smk.output.archive, sha256=dataset.sha256, **s.settings.download.to_dict())
