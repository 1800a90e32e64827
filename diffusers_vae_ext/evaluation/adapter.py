"""How the evaluation reaches a VAE: one autoencoder interface for every class the package loads.

`load_adapter(path)` / `as_adapter(model)` are the only places the evaluation touches model classes. They follow
the `diffusers_vae_ext.autoencoders` API (`AutoencoderAdapter`: `encode_moments`, `decode`, `has_posterior`,
`spatial_factor`, `is_video`, ...). Until that module is in the package, a minimal adapter for `AutoencoderKL`
(ours or diffusers') stands in with the same attribute names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..scaling import scale_latents, unscale_latents


class _KLAdapter:
    """Stand-in for `autoencoders.AutoencoderAdapter` for `AutoencoderKL`: raw moments in, pixels out."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self.class_name = type(vae).__name__
        self.config = {k: v for k, v in dict(vae.config).items()}
        self.spatial_factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        self.temporal_factor = 1
        self.latent_channels = int(self.config["latent_channels"])
        self.is_video = False
        self.has_posterior = True

    def check_pixels(self, pixels: torch.Tensor) -> None:
        channels = self.config.get("in_channels", 3)
        if pixels.ndim != 4 or pixels.shape[1] != channels:
            raise ValueError(f"{self.class_name} takes (N, {channels}, H, W) pixels, got {tuple(pixels.shape)}.")
        if pixels.shape[-2] % self.spatial_factor or pixels.shape[-1] % self.spatial_factor:
            raise ValueError(
                f"{self.class_name} needs height and width divisible by {self.spatial_factor}, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}: pick a --resolution that is a multiple of it."
            )

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.parameters

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        return scale_latents(latents, self.config)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return unscale_latents(latents, self.config)


def as_adapter(model: Any) -> Any:
    """Wrap a loaded VAE (or return an adapter unchanged)."""
    if hasattr(model, "encode_moments"):
        return model
    return _KLAdapter(model)


def load_adapter(path: str | os.PathLike, subfolder: str | None = None) -> Any:
    """Load the VAE in a folder (a pipeline folder's `vae/` is found by itself), safetensors only, in float32."""
    from ..modeling import AutoencoderKL

    local = Path(path)
    if subfolder is None and (local / "vae" / "config.json").is_file() and not (local / "config.json").is_file():
        subfolder = "vae"
    return as_adapter(AutoencoderKL.from_pretrained(path, subfolder=subfolder or "").eval())
