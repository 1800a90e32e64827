"""Clips: which frames of a video make each training clip (a pure function of the probe and the options)."""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .probe import DEFAULT_SEQUENCE_FPS, VideoError, VideoInfo, probe


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from a video (the `--num_frames`, `--frame_stride`/`--fps`, ... options).

    Args:
        num_frames: frames per clip. None: as many as the video has (after sampling), at most `max_frames`,
            rounded down to a count the autoencoder encodes exactly (a frame bucket).
        frame_stride: take every `frame_stride`-th frame (by index). Exclusive with `fps`.
        fps: resample to this frame rate by timestamp: at each time `j / fps` the frame on screen is taken (a
            frame repeats when `fps` is above the source's). Needed for variable-frame-rate files.
        max_frames: upper bound on the frames of a clip when `num_frames` is None.
        clips_per_video: up to this many non-overlapping clips per video, spread evenly over it (first clip at
            the start, last at the end). Fewer when the video is too short for them all.
        sequence_fps: frame rate of image sequences (folders of images).
    """

    num_frames: int | None = None
    frame_stride: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    clips_per_video: int = 1
    sequence_fps: float = DEFAULT_SEQUENCE_FPS

    def __post_init__(self) -> None:
        for name in ("num_frames", "frame_stride", "max_frames", "clips_per_video"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}.")
        if self.frame_stride is not None and self.fps is not None:
            raise ValueError("Give --frame_stride or --fps, not both.")
        for name in ("fps", "sequence_fps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name} must be a positive number, got {value!r}.")

    def check(self, frame_multiple: int = 1, class_name: str = "this autoencoder") -> None:
        """Refuse a `num_frames` (or a `max_frames` below the smallest clip) the autoencoder cannot encode."""
        if self.num_frames is not None and (self.num_frames - 1) % frame_multiple:
            lower = (self.num_frames - 1) // frame_multiple * frame_multiple + 1
            raise ValueError(
                f"--num_frames {self.num_frames} is not a frame count {class_name} encodes: it needs "
                f"{frame_multiple}k + 1 frames. Use --num_frames {lower} or {lower + frame_multiple}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VideoClip:
    """One clip of a video: which frames, when, at what rate, from what source. Pure data (JSON-friendly).

    Attributes:
        clip_id: `"<video_id>:clip<k>"`, stable for the same file and options.
        source: the video file or image-sequence folder.
        index: k, the clip's position among its video's clips.
        frame_indices: source frame index of each clip frame (repeats when resampling to a higher fps).
        timestamps: source presentation time of each clip frame, seconds from the video's first frame.
        fps: the clip's frame rate (the source's, divided by the stride, or the requested `fps`).
        source_fps: the source's frame rate.
        source_size: (width, height) of the source frames.
        frame_pts: the frames' timestamps in the stream's time base (video files), to find them when decoding.
        frame_files: the image files of the frames (image sequences).
    """

    clip_id: str
    source: str
    index: int
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    fps: float
    source_fps: float
    source_size: tuple[int, int]
    frame_pts: tuple[int, ...] = field(default=(), repr=False)
    frame_files: tuple[str, ...] = field(default=(), repr=False)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["source_size"] = list(self.source_size)
        return record


def _sampled_indices(info: VideoInfo, options: ClipOptions) -> tuple[list[int], float]:
    """Source frame indices after `frame_stride` / `fps` sampling, and the resulting frame rate."""
    if options.fps is not None:
        times = info.timestamps
        # A frame is on screen from its timestamp to the next one's; the last one for an average interval.
        end = info.duration
        step = 1.0 / options.fps
        count = int(math.floor(end / step + 1e-9))
        indices = [max(bisect.bisect_right(times, j * step + 1e-9) - 1, 0) for j in range(count)]
        return indices, float(options.fps)
    if info.variable_frame_rate:
        raise VideoError(
            info.path,
            "variable_frame_rate",
            "variable frame rate (frame intervals from "
            f"{min(np.diff(info.timestamps)) * 1000:.1f} to {max(np.diff(info.timestamps)) * 1000:.1f} ms): "
            "pass --fps to resample it by time",
        )
    stride = options.frame_stride or 1
    return list(range(0, info.num_frames, stride)), info.fps / stride


def plan_clips(
    info: VideoInfo, options: ClipOptions, frame_multiple: int = 1, video_id: str | None = None
) -> list[VideoClip]:
    """The clips `options` cut from the video described by `info` (pure: no file is read).

    Args:
        info: from `probe_video` / `probe_image_sequence`.
        options: see `ClipOptions`.
        frame_multiple: clips have `frame_multiple * k + 1` frames (`AutoencoderAdapter.frame_multiple`; 1 for
            image autoencoders: any count).
        video_id: prefix of the clip ids (default: `info.path`).

    Raises `VideoError` (`"too_short"`, `"variable_frame_rate"`) when the video cannot give one clip, and
    `ValueError` when `options.num_frames` breaks `frame_multiple`.
    """
    options.check(frame_multiple)
    indices, fps = _sampled_indices(info, options)
    available = len(indices)
    if options.num_frames is not None:
        length = options.num_frames
    else:
        cap = min(available, options.max_frames or available)
        length = (cap - 1) // frame_multiple * frame_multiple + 1 if cap >= 1 else 0
    sampling = ""
    if options.frame_stride not in (None, 1):
        sampling = f" with --frame_stride {options.frame_stride}"
    elif options.fps is not None:
        sampling = f" at --fps {options.fps:g}"
    if length < 1 or available < length:
        raise VideoError(
            info.path,
            "too_short",
            f"{available} frames{sampling}, fewer than the {length or 1} a clip needs"
            + (f" (--num_frames {options.num_frames})" if options.num_frames is not None else ""),
        )
    count = min(options.clips_per_video, available // length)
    starts = [0] if count == 1 else [round(k * (available - length) / (count - 1)) for k in range(count)]
    video_id = info.path if video_id is None else video_id
    clips = []
    for k, start in enumerate(starts):
        chosen = indices[start : start + length]
        clips.append(
            VideoClip(
                clip_id=f"{video_id}:clip{k}",
                source=info.path,
                index=k,
                frame_indices=tuple(chosen),
                timestamps=tuple(info.timestamps[i] for i in chosen),
                fps=fps,
                source_fps=info.fps,
                source_size=(info.width, info.height),
                frame_pts=tuple(info.frame_pts[i] for i in chosen) if info.frame_pts else (),
                frame_files=tuple(info.frame_files[i] for i in chosen) if info.frame_files else (),
            )
        )
    return clips


def clips_from_file(
    source: str | os.PathLike, options: ClipOptions, frame_multiple: int = 1, video_id: str | None = None
) -> list[VideoClip]:
    """Probe a video file or image-sequence folder and plan its clips: the unit of work of a video cache."""
    return plan_clips(probe(source, options.sequence_fps), options, frame_multiple, video_id)
