"""Rule download_dataset: fetch the train archive (http(s) with resume, file://, path), verify sha256."""

from remeanflow.data.download import download
from remeanflow.workflow import step

with step(snakemake) as s:  # noqa: F821
    s.extra["sha256"] = download(s.config["source"], snakemake.output.archive, sha256=s.config["sha256"])  # noqa: F821
