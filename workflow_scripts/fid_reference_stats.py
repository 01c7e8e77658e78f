"""Rule fid_reference_stats: FID reference statistics, provided (checked, copied) or computed from the
dataset's images with the Inception weights."""

from remeanflow import fid, inception
from remeanflow.reference_stats import reference_inception_stats
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    ev = s.settings.evaluate
    if ev.ref_stats.source is not None:
        s.extra["provided"] = ev.ref_stats.source
        s.extra["sha256"] = fid.fetch_reference_stats(ev.ref_stats.source, smk.output[0], inception.FEATURE_DIM,
                                                      sha256=ev.ref_stats.sha256, **s.settings.download.to_dict())
    else:
        weights = list(smk.input.weights)
        if not weights:
            raise ValueError("FID reference statistics need evaluate.inception.weights, or a provided file in "
                             "evaluate.ref_stats.source")
        model = inception.load_inception(weights[0])
        mu, sigma = reference_inception_stats(smk.input.images, model, batch=ev.batch)
        fid.save_stats(smk.output[0], mu, sigma)
        s.extra["computed_from"] = smk.input.images
