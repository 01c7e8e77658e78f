"""Rule fetch_teacher: download published EDM2 pickles and convert them without running their code."""

from remeanflow.checkpoints import load_edm2_pickle, save_net
from remeanflow.data.download import download
from remeanflow.edm2_pickle import check_declared
from remeanflow.workflow import step

smk = snakemake  # noqa: F821
with step(smk) as s:
    fetch = s.settings.teacher.fetch
    for role in ("main", "guide"):
        source, sha256 = getattr(fetch, role), getattr(fetch, f"{role}_sha256")
        if not source:
            raise ValueError(f"config key teacher.fetch.{role} must name an EDM2 pickle (URL or path)")
        pkl = smk.output[f"{role}_pkl"]
        digest = download(source, pkl, sha256=sha256, **s.settings.download.to_dict())
        loaded = load_edm2_pickle(pkl)
        check_declared(loaded, encoder=fetch.encoder, resolution=fetch.resolution, role=role)
        save_net(smk.output[role], loaded["net"], encoder=loaded["encoder"],
                 meta={"role": role, "source": source, "source_sha256": digest})
        s.extra[f"{role}_sha256"] = digest
