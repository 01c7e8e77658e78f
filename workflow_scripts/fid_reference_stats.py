"""Rule fid_reference_stats: FID reference statistics, provided (checked, copied) or computed from the
dataset's images with the Inception weights."""

import torch

from remeanflow import evaluate, fid, inception
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    torch.set_num_threads(s.threads)
    cfg = s.config
    if cfg["source"] is not None:
        s.extra["provided"] = cfg["source"]
        s.extra["sha256"] = fid.fetch_reference_stats(cfg["source"], smk.output[0], inception.FEATURE_DIM,
                                                      sha256=cfg["sha256"])
    else:
        weights = list(smk.input.weights)
        if not weights:
            raise ValueError("FID reference statistics need evaluate.inception.weights, or a provided file in "
                             "evaluate.ref_stats.source")
        model = inception.load_inception(weights[0])
        mu, sigma = evaluate.reference_inception_stats(smk.input.images, model, batch=cfg["batch"])
        fid.save_stats(smk.output[0], mu, sigma)
        s.extra["computed_from"] = smk.input.images
