"""Rule preprocess_shard: decode one class range of the archive into a Zarr part (no extraction)."""

from remeanflow.data.preprocess import preprocess_shard
from remeanflow.workflow import step


def main(smk) -> None:
    with step(smk) as s:
        s.extra["report"] = preprocess_shard(
            smk.input.archive, smk.output[0], shard=int(smk.wildcards.shard),
            num_shards=s.config["preprocess_shards"], resolution=s.config["resolution"],
            workers=s.config["decode_workers"], max_bad_fraction=s.config["max_bad_fraction"],
        )


# decode workers are forkserver processes that re-import this script: only the main process runs
if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
