"""The plan inside one unit: which samples a source item becomes, and which samples share a batch.

Both steps are pure functions of the unit's items in order, so every engine, every process and every retry of a
unit encodes the same samples in the same batches (and the stored tensors do not depend on who encoded them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..buckets import closest_bucket, upscale_needed
from .format import FLIP_SUFFIX, CacheSettings


@dataclass(frozen=True)
class PlannedSample:
    """One sample to encode.

    Args:
        id: `<item label>@<content hash>`, plus `:flip` for the mirrored copy.
        source: the item's label (relative path, `row<N>`, `<tar>/<key>`, `<file>/row<N>`).
        position: the item's position in its unit (orders records and skips).
        flip: the mirrored copy of the image.
        bucket: the target (height, width); for a video clip (frames, height, width), so a batch holds clips of
            one frame count.
        caption: the caption at encode time.
    """

    id: str
    source: str
    position: int
    flip: bool
    bucket: tuple[int, int]
    caption: str


def choose_bucket(
    height: int, width: int, settings: CacheSettings, frames: bool = False
) -> tuple[tuple[int, int], str | None]:
    """The bucket (height, width) an image, or a clip's `frames`, of this size is cached at, and the reason it is
    skipped as too small (None when it is not): covering the bucket would enlarge it more than `max_upscale`."""
    bucket = closest_bucket(height, width, settings.bucket_list())
    upscale = upscale_needed(height, width, bucket)
    if upscale <= settings.max_upscale:
        return bucket, None
    return bucket, (
        f"too small: {width}x{height} px{' frames' if frames else ''} would need {upscale:.2f}x upscaling to cover "
        f"{bucket[1]}x{bucket[0]} (limit max_upscale={settings.max_upscale})"
    )


def expand_image(
    base_id: str, label: str, caption: str, position: int, bucket: tuple[int, int], flip: bool
) -> list[PlannedSample]:
    """The samples one source image becomes: itself and, with `flip`, its mirrored copy.

    With `expand_clip` the one place that maps a source item to samples.
    """
    variants = (False, True) if flip else (False,)
    return [
        PlannedSample(base_id + (FLIP_SUFFIX if f else ""), label, position, f, tuple(bucket), caption)
        for f in variants
    ]


def expand_clip(
    video_id: str, label: str, clip: int, caption: str, position: int, bucket: tuple[int, int, int], flip: bool
) -> list[PlannedSample]:
    """The samples clip `clip` of a video becomes: `<label>#clip<k>@<content hash>` (and its mirrored copy).

    Args:
        video_id: `<label>@<content hash>` of the video file (or image sequence).
        bucket: (frames, height, width).
    """
    label_part, _, digest = video_id.rpartition("@")
    base_id = f"{label_part}#clip{clip}@{digest}"
    variants = (False, True) if flip else (False,)
    return [
        PlannedSample(base_id + (FLIP_SUFFIX if f else ""), label, position, f, tuple(bucket), caption)
        for f in variants
    ]


def skip_entry(sample_id: str | None, source: str, kind: str, reason: str, position: int) -> dict[str, Any]:
    """A `skipped.jsonl` row (`_order` sorts a unit's skips by input position; it is dropped when written)."""
    return {"id": sample_id, "source": source, "kind": kind, "reason": reason, "_order": [position, sample_id or ""]}


class BucketBatcher:
    """Batches of one bucket each, in a fixed order, with at most `batch_size - 1` samples per bucket held back.

    Each bucket's samples are cut, in arrival order, into consecutive batches of `batch_size`: a batch is emitted as
    soon as it is full, and `flush` emits the short remainders in bucket order. The composition of every batch is
    exactly that of "group the unit's samples by bucket, then cut", without holding the whole unit in memory.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.pending: dict[tuple[int, int], list[tuple[PlannedSample, Any]]] = {}

    def add(self, sample: PlannedSample, payload: Any) -> list[tuple[PlannedSample, Any]] | None:
        """Queue a sample (with what decoding it needs); returns the bucket's batch when it is full."""
        group = self.pending.setdefault(sample.bucket, [])
        group.append((sample, payload))
        if len(group) == self.batch_size:
            return self.pending.pop(sample.bucket)
        return None

    def flush(self) -> list[list[tuple[PlannedSample, Any]]]:
        """The incomplete batches, one per bucket, in bucket order."""
        batches = [self.pending[bucket] for bucket in sorted(self.pending)]
        self.pending = {}
        return batches
