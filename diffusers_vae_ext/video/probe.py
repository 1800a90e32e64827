"""Probing videos and image sequences: frame timestamps, size, frame rate, variable-frame-rate detection."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import IMAGE_EXTENSIONS
from ..optional import require

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
DEFAULT_SEQUENCE_FPS = 24.0
# Frame intervals that differ from the median by more than this fraction (and by more than one tick of the
# container's clock) make a file variable-frame-rate.
VFR_TOLERANCE = 0.05


def import_av():
    """The PyAV module, or a `MissingDependencyError` (an ImportError) naming the pip command."""
    return require("av", "reading and writing videos (PyAV)")


class VideoError(ValueError):
    """A video file or image sequence that cannot give a clip; `kind` and `reason` say why.

    Kinds: `"unreadable"` (missing, zero-byte, corrupt, truncated), `"no_video_stream"` (e.g. audio-only),
    `"too_short"` (fewer frames than a clip needs), `"variable_frame_rate"` (frames at uneven times and no
    `fps` given to resample them by time).
    """

    def __init__(self, path: str | os.PathLike, kind: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What a clip planner needs to know about one video file or image sequence (no pixels decoded).

    Attributes:
        path: the file, or the folder of an image sequence.
        width, height: frame size in pixels.
        num_frames: frames in presentation order.
        fps: frame rate (the stream's rate when the frames are evenly spaced, else frames per second on average).
        timestamps: presentation time of each frame in seconds, the first frame at 0.0.
        variable_frame_rate: the frame intervals are uneven (see `VFR_TOLERANCE`).
        codec: the video codec's name (`"image_sequence"` for a folder of images).
        frame_pts: each frame's presentation timestamp in the stream's time base (video files; used to find
            frames when decoding).
        frame_files: the image files of an image sequence.
    """

    path: str
    width: int
    height: int
    num_frames: int
    fps: float
    timestamps: tuple[float, ...]
    variable_frame_rate: bool
    codec: str
    frame_pts: tuple[int, ...] = ()
    frame_files: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one (at the average frame interval)."""
        return self.timestamps[-1] + 1.0 / self.fps if self.timestamps else 0.0

    @property
    def is_image_sequence(self) -> bool:
        return bool(self.frame_files)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _is_variable(intervals: np.ndarray, tick: float) -> bool:
    if len(intervals) < 2:
        return False
    median = float(np.median(intervals))
    return float(np.abs(intervals - median).max()) > max(VFR_TOLERANCE * median, 1.5 * tick)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video file's frame timestamps and size (demuxing only, no decoding); `VideoError` if unusable."""
    av = import_av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "unreadable", "no such file")
    if path.stat().st_size == 0:
        raise VideoError(path, "unreadable", "empty (zero-byte) file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                if container.streams.audio:
                    raise VideoError(path, "no_video_stream", "audio-only file: it has no video stream")
                raise VideoError(path, "unreadable", "no streams found (a truncated file, or not a video)")
            stream = container.streams.video[0]
            pts = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
            width, height = stream.codec_context.width, stream.codec_context.height
            time_base = stream.time_base
            rate = stream.average_rate
            codec = stream.codec_context.name
    except av.FFmpegError as err:
        raise VideoError(path, "unreadable", f"corrupt or unsupported video ({err})") from err
    if not pts or not width or not height:
        raise VideoError(path, "unreadable", "the video stream holds no frames")
    times = np.array([(p - pts[0]) * time_base for p in pts], dtype=np.float64)
    intervals = np.diff(times)
    variable = _is_variable(intervals, float(time_base))
    fps = float(rate) if rate else 0.0
    if len(times) > 1:
        measured = (len(times) - 1) / float(times[-1]) if times[-1] > 0 else 0.0
        # The container's rate is exact for constant-rate files (24, 30000/1001); trust it when it agrees.
        if variable or not fps or abs(fps - measured) > 0.02 * measured:
            fps = measured
    if not fps or not math.isfinite(fps):
        fps = DEFAULT_SEQUENCE_FPS
    return VideoInfo(
        path=str(path),
        width=int(width),
        height=int(height),
        num_frames=len(pts),
        fps=fps,
        timestamps=tuple(float(t) for t in times),
        variable_frame_rate=variable,
        codec=codec,
        frame_pts=tuple(int(p) for p in pts),
    )


def probe_image_sequence(folder: str | os.PathLike, fps: float = DEFAULT_SEQUENCE_FPS) -> VideoInfo:
    """A folder of images as one video at `fps`, frames in natural name order (`2.png` before `10.png`).

    The first frame sets the size; `load_clip` refuses frames of another size.
    """
    folder = Path(folder)
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key
    )
    if not files:
        raise VideoError(folder, "unreadable", f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    try:
        with Image.open(files[0]) as first:
            width, height = first.size
    except (OSError, SyntaxError) as err:
        raise VideoError(folder, "unreadable", f"{files[0].name}: not an image PIL can read") from err
    return VideoInfo(
        path=str(folder),
        width=width,
        height=height,
        num_frames=len(files),
        fps=float(fps),
        timestamps=tuple(i / fps for i in range(len(files))),
        variable_frame_rate=False,
        codec="image_sequence",
        frame_files=tuple(str(p) for p in files),
    )


def probe(source: str | os.PathLike, sequence_fps: float = DEFAULT_SEQUENCE_FPS) -> VideoInfo:
    """`probe_image_sequence` for a folder, `probe_video` for a file."""
    return probe_image_sequence(source, sequence_fps) if Path(source).is_dir() else probe_video(source)


def list_videos(root: str | os.PathLike) -> list[Path]:
    """Video files (`VIDEO_EXTENSIONS`) and image-sequence folders under `root`, sorted.

    A folder is an image sequence when it directly holds image files and no video files. `root` itself counts
    as one only when it holds images and nothing else that is listed. Raises `FileNotFoundError` for a missing
    folder and `ValueError` when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Video folder {str(root)!r} does not exist or is not a directory.")
    found: list[Path] = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        files = [p for p in folder.iterdir() if p.is_file()]
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
        found.extend(videos)
        if not videos and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            found.append(folder)
    if not found:
        raise ValueError(
            f"No videos ({', '.join(VIDEO_EXTENSIONS)}) or image-sequence folders found in {str(root)!r}."
        )
    return sorted(found)


def has_videos(root: str | os.PathLike) -> bool:
    """Whether a folder holds video files (`VIDEO_EXTENSIONS`) anywhere below it: then it is read as videos."""
    return any(p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS for p in Path(root).rglob("*"))
