"""Rule fetch_inception: the pytorch-fid InceptionV3 weights, checked (sha256 or name hash, strict load)."""

from remeanflow.inception import fetch_weights
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    s.extra["sha256"] = fetch_weights(s.config["weights"], smk.output[0], s.config["sha256"])
    s.extra["source"] = s.config["weights"]
