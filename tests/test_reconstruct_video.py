"""`diffusers-vae reconstruct` for every autoencoder class, on images and on real videos (pan and zoom over photos):
metrics equal an independent computation with the class's own encode/decode and scikit-image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from autoencoder_configs import EXPECTED, VIDEO_CLASSES, build_tiny, own_reconstruction
from conftest import photo_batch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

pytest.importorskip("av", reason="PyAV is not installed (pip install 'diffusers-vae-ext[video]')")

from diffusers_vae_ext.autoencoders import as_autoencoder  # noqa: E402
from diffusers_vae_ext.cli import main  # noqa: E402
from diffusers_vae_ext.reconstruct import reconstruct_images, reconstruct_videos  # noqa: E402
from diffusers_vae_ext.video import (  # noqa: E402
    ClipOptions,
    clips_from_file,
    frames_to_tensor,
    probe_video,
    read_frames,
    read_webp_frames,
    write_pan_zoom_video,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {name: build_tiny(name) for name in EXPECTED}


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon_videos")
    write_pan_zoom_video(root / "astronaut.mp4", "astronaut", num_frames=17, size=(32, 48))
    write_pan_zoom_video(root / "short.mp4", "coffee", num_frames=4, size=(32, 32))
    (root / "empty.mp4").write_bytes(b"")
    return root


def expected_metrics(model, frames: np.ndarray) -> tuple[list[float], float]:
    """Per-frame PSNR and mean SSIM of the class's own reconstruction, computed by scikit-image."""
    video = frames_to_tensor(frames)  # (C, T, H, W)
    if type(model).__name__ in VIDEO_CLASSES:
        decoded = own_reconstruction(model, video[None])[0]
    else:
        decoded = own_reconstruction(model, video.transpose(0, 1)).transpose(0, 1)
    ref = ((video + 1) / 2).double().numpy()
    rec = ((decoded.clamp(-1, 1) + 1) / 2).double().numpy()
    psnrs = [peak_signal_noise_ratio(ref[:, t], rec[:, t], data_range=1) for t in range(ref.shape[1])]
    ssims = [structural_similarity(ref[:, t], rec[:, t], data_range=1, channel_axis=0) for t in range(ref.shape[1])]
    return psnrs, float(np.mean(ssims))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_class_reconstructs_a_real_video_clip(name, models, video_dir, tmp_path):
    model = models[name]
    adapter = as_autoencoder(model)
    options = ClipOptions(num_frames=9, frame_stride=1)
    torch.manual_seed(0)  # LTX-Video's decoder injects noise from the global generator
    (result,) = reconstruct_videos(adapter, [video_dir / "astronaut.mp4"], tmp_path, options, progress=False)
    assert result.ok, result.error
    assert (result.num_frames, result.fps, result.width, result.height) == (9, 24.0, 48, 32)
    (clip,) = clips_from_file(video_dir / "astronaut.mp4", options, adapter.frame_multiple)
    psnrs, mean_ssim = expected_metrics(model, read_frames(clip))
    assert result.frame_psnr == pytest.approx(psnrs, abs=1e-3)
    assert result.psnr == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert result.ssim == pytest.approx(mean_ssim, abs=1e-4)
    info = probe_video(result.output_path)  # input | reconstruction, at the clip's rate
    assert (info.width, info.height, info.num_frames, info.fps) == (96, 32, 9, 24.0)


@pytest.mark.parametrize("name", ["AutoencoderKLWan", "AutoencoderDC"])
def test_images_go_through_video_and_image_classes(name, models, tmp_path):
    path = tmp_path / "chelsea.png"
    Image.fromarray(
        ((photo_batch(32, ("chelsea",))[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    ).save(path)
    (result,) = reconstruct_images(models[name], [path], progress=False)
    image = frames_to_tensor(np.asarray(Image.open(path))[None])  # (C, 1, H, W)
    batch = image[None] if name in VIDEO_CLASSES else image.transpose(0, 1)
    decoded = own_reconstruction(models[name], batch).reshape(image.shape[0], 1, 32, 32)
    expected = peak_signal_noise_ratio(
        ((image + 1) / 2).numpy(), ((decoded.clamp(-1, 1) + 1) / 2).numpy(), data_range=1
    )
    assert result.psnr == pytest.approx(expected, abs=1e-3)


def test_webp_output_holds_the_exact_input_and_reconstruction(models, video_dir, tmp_path):
    model = models["AutoencoderKLWan"]
    options = ClipOptions(num_frames=5, clips_per_video=2)
    results = reconstruct_videos(
        model, [video_dir / "astronaut.mp4"], tmp_path, options, output_format="webp", progress=False
    )
    assert [r.clip_id for r in results] == ["astronaut.mp4:clip0", "astronaut.mp4:clip1"]
    assert results[1].frame_indices == [12, 13, 14, 15, 16]
    clip = clips_from_file(video_dir / "astronaut.mp4", options, 4)[1]
    frames = read_frames(clip)
    written = read_webp_frames(results[1].output_path)
    assert written.shape == (5, 32, 96, 3)
    np.testing.assert_array_equal(written[:, :, :48], frames)  # lossless WebP: the input exactly
    decoded = own_reconstruction(model, frames_to_tensor(frames)[None])[0]
    expected = decoded.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.abs(written[:, :, 48:].astype(int) - expected.astype(int)).max() <= 1


def test_cli_reconstructs_videos_lists_skips_and_refuses_bad_options(models, video_dir, tmp_path, capsys):
    models["AutoencoderKLWan"].save_pretrained(tmp_path / "wan")
    args = ["reconstruct", str(video_dir), "--vae", str(tmp_path / "wan"), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--num_frames", "9", "--clips_per_video", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["clip", "frames"]
    assert any(line.startswith("astronaut.mp4:clip0") and "48x32" in line for line in out)
    assert any(
        line.startswith("skipped") and "short.mp4: too_short: 4 frames, fewer than the 9" in line for line in out
    )
    assert any(line.startswith("skipped") and "empty.mp4: unreadable: empty (zero-byte) file" in line for line in out)
    report = json.loads(out[-1])["videos"]
    assert (report["num_clips"], report["num_skipped"]) == (1, 2)  # 17 frames hold one 9-frame clip
    assert (tmp_path / "out" / "astronaut_clip0_reconstruction.mp4").is_file()

    assert main([*args, "--num_frames", "8"]) == 2
    assert "Use --num_frames 5 or 9" in capsys.readouterr().err
    models["AutoencoderDC"].save_pretrained(tmp_path / "dc")
    dc = [
        "reconstruct",
        str(video_dir / "astronaut.mp4"),
        "--vae",
        str(tmp_path / "dc"),
        "--output-dir",
        str(tmp_path),
    ]
    assert main([*dc, "--sample-posterior"]) == 2
    assert "deterministic latents, there is no posterior to sample" in capsys.readouterr().err
    assert main(["reconstruct", str(video_dir / "empty.mp4"), *args[2:]]) == 1
    assert "No image or clip could be reconstructed" in capsys.readouterr().err
