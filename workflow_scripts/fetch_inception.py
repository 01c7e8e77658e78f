"""Rule fetch_inception: the pytorch-fid InceptionV3 weights, checked (sha256 or name hash, strict load)."""

from remeanflow.inception import fetch_weights
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    inception = s.settings.evaluate.inception
    s.extra["sha256"] = fetch_weights(inception.weights, smk.output[0], inception.sha256,
                                     **s.settings.download.to_dict())
    s.extra["source"] = inception.weights
