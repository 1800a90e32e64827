"""Reconstruction metrics on images in [-1, 1]: PSNR and SSIM, per image.

Both are computed on the [0, 1] scale (data range 1), in float64, the way scikit-image and the published VAE
model cards report them, so numbers are comparable with `skimage.metrics` (tested against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W) or (C, H, W), got {tuple(images.shape)}.")
    return images.detach().to(torch.float64).clamp(-1, 1).add(1).div(2)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; inputs in [-1, 1] of shape (N, C, H, W)."""
    a, b = _to_unit_range(reference), _to_unit_range(reconstruction)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor, window_size: int = 7) -> torch.Tensor:
    """Structural similarity per image (mean over channels); inputs in [-1, 1] of shape (N, C, H, W).

    A uniform 7x7 window with sample covariance, matching `skimage.metrics.structural_similarity(...,
    data_range=1, channel_axis=0)` defaults (borders of half a window excluded, as there).
    """
    a, b = _to_unit_range(reference), _to_unit_range(reconstruction)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {a.shape[-2:]}.")
    n = window_size**2
    cov_norm = n / (n - 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        # The uniform window's mean over valid positions; avg_pool2d is ~10x faster than a float64 depthwise conv.
        return F.avg_pool2d(x, window_size, stride=1)

    mu_a, mu_b = filt(a), filt(b)
    var_a = cov_norm * (filt(a * a) - mu_a**2)
    var_b = cov_norm * (filt(b * b) - mu_b**2)
    cov_ab = cov_norm * (filt(a * b) - mu_a * mu_b)
    c1, c2 = (0.01) ** 2, (0.03) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
