"""Dataset stages: toy archive, download, streaming ImageNet-tar reader, preprocessing to Zarr."""

from remeanflow.data.download import ChecksumError, DownloadError, SourceNotFoundError, download
from remeanflow.data.imagenet_tar import ArchiveError, UnsafeArchiveError, iter_images, list_synsets
from remeanflow.data.preprocess import (
    ShardMismatchError,
    StoreFormatError,
    TooManyBadImagesError,
    center_crop_dhariwal,
    load_images,
    merge_shards,
    preprocess_shard,
)
from remeanflow.data.toy import write_toy_archive

__all__ = [
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "ShardMismatchError",
    "SourceNotFoundError",
    "StoreFormatError",
    "TooManyBadImagesError",
    "UnsafeArchiveError",
    "center_crop_dhariwal",
    "download",
    "iter_images",
    "list_synsets",
    "load_images",
    "merge_shards",
    "preprocess_shard",
    "write_toy_archive",
]
