"""Apply and undo the three latent scaling conventions exactly as diffusers' pipelines do.

The formulas are tabled in the package docstring (`diffusers_vae_ext.scaling`); which convention an autoencoder
class's pipelines use is decided in `diffusers_vae_ext.conventions`.
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


def _scaling_factor(config: Any) -> float:
    # Wan and Qwen-Image configs have no scaling_factor: their pipelines use the per-channel std alone.
    value = _get(config, "scaling_factor")
    return 1.0 if value is None else value


def _channel_stats(config: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std shaped to broadcast over `latents`, and the latent patch size they are for.

    With `latents_patch_size` p > 1 (FLUX.2) the statistics have `C * p * p` entries, one per channel of the
    p x p patchified latents (channel `c * p * p + dy * p + dx`); they come back shaped (1, C, 1, p, 1, p) for
    latents viewed as (N, C, h / p, p, w / p, p), which is the same normalisation without the patchify.
    """
    mean = torch.as_tensor(_get(config, "latents_mean"), dtype=latents.dtype).to(latents.device).flatten()
    std = torch.as_tensor(_get(config, "latents_std"), dtype=latents.dtype).to(latents.device).flatten()
    patch = int(_get(config, "latents_patch_size") or 1)
    expected = latents.shape[1] * patch * patch
    if mean.numel() != expected or std.numel() != expected:
        needed = f"{expected} ({latents.shape[1]} channels x {patch}x{patch} patch positions)" if patch > 1 else ""
        raise ValueError(
            f"latents_mean/latents_std have {mean.numel()}/{std.numel()} entries but the latents have "
            f"{latents.shape[1]} channels{f' and need {needed}' if needed else ''}."
        )
    if patch == 1:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        return mean.view(shape), std.view(shape), 1
    if latents.ndim != 4 or latents.shape[-2] % patch or latents.shape[-1] % patch:
        raise ValueError(
            f"Latents of shape {tuple(latents.shape)} cannot be split into {patch}x{patch} patches: height and "
            f"width must be even multiples of {patch} (images sized in multiples of {patch} x the VAE factor)."
        )
    shape = (1, latents.shape[1], 1, patch, 1, patch)
    return mean.view(shape), std.view(shape), patch


def _patched(latents: torch.Tensor, patch: int) -> torch.Tensor:
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h // patch, patch, w // patch, patch)


def scale_latents(latents: torch.Tensor, config: Any, convention: str | None = None) -> torch.Tensor:
    """Raw VAE latents -> the unit-variance latents a diffusion model trains on.

    Args:
        latents: raw latents (N, C, ...) as the VAE's encoder produces them.
        config: a VAE config (or any mapping) with `scaling_factor` and, per convention, `shift_factor` or
            `latents_mean`/`latents_std` (and `latents_patch_size` for statistics of patchified latents, FLUX.2).
        convention: `"scale"`, `"shift"` or `"per_channel"`; default: the one `config`'s keys select
            (`scaling_convention`). Autoencoder classes whose pipelines fix the convention pass it explicitly
            (see `diffusers_vae_ext.conventions.pipeline_convention`).
    """
    convention = convention or scaling_convention(config)
    scaling_factor = _scaling_factor(config)
    if convention == "per_channel":
        mean, std, patch = _channel_stats(config, latents)
        if patch == 1:
            return (latents - mean) * scaling_factor / std
        return ((_patched(latents, patch) - mean) * scaling_factor / std).reshape(latents.shape)
    if convention == "shift":
        return (latents - _get(config, "shift_factor")) * scaling_factor
    if convention == "scale":
        return latents * scaling_factor
    raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")


def unscale_latents(latents: torch.Tensor, config: Any, convention: str | None = None) -> torch.Tensor:
    """Inverse of `scale_latents`: what the pipelines do to latents right before `vae.decode`."""
    convention = convention or scaling_convention(config)
    scaling_factor = _scaling_factor(config)
    if convention == "per_channel":
        mean, std, patch = _channel_stats(config, latents)
        if patch == 1:
            return latents * std / scaling_factor + mean
        return (_patched(latents, patch) * std / scaling_factor + mean).reshape(latents.shape)
    if convention == "shift":
        return latents / scaling_factor + _get(config, "shift_factor")
    if convention == "scale":
        return latents / scaling_factor
    raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")


CONVENTIONS = ("scale", "shift", "per_channel")
