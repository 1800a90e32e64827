"""`diffusers-vae stats` for every autoencoder class, on real photos and real videos: the numbers equal those of
the class's own latents, and after `--write_config` the class's pipelines' formula gives unit-variance latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from autoencoder_configs import EXPECTED, VIDEO_CLASSES, build_tiny, own_encode
from conftest import photo_batch
from PIL import Image

pytest.importorskip("av", reason="PyAV is not installed (pip install 'diffusers-vae-ext[video]')")

from diffusers_vae_ext.autoencoders import load_autoencoder  # noqa: E402
from diffusers_vae_ext.cli import main  # noqa: E402
from diffusers_vae_ext.video import ClipOptions, clips_from_file, list_videos, load_clip, write_pan_zoom_video  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_data")
    images = root / "images"
    images.mkdir()
    for name, pixels in zip(PHOTOS, photo_batch(32, PHOTOS)):  # already at --resolution
        array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(images / f"{name}.png")
    videos = root / "videos"
    for name in PHOTOS[:3]:
        write_pan_zoom_video(videos / f"{name}.mp4", name, num_frames=9, size=(40, 48))
    write_pan_zoom_video(videos / "short.mp4", "rocket", num_frames=3, size=(40, 48))
    return images, videos


def own_latents(model, name: str, data, video: bool) -> torch.Tensor:
    """Posterior means (or deterministic latents) of the data, one row per image or clip, with the class's own
    encode; frames centre-cropped to 32 px as the command does."""
    images, videos = data
    channels = model.config.get("z_dim") or model.config["latent_channels"]
    rows = []
    with torch.no_grad():
        if video:
            options = ClipOptions(num_frames=9)
            for source in list_videos(videos):
                if source.name == "short.mp4":
                    continue
                (clip,) = clips_from_file(source, options)
                pixels = load_clip(clip, (32, 32))
                if name in VIDEO_CLASSES:
                    rows.append(own_encode(model, pixels[None])[:, :channels])
                else:
                    frames = own_encode(model, pixels.transpose(0, 1))[:, :channels]
                    rows.append(frames.transpose(0, 1)[None])
        else:
            arrays = [np.asarray(Image.open(path)) for path in sorted(images.iterdir())]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
            if name in VIDEO_CLASSES:
                pixels = pixels.unsqueeze(2)
            rows.append(own_encode(model, pixels)[:, :channels])
    latents = torch.cat(rows).double()
    if name == "AutoencoderKLFlux2":
        from diffusers import Flux2Pipeline

        latents = Flux2Pipeline._patchify_latents(latents)
    return latents


def run(folder, source, *extra) -> tuple[int, dict, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["stats", "--vae", str(folder), "--train_data_dir", str(source), "--resolution", "32",
                     "--no-sample_posterior", "--no_progress", *extra])  # fmt: skip
    text = out.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[0]) if lines else {}), text


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stats_equal_the_class_own_latents_and_written_keys_normalise_them(name, data, tmp_path):
    model = build_tiny(name)
    model.save_pretrained(tmp_path / "vae")
    video = name in VIDEO_CLASSES
    source = data[1] if video else data[0]
    extra = ["--num_frames", "9", "--write_config"] if video else ["--write_config"]
    code, record, text = run(tmp_path / "vae", source, *extra)
    assert code == 0, text
    latents = own_latents(model, name, data, video)
    channels = latents.shape[1]
    assert record["autoencoder"] == name and len(record["latents_mean"]) == channels
    assert record["num_images"] == latents.shape[0] == (3 if video else 4)
    if video:
        assert record["skipped"] == 1 and "short.mp4: too_short: 3 frames" in text
    per_channel = latents.transpose(0, 1).flatten(1)
    np.testing.assert_allclose(record["latents_mean"], per_channel.mean(1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(record["latents_std"], per_channel.std(1, unbiased=False).numpy(), rtol=1e-4)
    assert record["scaling_factor"] == pytest.approx(1 / latents.std(unbiased=False).item(), rel=1e-4)
    if not EXPECTED[name][1]:
        assert record["sample_posterior"] is None  # deterministic latents: nothing was drawn

    # Written where the pipelines read them: the pipelines' formula now gives unit-variance latents.
    adapter = load_autoencoder(tmp_path / "vae")
    raw = latents.float()
    if name == "AutoencoderKLFlux2":
        from diffusers import Flux2Pipeline

        raw = Flux2Pipeline._unpatchify_latents(raw)
        torch.testing.assert_close(adapter.vae.bn.running_mean.double(), torch.tensor(record["latents_mean"]).double())
    scaled = adapter.scale(raw).double()
    if name == "AutoencoderKLFlux2":
        scaled = Flux2Pipeline._patchify_latents(scaled)
    if adapter.convention.convention == "per_channel":
        flat = scaled.transpose(0, 1).flatten(1)
        np.testing.assert_allclose(flat.mean(1).numpy(), 0, atol=1e-4)
        np.testing.assert_allclose(flat.std(1, unbiased=False).numpy(), 1, rtol=1e-3)
    else:
        assert scaled.std(unbiased=False).item() == pytest.approx(1, rel=1e-4)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    if name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        assert "scaling_factor" not in config  # their pipelines read only latents_mean/latents_std
    if name == "AutoencoderKLLTXVideo":
        assert config["scaling_factor"] == 1.0 and "weights: latents_mean" in text


def test_image_autoencoders_measure_videos_frame_by_frame_with_clips_as_units(data, tmp_path):
    build_tiny("AutoencoderTiny").save_pretrained(tmp_path / "tiny")
    code, record, text = run(tmp_path / "tiny", data[1], "--num_frames", "9")
    assert code == 0, text
    latents = own_latents(build_tiny("AutoencoderTiny"), "AutoencoderTiny", data, video=True)  # (clips, C, T, h, w)
    assert record["num_images"] == 3 and record["count"] == 3 * 9 * 8 * 8
    np.testing.assert_allclose(
        record["latents_std"], latents.transpose(0, 1).flatten(1).std(1, unbiased=False), rtol=1e-4
    )


def test_bad_options_are_refused_with_what_to_do(data, tmp_path, capsys):
    build_tiny("AutoencoderKLWan").save_pretrained(tmp_path / "wan")
    common = ["stats", "--vae", str(tmp_path / "wan"), "--resolution", "32", "--no_progress"]
    assert main([*common, "--train_data_dir", str(data[1]), "--num_frames", "8"]) == 2
    assert "--num_frames 8 is not a frame count AutoencoderKLWan encodes" in capsys.readouterr().err
    assert main([*common, "--train_data_dir", str(data[0]), "--convention", "shift"]) == 2
    assert "AutoencoderKLWan's pipelines apply the 'per_channel' convention" in capsys.readouterr().err
    assert main([*common, "--train_data_dir", str(data[1]), "--num_frames", "33"]) == 2
    err = capsys.readouterr().err
    assert "None of the 4 samples" in err and "too_short" in err
