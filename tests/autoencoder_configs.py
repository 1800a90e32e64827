"""Tiny random configs of every autoencoder class `diffusers_vae_ext.autoencoders` supports (our own, modelled on
the sizes in diffusers' tests), built with non-trivial weights and scaling statistics."""

from __future__ import annotations

import diffusers
import torch

from diffusers_vae_ext import AutoencoderKL

# class name -> (config, frames of a test clip, side of a test frame)
TINY_CONFIGS: dict[str, dict] = {
    # FLUX-style shift convention, 3 levels (factor 4).
    "AutoencoderKL": dict(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "AutoencoderKLFlux2": dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ),
    "AutoencoderDC": dict(
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ),
    "AutoencoderTiny": dict(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        scaling_factor=0.7,  # TAESD ships 1.0: a different value shows whether it is applied
    ),
    "AutoencoderKLWan": dict(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ),
    "AutoencoderKLQwenImage": dict(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ),
    "AutoencoderKLHunyuanVideo": dict(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
    ),
    # LTX-Video 0.9.1 layout: timestep-conditioned decoder with noise injection, 8x in time.
    "AutoencoderKLLTXVideo": dict(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(16, 32, 64),
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(True, True, True, False),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
        patch_size=1,
        patch_size_t=1,
        scaling_factor=1.3,
    ),
    "AutoencoderKLCogVideoX": dict(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426,
    ),
}

# Expected facts: (is_video, has_posterior, spatial factor, temporal factor, frame multiple, size multiple)
EXPECTED = {
    "AutoencoderKL": (False, True, 4, 1, 1, 4),
    "AutoencoderKLFlux2": (False, True, 2, 1, 1, 4),
    "AutoencoderDC": (False, False, 2, 1, 1, 2),
    "AutoencoderTiny": (False, False, 4, 1, 1, 4),
    "AutoencoderKLWan": (True, True, 8, 4, 4, 8),
    "AutoencoderKLQwenImage": (True, True, 8, 4, 4, 8),
    "AutoencoderKLHunyuanVideo": (True, True, 8, 4, 4, 8),
    "AutoencoderKLLTXVideo": (True, True, 8, 8, 8, 8),
    "AutoencoderKLCogVideoX": (True, True, 8, 4, 8, 8),
}

VIDEO_CLASSES = [name for name, facts in EXPECTED.items() if facts[0]]
IMAGE_CLASSES = [name for name, facts in EXPECTED.items() if not facts[0]]


def model_class(name: str) -> type:
    return AutoencoderKL if name == "AutoencoderKL" else getattr(diffusers, name)


def build_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of class `name` with perturbed weights and non-trivial scaling statistics.

    Biases, norms and zero-initialised layers are perturbed so no output is trivially 0; per-channel statistics
    (config keys for Wan/Qwen-Image, buffers for LTX-Video and FLUX.2) are random so a wrong formula shows.
    """
    generator = torch.Generator().manual_seed(seed)
    config = dict(TINY_CONFIGS[name])
    channels = config.get("z_dim") or config.get("latent_channels")
    if name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        config["latents_mean"] = (torch.randn(channels, generator=generator) * 0.5).tolist()
        config["latents_std"] = (torch.rand(channels, generator=generator) + 0.5).tolist()
    torch.manual_seed(seed)
    model = model_class(name)(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        if name == "AutoencoderKLLTXVideo":
            model.latents_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            model.latents_std.copy_(torch.rand(channels, generator=generator) + 0.5)
        if name == "AutoencoderKLFlux2":
            model.bn.running_mean.copy_(torch.randn(4 * channels, generator=generator) * 0.5)
            model.bn.running_var.copy_(torch.rand(4 * channels, generator=generator) + 0.5)
    return model


def own_encode(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The class's own `encode`: posterior moments `cat([mean, logvar])`, or its deterministic latents."""
    output = model.encode(pixels)
    if hasattr(output, "latent_dist"):
        return torch.cat([output.latent_dist.mean, output.latent_dist.logvar], dim=1)
    return output.latent if hasattr(output, "latent") else output.latents


def own_decode(model: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The class's own `decode` as its pipelines call it (LTX-Video: at timestep 0, noise from a fixed seed)."""
    if type(model).__name__ == "AutoencoderKLLTXVideo":
        torch.manual_seed(0)  # its decoder injects noise from the global generator
        return model.decode(latents, temb=torch.zeros(latents.shape[0])).sample
    return model.decode(latents).sample


@torch.no_grad()
def own_reconstruction(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior mean (or deterministic latents) decoded, with the class's own methods only."""
    moments = own_encode(model, pixels)
    channels = model.config.get("z_dim") or model.config["latent_channels"]
    return own_decode(model, moments[:, :channels])
