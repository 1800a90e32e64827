"""Videos: real pan-and-zoom videos over photos written with PyAV and read back; clip selection; bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'diffusers-vae-ext[video]')")

from diffusers_vae_ext.video import (  # noqa: E402
    ClipOptions,
    VideoError,
    clips_from_file,
    frames_to_tensor,
    list_videos,
    load_clip,
    pan_zoom_frames,
    plan_clips,
    probe,
    probe_video,
    read_frames,
    read_webp_frames,
    tensor_to_frames,
    write_pan_zoom_video,
    write_video,
)

VFR_TIMES = [0.0, 0.04, 0.08, 0.2, 0.24, 0.5, 0.54, 0.58, 0.62]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A constant-rate mp4, a variable-rate mkv, a webm, an image sequence and broken files, with their frames."""
    root = tmp_path_factory.mktemp("videos")
    out = {"root": root}
    out["mp4_frames"] = write_pan_zoom_video(root / "astronaut.mp4", "astronaut", num_frames=17, size=(48, 64))
    out["vfr_frames"] = write_pan_zoom_video(
        root / "vfr.mkv", "coffee", num_frames=len(VFR_TIMES), size=(32, 32), timestamps=VFR_TIMES
    )
    write_pan_zoom_video(root / "chelsea.webm", "chelsea", num_frames=9, size=(32, 32), fps=30)
    sequence = root / "sequence"
    sequence.mkdir()
    out["sequence_frames"] = pan_zoom_frames("rocket", num_frames=11, size=(32, 32))
    for i, frame in enumerate(out["sequence_frames"]):
        Image.fromarray(frame).save(sequence / f"frame_{i + 1}.png")  # frame_2 sorts before frame_10
    broken = root / "broken"
    broken.mkdir()
    (broken / "zero.mp4").write_bytes(b"")
    (broken / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    data = (root / "astronaut.mp4").read_bytes()
    (broken / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with av.open(str(broken / "audio.mp4"), "w") as container:  # a real audio-only file
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    out["broken"] = broken
    return out


def test_probe_and_read_back_a_real_video(videos):
    info = probe_video(videos["root"] / "astronaut.mp4")
    assert (info.width, info.height, info.num_frames, info.fps, info.codec) == (64, 48, 17, 24.0, "h264")
    assert not info.variable_frame_rate
    np.testing.assert_allclose(info.timestamps, np.arange(17) / 24, atol=1e-3)
    (clip,) = plan_clips(info, ClipOptions())
    frames = read_frames(clip)
    source = videos["mp4_frames"]
    assert frames.shape == source.shape == (17, 48, 64, 3)
    # Lossy H.264 (CRF 18, 4:2:0 chroma) on a tiny detailed frame; each frame is closest to its own source.
    assert min(psnr(a, b) for a, b in zip(frames, source)) > 26
    for i in (1, 8, 15):
        assert psnr(frames[i], source[i]) > max(psnr(frames[i], source[i - 1]), psnr(frames[i], source[i + 1]))


def test_clips_are_non_overlapping_stable_and_respect_the_frame_rule(videos):
    path = videos["root"] / "astronaut.mp4"
    options = ClipOptions(num_frames=5, clips_per_video=3)
    clips = clips_from_file(path, options, frame_multiple=4, video_id="astronaut")
    assert [c.clip_id for c in clips] == ["astronaut:clip0", "astronaut:clip1", "astronaut:clip2"]
    assert [c.frame_indices for c in clips] == [(0, 1, 2, 3, 4), (6, 7, 8, 9, 10), (12, 13, 14, 15, 16)]
    assert clips == clips_from_file(path, options, frame_multiple=4, video_id="astronaut")  # a pure function
    assert clips[1].source_size == (64, 48) and clips[1].fps == 24.0
    assert clips[1].to_dict()["timestamps"] == pytest.approx([i / 24 for i in range(6, 11)], abs=1e-3)

    # More clips than fit: as many as fit, without overlap.
    assert len(clips_from_file(path, ClipOptions(num_frames=9, clips_per_video=5), 4)) == 1
    # Stride and resampling by time agree on a constant-rate file.
    by_stride = clips_from_file(path, ClipOptions(num_frames=5, frame_stride=2), 4)[0]
    by_fps = clips_from_file(path, ClipOptions(num_frames=5, fps=12), 4)[0]
    assert by_stride.frame_indices == by_fps.frame_indices == (0, 2, 4, 6, 8)
    assert by_stride.fps == by_fps.fps == 12.0
    # No --num_frames: the largest valid count, capped by --max_frames (a frame bucket).
    assert clips_from_file(path, ClipOptions(max_frames=12), 4)[0].num_frames == 9
    assert clips_from_file(path, ClipOptions(), 8)[0].num_frames == 17
    assert clips_from_file(path, ClipOptions(max_frames=12), 1)[0].num_frames == 12

    with pytest.raises(
        ValueError, match=r"--num_frames 8 is not a frame count .* 4k \+ 1 frames\. Use --num_frames 5 or 9"
    ):
        clips_from_file(path, ClipOptions(num_frames=8), 4)
    with pytest.raises(ValueError, match="not both"):
        ClipOptions(frame_stride=2, fps=12)
    with pytest.raises(ValueError, match="--clips_per_video must be a positive integer"):
        ClipOptions(clips_per_video=0)


def test_a_video_shorter_than_a_clip_is_a_listed_skip(videos):
    path = videos["root"] / "astronaut.mp4"
    with pytest.raises(VideoError, match=r"17 frames, fewer than the 33 a clip needs \(--num_frames 33\)") as err:
        clips_from_file(path, ClipOptions(num_frames=33), 4)
    assert err.value.kind == "too_short"
    with pytest.raises(VideoError, match="9 frames with --frame_stride 2, fewer than the 13"):
        clips_from_file(path, ClipOptions(num_frames=13, frame_stride=2), 4)


def test_variable_frame_rate_needs_fps_and_is_resampled_by_time(videos):
    path = videos["root"] / "vfr.mkv"
    info = probe_video(path)
    assert info.variable_frame_rate and info.num_frames == len(VFR_TIMES)
    np.testing.assert_allclose(info.timestamps, VFR_TIMES, atol=1e-3)
    with pytest.raises(VideoError, match="variable frame rate .* pass --fps") as err:
        plan_clips(info, ClipOptions(num_frames=5))
    assert err.value.kind == "variable_frame_rate"
    with pytest.raises(VideoError, match="variable frame rate"):
        plan_clips(info, ClipOptions(num_frames=5, frame_stride=2))  # a stride does not even out the timing
    (clip,) = plan_clips(info, ClipOptions(num_frames=5, fps=10))
    # At t = 0, 0.1, 0.2, 0.3, 0.4 s the frames on screen are those shown at 0, 0.08, 0.2, 0.24, 0.24 s.
    assert clip.frame_indices == (0, 2, 3, 4, 4) and clip.fps == 10.0
    frames = read_frames(clip)
    source = videos["vfr_frames"]
    assert all(psnr(frame, source[i]) > 26 for frame, i in zip(frames, clip.frame_indices))


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("zero.mp4", "unreadable", "zero-byte"),
        ("noise.mp4", "unreadable", "corrupt or unsupported video"),
        ("truncated.mp4", "unreadable", "truncated"),
        ("audio.mp4", "no_video_stream", "audio-only file"),
        ("missing.mp4", "unreadable", "no such file"),
    ],
)
def test_broken_files_raise_a_video_error_saying_why(videos, name, kind, message):
    with pytest.raises(VideoError, match=message) as err:
        clips_from_file(videos["broken"] / name, ClipOptions(num_frames=5))
    assert err.value.kind == kind and err.value.path.endswith(name)


def test_image_sequences_are_videos_in_natural_order(videos):
    folder = videos["root"] / "sequence"
    info = probe(folder, sequence_fps=12)
    assert info.is_image_sequence and info.num_frames == 11 and info.fps == 12.0
    assert [p.split("/")[-1] for p in info.frame_files[:3]] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    (clip,) = clips_from_file(folder, ClipOptions(num_frames=5, frame_stride=2, sequence_fps=12), 4)
    assert clip.frame_indices == (0, 2, 4, 6, 8) and clip.fps == 6.0
    expected = frames_to_tensor(videos["sequence_frames"][[0, 2, 4, 6, 8]])
    assert torch.equal(load_clip(clip), expected)  # PNG frames are lossless
    resized = load_clip(clip, size=(16, 24))
    assert resized.shape == (3, 5, 16, 24)


def test_list_videos_finds_files_and_sequence_folders(videos, tmp_path):
    found = {p.name for p in list_videos(videos["root"])}
    assert {"astronaut.mp4", "vfr.mkv", "chelsea.webm", "sequence"} <= found
    webm = probe_video(videos["root"] / "chelsea.webm")
    assert (webm.codec, webm.num_frames, webm.fps) == ("vp9", 9, 30.0)
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(ValueError, match="No videos"):
        list_videos(tmp_path)


def test_writing_webp_and_odd_sized_mp4(videos, tmp_path):
    frames = videos["sequence_frames"][:5]
    write_video(tmp_path / "clip.webp", frames, fps=8)
    np.testing.assert_array_equal(read_webp_frames(tmp_path / "clip.webp"), frames)  # lossless
    odd = pan_zoom_frames("chelsea", num_frames=5, size=(33, 47))
    write_video(tmp_path / "odd.mp4", frames_to_tensor(odd), fps=8)  # a (C, T, H, W) tensor in [-1, 1]
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.num_frames) == (48, 34, 5)  # H.264 4:2:0 needs even sides: edge-padded
    (clip,) = plan_clips(info, ClipOptions())
    assert psnr(read_frames(clip)[:, :33, :47], odd) > 26
    assert np.array_equal(tensor_to_frames(frames_to_tensor(odd)), odd)
