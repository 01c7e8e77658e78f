"""Rule preprocess_shard: decode one class range of the archive into a Zarr part (no extraction)."""

from remeanflow.data.preprocess import preprocess_shard
from remeanflow.workflow import step


def main(smk) -> None:
    with step(smk) as s:
        dataset = s.settings.dataset
        s.extra["report"] = preprocess_shard(
            smk.input.archive, smk.output[0], shard=int(smk.wildcards.shard), num_shards=dataset.preprocess_shards,
            resolution=dataset.resolution, workers=dataset.decode_workers, max_bad_fraction=dataset.max_bad_fraction,
            min_images_per_class=dataset.min_images_per_class,
        )


# decode workers are forkserver processes that re-import this script: only the main process runs
if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - injected by Snakemake
