"""WebDataset shards: where they are (`locate`), reading them tolerantly (`reader`), decoding images (`images`).

The one shard reader of the project: training, evaluation, precompute, centroids and audits all
read through it, so they skip the same bad samples for the same reasons and see the same pixels.
"""
from teacher_service.shards.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_rgb8
from teacher_service.shards.locate import (
    DATASET_INFO,
    count_tar_samples,
    load_dataset_info,
    resolve_shards,
    shard_list,
    shard_sample_counts,
)
from teacher_service.shards.reader import (
    IMAGE_EXTENSIONS,
    NOTE_REASONS,
    SKIP_REASONS,
    NoUsableSamplesError,
    ReaderLimits,
    SkipCounts,
    read_samples,
)

__all__ = ["DATASET_INFO", "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "NOTE_REASONS", "SKIP_REASONS", "ImageDecodeError",
           "NoUsableSamplesError", "ReaderLimits", "SkipCounts", "count_tar_samples", "decode_rgb8",
           "load_dataset_info", "read_samples", "resolve_shards", "shard_list", "shard_sample_counts"]
