"""Latent scaling conventions: apply and undo `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std`.

Diffusion models are trained on latents of about unit variance. diffusers' pipelines undo the scaling right
before `vae.decode`, in one of three ways depending on the VAE config; `unscale_latents` mirrors them exactly
and `scale_latents` is its inverse:

| config has | scale (before the diffusion model) | unscale (pipelines, before `vae.decode`) | used by |
|---|---|---|---|
| `latents_mean` and `latents_std` | `(z - mean_c) * scaling_factor / std_c` | `z * std_c / scaling_factor + mean_c` | SDXL-style configs |
| `shift_factor` | `(z - shift_factor) * scaling_factor` | `z / scaling_factor + shift_factor` | SD3, FLUX |
| only `scaling_factor` | `z * scaling_factor` | `z / scaling_factor` | SD 1.x, 2.x, SDXL |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def scaling_convention(config: Any) -> str:
    """Which convention a VAE config uses: `"per_channel"`, `"shift"` or `"scale"` (see the module table)."""
    if _get(config, "latents_mean") is not None and _get(config, "latents_std") is not None:
        return "per_channel"
    if _get(config, "shift_factor") is not None:
        return "shift"
    return "scale"


def _channel_stats(config: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(_get(config, "latents_mean"), dtype=latents.dtype, device=latents.device)
    std = torch.tensor(_get(config, "latents_std"), dtype=latents.dtype, device=latents.device)
    if mean.numel() != latents.shape[1] or std.numel() != latents.shape[1]:
        raise ValueError(
            f"latents_mean/latents_std have {mean.numel()}/{std.numel()} entries but the latents have "
            f"{latents.shape[1]} channels."
        )
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    return mean.view(shape), std.view(shape)


def scale_latents(latents: torch.Tensor, config: Any) -> torch.Tensor:
    """Raw VAE latents -> the unit-variance latents a diffusion model trains on (`config`: a VAE config)."""
    scaling_factor = _get(config, "scaling_factor")
    convention = scaling_convention(config)
    if convention == "per_channel":
        mean, std = _channel_stats(config, latents)
        return (latents - mean) * scaling_factor / std
    if convention == "shift":
        return (latents - _get(config, "shift_factor")) * scaling_factor
    return latents * scaling_factor


def unscale_latents(latents: torch.Tensor, config: Any) -> torch.Tensor:
    """Inverse of `scale_latents`: what the pipelines do to latents right before `vae.decode`."""
    scaling_factor = _get(config, "scaling_factor")
    convention = scaling_convention(config)
    if convention == "per_channel":
        mean, std = _channel_stats(config, latents)
        return latents * std / scaling_factor + mean
    if convention == "shift":
        return latents / scaling_factor + _get(config, "shift_factor")
    return latents / scaling_factor
