"""Rule heldout_couplings: teacher endpoints for fixed held-out noise and classes (evaluation)."""

import zarr

from remeanflow.heldout import make_heldout
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    ev, sampler = s.settings.evaluate, s.settings.couplings.sampler
    s.seeds["heldout"] = ev.seed
    num_classes = len(zarr.open_group(smk.input.images, mode="r").attrs["synsets"])
    s.extra["summary"] = make_heldout(
        smk.input.teacher, smk.input.guide, smk.output[0], num_samples=ev.num_samples, seed=ev.seed,
        num_classes=num_classes, batch=ev.batch, precision=s.settings.couplings.precision, **sampler.to_dict(),
    )
