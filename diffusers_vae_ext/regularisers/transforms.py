"""Spatial transforms shared by the regularisers: frame folding for videos, bilinear resizes, and the checks that
keep the pixel and latent grids aligned. The lowest layer of `regularisers` (imports nothing from it)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def fold_frames(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(N, C, T, H, W) -> (N*T, C, H, W) and the inverse; 4-D tensors pass through."""
    if x.ndim == 4:
        return x, lambda y: y
    if x.ndim != 5:
        raise ValueError(f"Expected images/latents (N, C, H, W) or videos (N, C, T, H, W), got {tuple(x.shape)}.")
    n, c, t = x.shape[:3]
    folded = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, *x.shape[-2:])
    # The inverse reads the channel count off its input: projections and feature extractors change it.
    return folded, lambda y: y.reshape(n, t, y.shape[1], *y.shape[-2:]).permute(0, 2, 1, 3, 4)


def resize_spatial(x: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Bilinear resize of the last two dims of a 4-D or 5-D tensor to `size` (height, width), frame by frame.

    `antialias=True` low-pass filters when shrinking (torch's PIL-like resize); it changes nothing when enlarging.
    Half-precision inputs are resized in float32 (antialiased kernels are not implemented for them everywhere) and
    returned in their own dtype. The same size returns `x` itself.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if min(size) < 1:
        raise ValueError(f"Cannot resize {tuple(x.shape)} to {size}: sizes must be at least 1.")
    folded, unfold = fold_frames(x)
    work = folded.float() if folded.dtype in (torch.float16, torch.bfloat16) else folded
    out = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return unfold(out.to(x.dtype))


def scaled_size(length: int, scale: float) -> int:
    # Floor like `F.interpolate(scale_factor=...)` (what EQ-VAE's code uses); the epsilon keeps 32 * 0.75 at 24.
    return max(1, int(math.floor(length * scale + 1e-6)))


def spatial_factor_of(z: Tensor, x: Tensor) -> int:
    """Pixels per latent pixel, from the shapes of a latent and the image it encodes."""
    (h, w), (height, width) = z.shape[-2:], x.shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"Images {tuple(x.shape)} and latents {tuple(z.shape)} do not have one integer spatial factor; "
            "pass spatial_factor explicitly or crop the images to a multiple of the autoencoder's factor."
        )
    return height // h


def check_image_grid(x: Tensor, spatial_factor: int) -> tuple[int, int]:
    if spatial_factor < 1:
        raise ValueError(f"spatial_factor must be a positive integer, got {spatial_factor}.")
    height, width = x.shape[-2:]
    if height % spatial_factor or width % spatial_factor:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the autoencoder's spatial factor {spatial_factor}; "
            "crop or resize the images to a multiple first."
        )
    return height // spatial_factor, width // spatial_factor
