"""Aspect-ratio buckets: train on whole images of many shapes instead of square crops.

A bucket is a target size (height, width) with both sides divisible by `BUCKET_STEP` (64) and an area of at most
`resolution ** 2` pixels, as large as the step allows. Each image goes to the bucket whose aspect ratio is
closest to its own (distance measured on log(width / height), so 2:1 and 1:2 are equally far from 1:1), is
resized to cover it and centre-cropped, which loses only a thin strip. Batches are formed within a bucket so
every batch stacks into one tensor.

For `resolution=512` the buckets include 512x512, 448x576, 384x640, 320x768, 256x1024 and their transposes;
for 1024 they include SDXL's 1024x1024, 896x1152, 832x1216, 768x1344 and 640x1536.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

BUCKET_STEP = 64
MAX_ASPECT_RATIO = 4.0


def make_buckets(
    resolution: int, step: int = BUCKET_STEP, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> list[tuple[int, int]]:
    """The buckets (height, width) for `resolution`: sides divisible by `step`, area <= `resolution ** 2`.

    For each height that is a multiple of `step`, the widest width that keeps the area within `resolution ** 2`
    (and the transpose), keeping aspect ratios up to `max_aspect_ratio`. Sorted by height.
    """
    if resolution < step or resolution % step:
        raise ValueError(
            f"Aspect-ratio buckets need a resolution divisible by {step} (bucket sides are multiples of {step}), "
            f"got {resolution}. Use e.g. --resolution {max(step, resolution // step * step)}."
        )
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for height in range(step, area // step + 1, step):
        width = area // height // step * step
        if width < step:
            break
        if max(height, width) / min(height, width) <= max_aspect_ratio:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets)


def closest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `height` x `width`'s (ties go to the larger bucket)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size must be positive, got {height}x{width}.")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - log_aspect), -b[0] * b[1], b))


def upscale_needed(height: int, width: int, target: tuple[int, int]) -> float:
    """How much an image must be enlarged to cover `target` (height, width); <= 1 means it is only shrunk."""
    return max(target[0] / height, target[1] / width)


def _rng(seed: int, epoch: int) -> random.Random:
    # A string seed is hashed by `random` with SHA-512: independent streams per (seed, epoch), same on every run.
    return random.Random(f"bucket-batch-sampler:{seed}:{epoch}")


class BucketBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices in which all samples share one bucket.

    Args:
        dataset: anything with a `sample_buckets` attribute (one hashable bucket per sample, as
            `diffusers_vae_ext.cache.LatentCacheDataset` has), or that sequence itself.
        batch_size (`int`): samples per batch.
        shuffle (`bool`, defaults to `True`): shuffle samples within each bucket and the order of the batches,
            differently each epoch (see `set_epoch`) and deterministically for a given (`seed`, epoch).
        seed (`int`, defaults to 0): base seed of the shuffling.
        drop_last (`bool`, defaults to `False`): drop each bucket's last, incomplete batch.

    Every sample appears exactly once per epoch (or is in a dropped incomplete batch with `drop_last=True`).
    Under `accelerate`, `accelerator.prepare(DataLoader(dataset, batch_sampler=sampler))` shards the batches
    across processes.
    """

    def __init__(
        self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        sample_buckets: Sequence[Hashable] = getattr(dataset, "sample_buckets", dataset)
        self.groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(sample_buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffling of `epoch` for the next iteration."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = _rng(self.seed, self.epoch)
        batches = []
        # Buckets in a fixed order, so the draws do not depend on the order samples were listed in.
        for bucket in sorted(self.groups, key=repr):
            indices = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self.groups.values())
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())
