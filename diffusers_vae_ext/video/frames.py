"""Decoding a clip's frames (PyAV, or the image files of a sequence) into arrays and [-1, 1] tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import UnreadableImageError, load_image_rgb, resize_and_crop
from .clips import VideoClip
from .probe import VideoError, import_av


def _decode_pts(path: str, wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """RGB frames (H, W, 3) uint8 of the given presentation timestamps, decoded from the keyframe before them."""
    av = import_av()
    targets = set(wanted)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first, last = min(targets), max(targets)
            if first > 0:
                container.seek(first, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if frame.pts in targets and frame.pts not in frames:
                    frames[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts >= last and len(frames) == len(targets):
                    break
    except av.FFmpegError as err:
        raise VideoError(path, "unreadable", f"decoding failed ({err})") from err
    return frames


def read_frames(clip: VideoClip) -> np.ndarray:
    """The clip's frames as a uint8 array (T, H, W, 3), decoded from the source; `VideoError` if that fails."""
    if clip.frame_files:
        images = []
        for file in clip.frame_files:
            try:
                image = load_image_rgb(file)
            except (UnreadableImageError, OSError) as err:
                raise VideoError(clip.source, "unreadable", f"frame {Path(file).name}: {err}") from err
            if image.size != clip.source_size:
                raise VideoError(
                    clip.source,
                    "unreadable",
                    f"frame {Path(file).name} is {image.width}x{image.height}, the sequence is "
                    f"{clip.source_size[0]}x{clip.source_size[1]}",
                )
            images.append(np.asarray(image))
        return np.stack(images)
    decoded = _decode_pts(clip.source, clip.frame_pts)
    missing = [i for i, p in zip(clip.frame_indices, clip.frame_pts) if p not in decoded]
    if missing:
        raise VideoError(
            clip.source, "unreadable", f"frames {missing[:5]}{' ...' if len(missing) > 5 else ''} could not be decoded"
        )
    return np.stack([decoded[p] for p in clip.frame_pts])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 video (3, T, H, W) in [-1, 1] (the layout video VAEs take)."""
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants writable memory
        frames = frames.copy()
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """Video (C, T, H, W) in [-1, 1] -> uint8 frames (T, H, W, C) (values outside the range are clipped)."""
    array = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    return array.permute(1, 2, 3, 0).numpy()


def load_clip(clip: VideoClip, size: tuple[int, int] | None = None, center_crop: bool = True) -> torch.Tensor:
    """Decode a clip into a float32 video (3, T, H, W) in [-1, 1].

    `size` = (height, width) resizes each frame to cover it and crops (see `data.resize_and_crop`); None keeps
    the source size.
    """
    frames = read_frames(clip)
    if size is not None and tuple(size) != frames.shape[1:3]:
        frames = np.stack(
            [np.asarray(resize_and_crop(Image.fromarray(f), tuple(size), center_crop)[0]) for f in frames]
        )
    return frames_to_tensor(frames)
