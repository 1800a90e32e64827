"""Scale equivariance (Skorokhodov et al., ICML 2025, arXiv:2502.14831, "Improving the diffusability of
autoencoders"; `--scale_equivariance`): downsampled latents must decode to the downsampled images."""

from __future__ import annotations

import torch
from torch import Tensor

from .transforms import check_image_grid, resize_spatial, scaled_size, spatial_factor_of

# Skorokhodov et al. downsample latents and images 2x or 4x; integer factors keep the pixel and latent grids aligned.
SCALE_EQUIVARIANCE_FACTORS: tuple[int, ...] = (2, 4)


def sample_scale_factor(generator: torch.Generator, factors: tuple[int, ...] = SCALE_EQUIVARIANCE_FACTORS) -> int:
    """Draw this step's downsampling factor uniformly from `factors` (one uniform consumed per call)."""
    if not factors:
        raise ValueError("factors must not be empty.")
    u = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64).item()
    return factors[min(int(u * len(factors)), len(factors) - 1)]


def scale_equivariance_pair(
    z: Tensor, x: Tensor, factor: float, *, spatial_factor: int | None = None, antialias: bool = True
) -> tuple[Tensor, Tensor]:
    """(down(z), down(x)): latents and their images downsampled by `factor` (2-4 in the paper), bilinear.

    The latent grid h x w becomes floor(h / factor) x floor(w / factor) and the image exactly that times the
    spatial factor (inferred from the shapes unless given), so `vae.decode(down_z)` has the size of `down_x`.
    The trainer adds `weight * rec(down_x, vae.decode(down_z).sample)` with its usual reconstruction loss (L1 +
    LPIPS); the gradient reaches the decoder and, through `z`, the encoder. Works on 4-D and 5-D tensors (per frame).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1 (a downsampling), got {factor}.")
    if spatial_factor is None:
        spatial_factor = spatial_factor_of(z, x)
    h, w = check_image_grid(x, spatial_factor)
    if (h, w) != tuple(z.shape[-2:]):
        raise ValueError(
            f"Images {tuple(x.shape)} do not match latents {tuple(z.shape)} at spatial factor {spatial_factor}."
        )
    th, tw = scaled_size(h, 1 / factor), scaled_size(w, 1 / factor)
    return (
        resize_spatial(z, (th, tw), antialias),
        resize_spatial(x, (th * spatial_factor, tw * spatial_factor), antialias),
    )
