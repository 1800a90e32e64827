"""Videos in a unit of work: a video item becomes its clips (samples), a batch of clips becomes 5-D pixels.

The reader half of a unit (`unit.read_unit`) calls `plan_video` for each video of a `VideoFolderSource` unit and
`decode_clips` for each batch, where it calls `plan_image` / `decode_batch` for images. Clips are cut exactly as
`diffusers-vae stats` cuts them (`video.clips_from_file` with the same `ClipOptions` and the autoencoder's frame
rule); each clip goes to the aspect-ratio bucket of its source size and its frames are centre-cropped to it, so
a batch holds clips of one (frames, height, width). Files that give no clip are skips with the video module's
reason (`unreadable`, `no_video_stream`, `too_short`, `variable_frame_rate`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import to_model_channels
from ..video import VideoClip, VideoError, clips_from_file, prepare_clip
from .context import UnitContext
from .plan import PlannedSample, choose_bucket, expand_clip, skip_entry
from .sources import SourceItem, video_content_hash


def plan_video(
    item: SourceItem, position: int, ctx: UnitContext
) -> tuple[list[tuple[PlannedSample, VideoClip]], list[dict[str, Any]]]:
    """The clips of one video as (sample, clip) pairs, or the skip saying why it gives none."""
    path = item.extra["path"]
    try:
        video_id = f"{item.label}@{video_content_hash(path)}"
    except OSError as err:
        return [], [skip_entry(None, item.label, "unreadable", f"cannot read: {err}", position)]
    try:
        clips = clips_from_file(path, ctx.settings.video, ctx.frame_multiple, video_id)
    except VideoError as err:
        return [], [skip_entry(video_id, item.label, err.kind, err.reason, position)]
    width, height = clips[0].source_size
    bucket, too_small = choose_bucket(height, width, ctx.settings, frames=True)
    if too_small:
        return [], [skip_entry(video_id, item.label, "too_small", too_small, position)]
    planned = []
    for clip in clips:
        samples = expand_clip(
            video_id, item.label, clip.index, item.caption, position, (clip.num_frames, *bucket), ctx.settings.flip
        )
        planned.extend((sample, clip) for sample in samples)
    return planned, []


def clip_record(clip: VideoClip) -> dict[str, Any]:
    """What a clip's index record adds to an image's: where its frames come from and at what rate."""
    return {
        "clip": clip.index,
        "num_frames": clip.num_frames,
        "fps": clip.fps,
        "source_fps": clip.source_fps,
        "frame_indices": list(clip.frame_indices),
        "timestamps": list(clip.timestamps),
    }


def decode_clips(unit: str, batch: list[tuple[PlannedSample, VideoClip]], ctx: UnitContext) -> dict[str, Any]:
    """Decode, (flip,) resize and centre-crop a batch of clips to (B, C, T, H, W); clips that fail are skips."""
    pixels, samples, geometry, extras, failed = [], [], [], [], []
    for sample, clip in batch:
        try:
            video, top_left = prepare_clip(clip, sample.bucket[1:], center_crop=True, flip=sample.flip)
        except VideoError as err:
            failed.append(skip_entry(sample.id, sample.source, err.kind, err.reason, sample.position))
            continue
        except Exception as err:  # a decoder bug on one odd file must not stop a long run; it is reported
            reason = f"{type(err).__name__}: {err}"
            failed.append(skip_entry(sample.id, sample.source, "unreadable", reason, sample.position))
            continue
        pixels.append(to_model_channels(video, ctx.in_channels))
        samples.append(sample)
        width, height = clip.source_size
        geometry.append(((height, width), top_left))
        extras.append(clip_record(clip))
    return {
        "type": "batch",
        "unit": unit,
        "samples": samples,
        "geometry": geometry,
        "extras": extras,
        "pixels": torch.stack(pixels) if pixels else None,
        "failed": failed,
    }
