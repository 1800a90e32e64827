"""Writing videos (H.264 mp4, VP9 webm, animated WebP) and making real test videos from the sample photos."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .frames import tensor_to_frames
from .probe import VIDEO_EXTENSIONS, import_av

OUTPUT_FORMATS = ("mp4", "webp")


def _as_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise ValueError(f"Expected a video tensor (C, T, H, W), got shape {tuple(video.shape)}.")
        frames = tensor_to_frames(video)
    else:
        frames = np.asarray(video)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"Expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}.")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def write_video(
    path: str | os.PathLike,
    video: np.ndarray | torch.Tensor,
    fps: float,
    timestamps: Sequence[float] | None = None,
    quality: int = 18,
    reproducible: bool = False,
) -> Path:
    """Write frames to `.mp4`/`.mov`/`.mkv` (H.264), `.webm` (VP9) or `.webp` (animated WebP).

    Args:
        path: output file; the suffix picks the format.
        video: uint8 frames (T, H, W, 3), or a float tensor (C, T, H, W) in [-1, 1].
        fps: frame rate (ignored for the frame times when `timestamps` is given).
        timestamps: per-frame presentation times in seconds, increasing, for a variable-frame-rate file
            (millisecond clock). Not for WebP.
        quality: H.264 CRF / VP9 CRF (lower is better; 18 is visually lossless). WebP is written lossless.
        reproducible: H.264 only: the same frames always give the same file. x264's adaptive quantisation and
            macroblock tree (both on by default) gave different bitstreams for the same frames from one call to
            the next (4 different files in 6 calls of 64x64 clips, decoded frames 3/255 apart on average, up to
            32/255), so test and benchmark clips made with them differed between runs; this turns both off.

    H.264 in yuv420p needs even sides: an odd last row or column is repeated (padded) to write it.
    """
    frames = _as_frames(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".webp":
        if timestamps is not None:
            raise ValueError("Animated WebP is written at a constant frame rate; drop timestamps.")
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(
            path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, lossless=True
        )
        return path
    if suffix not in VIDEO_EXTENSIONS:
        raise ValueError(f"Cannot write {path.name}: use one of {', '.join(VIDEO_EXTENSIONS)} or .webp.")
    if timestamps is not None and (len(timestamps) != len(frames) or np.any(np.diff(timestamps) <= 0)):
        raise ValueError("timestamps must give one increasing time per frame.")
    av = import_av()
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        if timestamps is None:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        else:
            stream = container.add_stream(codec, rate=1000)
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(quality)} | ({"b": "0"} if codec == "libvpx-vp9" else {})
        if reproducible and codec == "libx264":
            stream.options = stream.options | {"aq-mode": "0", "mbtree": "0"}
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if timestamps is not None:
                frame.pts = round(timestamps[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_webp_frames(path: str | os.PathLike) -> np.ndarray:
    """The frames of an animated WebP (or any multi-frame image PIL reads) as uint8 (T, H, W, 3)."""
    frames = []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames)


def pan_zoom_frames(
    photo: str | Image.Image = "astronaut",
    num_frames: int = 17,
    size: tuple[int, int] = (64, 64),
    zoom: tuple[float, float] = (1.0, 1.6),
    pan: tuple[float, float] = (0.3, 0.2),
) -> np.ndarray:
    """A camera move over a real photograph: uint8 frames (T, H, W, 3).

    Args:
        photo: a built-in photo name (`data.sample_photos`: astronaut, chelsea, coffee, rocket, ...) or an image.
        num_frames: frames to make.
        size: (height, width) of the frames.
        zoom: magnification at the first and last frame (1.0 shows the largest window of the frame's aspect).
        pan: horizontal and vertical travel of the window centre over the clip, as fractions of the photo.
    """
    if isinstance(photo, str):
        from ..data import sample_photos

        photo = sample_photos()[photo]
    height, width = size
    aspect = width / height
    base_w = min(photo.width, photo.height * aspect)
    base_h = base_w / aspect
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        scale = zoom[0] + (zoom[1] - zoom[0]) * t
        window_w, window_h = base_w / scale, base_h / scale
        centre_x = photo.width / 2 + (t - 0.5) * pan[0] * photo.width
        centre_y = photo.height / 2 + (t - 0.5) * pan[1] * photo.height
        left = min(max(centre_x - window_w / 2, 0.0), photo.width - window_w)
        top = min(max(centre_y - window_h / 2, 0.0), photo.height - window_h)
        box = (left, top, left + window_w, top + window_h)
        frames.append(np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC, box=box)))
    return np.stack(frames)


def write_pan_zoom_video(
    path: str | os.PathLike,
    photo: str | Image.Image = "astronaut",
    num_frames: int = 17,
    size: tuple[int, int] = (64, 64),
    fps: float = 24.0,
    timestamps: Sequence[float] | None = None,
    **camera: Any,
) -> np.ndarray:
    """Write `pan_zoom_frames(photo, num_frames, size, **camera)` to `path` with PyAV; returns the frames. The file
    is the same on every call (`write_video(..., reproducible=True)`), so tests and benchmarks see the same clips."""
    frames = pan_zoom_frames(photo, num_frames, size, **camera)
    write_video(path, frames, fps, timestamps=timestamps, reproducible=True)
    return frames
