"""Videos in and out: probing with PyAV, frame timestamps, clip selection, frames as tensors, mp4/WebP writing.

Reading goes through PyAV (`av`, the `[video]` extra), which bundles FFmpeg's decoders and reports every frame's
presentation timestamp, so variable-frame-rate files are handled by time, not by frame count. Folders of images
(`frame_0001.png`, ...) are image sequences: one video each, frames in natural name order.

Turning a file into training clips is a pure function of the file and `ClipOptions` (`clips_from_file`): it
returns `VideoClip`s with stable ids, the source frame indices and timestamps, the clip's frame rate and the source
size, without decoding a pixel; `load_clip` then decodes exactly those frames. Files that cannot give a clip
raise `VideoError` with a `kind` (`"unreadable"`, `"no_video_stream"`, `"too_short"`, `"variable_frame_rate"`)
and a reason, so callers can skip them and list why.

Frame counts: video autoencoders compress time causally and encode `m * k + 1` frames (Wan, HunyuanVideo: m = 4;
LTX-Video, CogVideoX: m = 8; image autoencoders: any count). `frame_multiple` passes that rule in
(`AutoencoderAdapter.frame_multiple`); a `--num_frames` that breaks it is refused before any file is read.

`pan_zoom_frames` / `write_pan_zoom_video` make real test videos: a camera panning and zooming over one of the
built-in photographs (scikit-image), written with the same library that reads them back.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, UnreadableImageError, load_image_rgb, resize_and_crop

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
OUTPUT_FORMATS = ("mp4", "webp")
DEFAULT_SEQUENCE_FPS = 24.0
# Frame intervals that differ from the median by more than this fraction (and by more than one tick of the
# container's clock) make a file variable-frame-rate.
VFR_TOLERANCE = 0.05


def import_av():
    """The PyAV module, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is in the [video] extra and the CI install
        raise ImportError("Reading and writing videos needs PyAV: pip install 'diffusers-vae-ext[video]'") from err
    return av


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


# ===================================================================================================== probing


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


# ===================================================================================================== clips


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


# ===================================================================================================== decoding


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


# ===================================================================================================== writing


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
) -> Path:
    """Write frames to `.mp4`/`.mov`/`.mkv` (H.264), `.webm` (VP9) or `.webp` (animated WebP).

    Args:
        path: output file; the suffix picks the format.
        video: uint8 frames (T, H, W, 3), or a float tensor (C, T, H, W) in [-1, 1].
        fps: frame rate (ignored for the frame times when `timestamps` is given).
        timestamps: per-frame presentation times in seconds, increasing, for a variable-frame-rate file
            (millisecond clock). Not for WebP.
        quality: H.264 CRF / VP9 CRF (lower is better; 18 is visually lossless). WebP is written lossless.

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


# ===================================================================================================== test videos


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
        from .data import sample_photos

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
    """Write `pan_zoom_frames(photo, num_frames, size, **camera)` to `path` with PyAV; returns the frames."""
    frames = pan_zoom_frames(photo, num_frames, size, **camera)
    write_video(path, frames, fps, timestamps=timestamps)
    return frames
