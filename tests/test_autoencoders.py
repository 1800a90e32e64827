"""The autoencoder adapter on tiny random models of every supported class, saved and loaded back through our loader:
encode/decode equal the class's own, scaling equals the pipelines' formulas, bad inputs get clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from autoencoder_configs import EXPECTED, IMAGE_CLASSES, VIDEO_CLASSES, build_tiny, own_decode, own_encode
from conftest import photo_batch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.autoencoders import SUPPORTED_CLASSES, as_autoencoder, load_autoencoder
from diffusers_vae_ext.video import frames_to_tensor, pan_zoom_frames

NAMES = list(EXPECTED)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (the model as built, the folder it was saved to), built once for the module."""
    root = tmp_path_factory.mktemp("autoencoders")
    models = {}
    for name in NAMES:
        model = build_tiny(name)
        model.save_pretrained(root / name)
        models[name] = (model, root / name)
    return models


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: load_autoencoder(folder) for name, (_, folder) in saved.items()}


def pixels_for(name: str, batch: int = 2) -> torch.Tensor:
    """Real content: photo crops for image classes, pan-and-zoom clips over photos for video classes."""
    if name in VIDEO_CLASSES:
        clips = [pan_zoom_frames(photo, num_frames=9, size=(32, 32)) for photo in ("astronaut", "coffee")[:batch]]
        return torch.stack([frames_to_tensor(clip) for clip in clips])
    return photo_batch(32, ("astronaut", "coffee")[:batch])


def test_supported_classes_are_the_ones_under_test():
    assert set(SUPPORTED_CLASSES) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_loaded_adapter_encodes_and_decodes_like_the_class_itself(name, saved, loaded):
    model, _ = saved[name]
    adapter = loaded[name]
    assert adapter.class_name == name and type(adapter.vae).__name__ == name
    if name == "AutoencoderKL":
        assert isinstance(adapter.vae, AutoencoderKL)  # ours: the fast path
    is_video, has_posterior, spatial, temporal, frame_multiple, size_multiple = EXPECTED[name]
    facts = (adapter.is_video, adapter.has_posterior, adapter.spatial_factor, adapter.temporal_factor)
    assert facts == (is_video, has_posterior, spatial, temporal)
    assert (adapter.frame_multiple, adapter.size_multiple) == (frame_multiple, size_multiple)

    pixels = pixels_for(name)
    with torch.no_grad():
        moments = adapter.encode_moments(pixels)
        expected = own_encode(model, pixels)
    channels = adapter.latent_channels * (2 if has_posterior else 1)
    latent_shape = (2, channels) + ((adapter.num_latent_frames(9),) if is_video else ()) + (32 // spatial,) * 2
    assert moments.shape == latent_shape
    # Ours runs its fast path, equal to diffusers' module forwards up to float rounding.
    torch.testing.assert_close(moments, expected, rtol=1e-4, atol=1e-4 if name == "AutoencoderKL" else 1e-5)

    latents = adapter.latents_from_moments(moments, sample=False)
    with torch.no_grad():
        if name == "AutoencoderKLLTXVideo":
            torch.manual_seed(0)
        decoded = adapter.decode(latents)
        expected_pixels = own_decode(model, latents)
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, expected_pixels, rtol=1e-4, atol=1e-4)


def test_posterior_draws_match_diffusers_sampling(loaded):
    adapter = loaded["AutoencoderKLWan"]
    with torch.no_grad():
        moments = adapter.encode_moments(pixels_for("AutoencoderKLWan", batch=1))
    draw = adapter.latents_from_moments(moments, generator=torch.Generator().manual_seed(3))
    expected = DiagonalGaussianDistribution(moments).sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw, expected)
    assert not torch.equal(draw, adapter.latents_from_moments(moments, sample=False))
    deterministic = loaded["AutoencoderDC"]  # nothing to draw: latents come back unchanged
    assert torch.equal(deterministic.latents_from_moments(moments[:, :4]), moments[:, :4])


# ------------------------------------------------------------------------------------------ scaling


def pipeline_unscale(name: str, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """What each family's pipeline does before `vae.decode`, written as in `diffusers/pipelines/<family>/`."""
    config = vae.config
    if name == "AutoencoderKL":  # pipeline_flux.py
        return latents / config.scaling_factor + config.shift_factor
    if name == "AutoencoderKLFlux2":  # pipeline_flux2.py, on the 2x2-patchified latents the transformer sees
        from diffusers import Flux2Pipeline

        patched = Flux2Pipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps)
        return Flux2Pipeline._unpatchify_latents(patched * std + mean)
    if name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):  # pipeline_wan.py / pipeline_qwenimage.py
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return latents / std + mean
    if name == "AutoencoderKLLTXVideo":
        from diffusers import LTXPipeline

        return LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, config.scaling_factor)
    return latents / config.scaling_factor  # Sana (DC), HunyuanVideo, CogVideoX, SD pipelines with TAESD


def pipeline_scale(name: str, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor | None:
    """The pipelines' own encode-side normalisation, where a pipeline has one."""
    if name == "AutoencoderKLFlux2":  # Flux2Pipeline._encode_vae_image
        from diffusers import Flux2Pipeline

        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return Flux2Pipeline._unpatchify_latents((Flux2Pipeline._patchify_latents(latents) - mean) / std)
    if name == "AutoencoderKLLTXVideo":
        from diffusers import LTXPipeline

        return LTXPipeline._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return None


@pytest.mark.parametrize("name", NAMES)
def test_scaling_round_trip_equals_the_pipeline_formula(name, loaded):
    adapter = loaded[name]
    generator = torch.Generator().manual_seed(1)
    shape = (2, adapter.latent_channels) + ((3,) if adapter.is_video else ()) + (4, 4)
    raw = torch.randn(shape, generator=generator) * 2 + 0.3
    scaled = adapter.scale(raw)
    assert scaled.shape == raw.shape and not torch.allclose(scaled, raw)
    torch.testing.assert_close(adapter.unscale(scaled), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.unscale(scaled), pipeline_unscale(name, adapter.vae, scaled))
    expected_scaled = pipeline_scale(name, adapter.vae, raw)
    if expected_scaled is not None:
        torch.testing.assert_close(scaled, expected_scaled)


def test_tiny_with_a_shift_uses_the_flux_formula(saved, tmp_path):
    model, folder = saved["AutoencoderTiny"]
    config = json.loads((folder / "config.json").read_text())
    config["shift_factor"], config["scaling_factor"] = 0.1159, 0.3611  # taef1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    adapter = load_autoencoder(tmp_path)
    assert adapter.convention.convention == "shift"
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(adapter.unscale(z), z / 0.3611 + 0.1159)  # pipeline_flux.py
    assert as_autoencoder(model).convention.convention == "scale"  # shift_factor 0.0: the SD pipelines' z / sf


# ------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("name", "frames", "message"),
    [
        ("AutoencoderKLWan", 8, r"4k \+ 1 frames .*got 8 frames, of which it would silently drop 3\. Use 5 or 9"),
        ("AutoencoderKLHunyuanVideo", 10, r"Use 9 or 13 frames \(e\.g\. --num_frames 9\)"),
        ("AutoencoderKLCogVideoX", 5, r"8k \+ 1 frames \(1, 9, 17, 25, \.\.\.\); got 5 frames"),
        ("AutoencoderKLLTXVideo", 13, r"Use 9 or 17 frames"),
    ],
)
def test_wrong_frame_counts_are_refused_with_the_valid_ones(name, frames, message, loaded):
    adapter = loaded[name]
    assert not adapter.valid_num_frames(frames)
    with pytest.raises(ValueError, match=message):
        adapter.encode_moments(torch.zeros(1, 3, frames, 16, 16))


def test_bad_pixels_get_errors_that_say_what_to_do(loaded):
    wan, kl, flux2 = loaded["AutoencoderKLWan"], loaded["AutoencoderKL"], loaded["AutoencoderKLFlux2"]
    with pytest.raises(ValueError, match=r"5-D videos .* add a frame axis: pixels.unsqueeze\(2\)"):
        wan.check_pixels(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"4-D images .*fold the frames into the batch"):
        kl.check_pixels(torch.zeros(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="integer tensor"):
        kl.check_pixels(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="in_channels=3 but got 4 channels"):
        wan.check_pixels(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match=r"divisible by 8, got 20x16\. Resize, crop or pad to e\.g\. 16x16"):
        wan.check_pixels(torch.zeros(1, 3, 5, 20, 16))
    # FLUX.2's pipelines patchify latents 2x2: sides must be multiples of twice the VAE factor.
    with pytest.raises(ValueError, match="divisible by 4, got 6x6"):
        flux2.check_pixels(torch.zeros(1, 3, 6, 6))
    with pytest.raises(ValueError, match="decodes latents"):
        wan.decode(torch.zeros(1, 4, 8, 8))
    wan.check_pixels(torch.zeros(1, 3, 1, 8, 8))  # a single frame is a valid video (images through Wan)


# ------------------------------------------------------------------------------------------ loading


def test_unknown_classes_and_pickles_are_refused(saved, tmp_path):
    folder = tmp_path / "mochi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(ValueError, match=r"'AutoencoderKLMochi' is not supported\. Supported classes: AutoencoderKL,"):
        load_autoencoder(folder)
    with pytest.raises(ValueError, match="Supported classes: .*AutoencoderKLWan"):
        as_autoencoder(torch.nn.Linear(2, 2))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model, source = saved["AutoencoderKLWan"]
    (pickled / "config.json").write_text((source / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="(?s)only pickle weights .*convert-to-safetensors"):
        load_autoencoder(pickled)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_autoencoder(tmp_path)


def test_pipeline_folder_loads_its_vae_and_dtype_is_applied(saved, tmp_path):
    model, _ = saved["AutoencoderDC"]
    model.save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    adapter = load_autoencoder(tmp_path / "pipeline", torch_dtype=torch.bfloat16)
    assert adapter.class_name == "AutoencoderDC" and adapter.dtype == torch.bfloat16
    assert as_autoencoder(adapter) is adapter


# ------------------------------------------------------------------------------------------ tiling


def test_tiling_is_exact_for_ours_and_the_class_own_for_others(loaded):
    kl = loaded["AutoencoderKL"]
    pixels = photo_batch(48, ("chelsea",))
    with torch.no_grad():
        untiled = kl.decode(kl.latents_from_moments(kl.encode_moments(pixels), sample=False))
        kl.enable_tiling(tile_sample_size=16)
        try:
            tiled = kl.decode(kl.latents_from_moments(kl.encode_moments(pixels), sample=False))
        finally:
            kl.disable_tiling()
    torch.testing.assert_close(tiled, untiled, rtol=1e-4, atol=1e-4)

    wan = loaded["AutoencoderKLWan"]
    wan.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        assert wan.vae.use_tiling and wan.vae.tile_sample_min_height == 16  # Wan's own tiler, its own arguments
    finally:
        wan.disable_tiling()
    assert not wan.vae.use_tiling


@pytest.mark.parametrize("name", IMAGE_CLASSES)
def test_image_classes_take_any_frame_count(name, loaded):
    adapter = loaded[name]
    assert adapter.valid_num_frames(8) and adapter.num_latent_frames(8) == 8
    assert adapter.largest_valid_num_frames(8) == 8


def test_a_tiler_that_returns_the_wrong_size_is_an_error_not_shifted_latents(loaded):
    # CogVideoX's own tiler, with tiles other than its 720x480 defaults, returns latents and frames of another size.
    cog = loaded["AutoencoderKLCogVideoX"]
    cog.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"encode returned shape \(1, 8, 3, 9, 9\), expected"):
            cog.encode_moments(torch.zeros(1, 3, 9, 64, 64))
        with torch.no_grad(), pytest.raises(RuntimeError, match="decode returned shape .* with tiling on: disable it"):
            cog.decode(torch.zeros(1, 4, 3, 6, 6))
    finally:
        cog.disable_tiling()


def test_wan_2_2_layout_patchified_pixels_and_factor_16(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    config = dict(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    config.update(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    model = AutoencoderKLWan(**config, latents_mean=[0.1] * 4, latents_std=[2.0] * 4).eval()
    model.save_pretrained(tmp_path)
    adapter = load_autoencoder(tmp_path)
    assert (adapter.in_channels, adapter.spatial_factor, adapter.temporal_factor) == (3, 16, 4)  # RGB pixels
    pixels = pixels_for("AutoencoderKLWan", batch=1)  # (1, 3, 9, 32, 32)
    with torch.no_grad():
        moments = adapter.encode_moments(pixels)
        torch.testing.assert_close(moments, own_encode(model, pixels), rtol=1e-5, atol=1e-5)
        assert adapter.decode(moments[:, :4]).shape == pixels.shape
