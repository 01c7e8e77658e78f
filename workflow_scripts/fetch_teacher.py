"""Rule fetch_teacher: download published EDM2 pickles and convert them without running their code."""

from remeanflow.checkpoints import load_edm2_pickle, save_net
from remeanflow.data.download import download
from remeanflow.workflow import step

out = snakemake.output  # noqa: F821
with step(snakemake) as s:  # noqa: F821
    for role in ("main", "guide"):
        if not s.config[role]:
            raise ValueError(f"config key teacher.fetch.{role} must name an EDM2 pickle (URL or path)")
        pkl = out[f"{role}_pkl"]
        digest = download(s.config[role], pkl, sha256=s.config[f"{role}_sha256"])
        loaded = load_edm2_pickle(pkl)
        save_net(out[role], loaded["net"], encoder=loaded["encoder"],
                 meta={"role": role, "source": s.config[role], "source_sha256": digest})
        s.extra[f"{role}_sha256"] = digest
