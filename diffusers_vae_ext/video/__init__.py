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

from .clips import ClipOptions, VideoClip, clips_from_file, plan_clips
from .frames import frames_to_tensor, load_clip, read_frames, tensor_to_frames
from .probe import (
    DEFAULT_SEQUENCE_FPS,
    VFR_TOLERANCE,
    VIDEO_EXTENSIONS,
    VideoError,
    VideoInfo,
    import_av,
    list_videos,
    probe,
    probe_image_sequence,
    probe_video,
)
from .writing import OUTPUT_FORMATS, pan_zoom_frames, read_webp_frames, write_pan_zoom_video, write_video

__all__ = [
    "DEFAULT_SEQUENCE_FPS",
    "OUTPUT_FORMATS",
    "VFR_TOLERANCE",
    "VIDEO_EXTENSIONS",
    "ClipOptions",
    "VideoClip",
    "VideoError",
    "VideoInfo",
    "clips_from_file",
    "frames_to_tensor",
    "import_av",
    "list_videos",
    "load_clip",
    "pan_zoom_frames",
    "plan_clips",
    "probe",
    "probe_image_sequence",
    "probe_video",
    "read_frames",
    "read_webp_frames",
    "tensor_to_frames",
    "write_pan_zoom_video",
    "write_video",
]
