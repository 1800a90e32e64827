"""The plan: which samples go into which batch and which shard, the same however many processes run it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .format import FLIP_SUFFIX


@dataclass(frozen=True)
class PlannedSample:
    id: str
    index: int
    source: str
    content_hash: str
    flip: bool
    bucket: tuple[int, int]
    caption: str


@dataclass
class PlannedShard:
    name: str
    batches: list[list[PlannedSample]]


def expected_samples(records: list[dict[str, Any]], flip: bool) -> list[PlannedSample]:
    """Every sample the cache should hold, in source order (original, then its mirrored copy)."""
    samples = []
    for record in records:
        if record["skip"] is None:
            for flipped in (False, True) if flip else (False,):
                samples.append(
                    PlannedSample(
                        id=record["id"] + (FLIP_SUFFIX if flipped else ""),
                        index=record["index"],
                        source=record["source"],
                        content_hash=record["hash"],
                        flip=flipped,
                        bucket=tuple(record["bucket"]),
                        caption=record["caption"],
                    )
                )
    return samples


def plan_shards(
    samples: list[PlannedSample], done: set[str], batch_size: int, batches_per_shard: int
) -> list[PlannedShard]:
    """Batches within buckets, then shards of whole batches, over the samples not yet done.

    Each bucket's samples (in source order) are cut into consecutive batches. Complete shards hold whole
    batches, and only a bucket's last batch can be short, so removing finished batches and cutting again gives
    the same remaining batches: a resumed run encodes every sample in the same batch as an uninterrupted one.
    """
    by_bucket: dict[tuple[int, int], list[PlannedSample]] = {}
    for sample in samples:
        if sample.id not in done:
            by_bucket.setdefault(sample.bucket, []).append(sample)
    batches = [
        group[start : start + batch_size]
        for _, group in sorted(by_bucket.items())
        for start in range(0, len(group), batch_size)
    ]
    shards = []
    for start in range(0, len(batches), batches_per_shard):
        shard_batches = batches[start : start + batches_per_shard]
        ids = "\n".join(s.id for batch in shard_batches for s in batch)
        shards.append(PlannedShard(f"shard-{hashlib.sha256(ids.encode()).hexdigest()[:16]}", shard_batches))
    return shards
