"""The probe's denoiser: a small diffusers `UNet2DModel`, per frame with temporal mixing for video latents.

Video: diffusers' spatio-temporal UNets (`UNet3DConditionModel`, `UNetSpatioTemporalConditionModel`) need text or
image conditioning and are 10-100x the cost of the probe's budget on a CPU, so 5-D latents fold their frames into
the batch of the same per-frame `UNet2DModel`, with a temporal convolution (kernel 3 along T, residual,
zero-initialised) before and after it: the model starts as a per-frame denoiser and learns what the neighbouring
frames tell it. Cheap, and it still sees the temporal structure that the temporal spectrum measures.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

# Small and fixed, so probe losses of different latent spaces compare: only in/out channels follow the latents.
DENOISER_CONFIG: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


class FrameUNet(nn.Module):
    """(B, C, T, h, w) -> (B, C, T, h, w): `UNet2DModel` per frame between two residual temporal convolutions."""

    def __init__(self, unet: UNet2DModel, channels: int):
        super().__init__()
        self.unet = unet
        self.temporal_in = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.temporal_out = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        for conv in (self.temporal_in, self.temporal_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        x = x + self.temporal_in(x)
        per_frame = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        out = self.unet(per_frame, timestep.repeat_interleave(frames)).sample
        out = out.reshape(batch, frames, channels, height, width).transpose(1, 2)
        return out + self.temporal_out(out)


class ImageUNet(nn.Module):
    """(B, C, h, w) -> (B, C, h, w): the `UNet2DModel`, returning a tensor."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timestep).sample


def build_denoiser(latent_shape: tuple[int, ...], seed: int) -> nn.Module:
    """The probe's denoiser for latents of shape (C, h, w) or (C, T, h, w), initialised from `seed`.

    It is called as `model(x_t / std(x_t), 1000 * t)` (diffusers' timestep scale) and predicts a correction to the
    Gaussian-optimal velocity (`probe.predict_velocity`); its output layer starts at zero.
    """
    channels = latent_shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=tuple(latent_shape[-2:]), in_channels=channels, out_channels=channels, **DENOISER_CONFIG
        )
        # Zero output: the probe starts as the Gaussian-optimal predictor (probe.predict_velocity).
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
        model = FrameUNet(unet, channels) if len(latent_shape) == 4 else ImageUNet(unet)
    return model
