"""How "rough" a latent space is: per-channel standardised, radially averaged power spectra of latents and of the
images they encode, resized to the latent grid (Skorokhodov et al. 2025, "Improving the diffusability of
autoencoders": latents with more high-frequency energy than their images are harder to denoise).

Definition (so that constructed cases have known answers):

- Each channel is standardised over the whole set (mean 0, std 1 over samples and positions), so a channel's scale
  does not weigh in and every channel counts the same.
- Spatial spectrum: the 2-D DFT of every (sample, channel[, frame]) field of h x w values; the power of coefficient
  (ky, kx) is `|F|^2 / (h w)` (so a field's total power equals its sum of squares, Parseval). Its radial frequency is
  `r = sqrt(fy^2 + fx^2)` with `fy = ky / h`, `fx = kx / w` in cycles per latent pixel (DFT frequencies in
  [-1/2, 1/2)). Coefficients with `r > 1/2` (the corners beyond the axis Nyquist frequency, which only diagonal
  patterns reach) are left out, so every direction is measured up to the same frequency.
- Radial bins: `n = min(h, w) // 2` bins of equal width `1 / (2 n)` over [0, 1/2]; bin k holds the coefficients with
  `k / (2 n) <= r < (k + 1) / (2 n)` (r = 1/2 in the last bin). The radially averaged spectrum is the mean power
  per coefficient of each bin, averaged over samples and channels.
- `high_frequency_energy`: the share of the summed power (over the disc `r <= 1/2`) that lies at `r >= 1/4`, the
  upper half of the radial frequencies. White noise has a flat spectrum, so its share is the share of coefficients
  in that half (`high_frequency_area`: 3/4 of the disc's area in the continuum, a little different on a small grid);
  a smooth image has a much smaller share.
- Video (N, C, T, h, w): the spatial spectrum over every frame, and a temporal spectrum: the DFT along T at every
  position, power per temporal frequency `|f_t| = k / T` in [0, 1/2], and its `temporal_high_frequency_energy`
  (share at `|f_t| >= 1/4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LatentSpectrum", "latent_spectrum", "radial_spectrum", "standardize_channels"]


def standardize_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> each channel with mean 0 and std 1 over samples and positions (float64)."""
    x = x.double()
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1e-12)
    return (x - mean) / std


def _radius_grid(height: int, width: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return (fy.square() + fx.square()).sqrt()


@dataclass
class _Radial:
    frequencies: torch.Tensor  # bin centres, cycles per latent pixel
    power: torch.Tensor  # mean power per coefficient in each bin
    high_frequency_energy: float
    high_frequency_area: float


def radial_spectrum(fields: torch.Tensor) -> _Radial:
    """Radially averaged power spectrum of fields (..., h, w), already standardised (see the module docstring)."""
    height, width = fields.shape[-2:]
    power = torch.fft.fft2(fields.double()).abs().square() / (height * width)
    power = power.reshape(-1, height, width).mean(0)  # average over samples, channels and frames
    radius = _radius_grid(height, width)
    inside = radius <= 0.5
    num_bins = max(min(height, width) // 2, 1)
    bins = (radius * 2 * num_bins).floor().long().clamp_max(num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins[inside], power[inside])
    counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins[inside], torch.ones_like(power[inside]))
    high = inside & (radius >= 0.25)
    total = float(power[inside].sum())
    return _Radial(
        frequencies=(torch.arange(num_bins, dtype=torch.float64) + 0.5) / (2 * num_bins),
        power=sums / counts.clamp_min(1),
        high_frequency_energy=float(power[high].sum()) / total if total > 0 else math.nan,
        high_frequency_area=float(high.sum()) / float(inside.sum()),
    )


def _temporal(fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, C, T, h, w) standardised -> (frequencies, mean power per frequency |f_t|, share at |f_t| >= 1/4)."""
    frames = fields.shape[2]
    power = torch.fft.fft(fields, dim=2).abs().square() / frames
    power = power.transpose(0, 2).reshape(frames, -1).mean(1)
    frequency = torch.fft.fftfreq(frames, dtype=torch.float64).abs()
    unique = torch.unique(frequency)
    curve = torch.stack([power[frequency == f].mean() for f in unique])
    total = float(power.sum())
    share = float(power[frequency >= 0.25].sum()) / total if total > 0 else math.nan
    return unique, curve, share


@dataclass
class LatentSpectrum:
    """Spectra of a set of latents (and of their images at latent resolution).

    Attributes:
        frequencies: radial bin centres in cycles per latent pixel, over (0, 1/2).
        latent_power: radially averaged power of the per-channel standardised latents (mean over channels).
        high_frequency_energy: share of the latents' power at radial frequencies >= 1/4 (module docstring).
        high_frequency_area: the same share for white noise (the share of coefficients there), for reference.
        image_power / image_high_frequency_energy: the same for the images resized to the latent grid (None
            without images).
        temporal_frequencies / temporal_power / temporal_high_frequency_energy (and image_ ones): video only.
        channel_high_frequency_energy: the share per latent channel.
    """

    frequencies: list[float]
    latent_power: list[float]
    high_frequency_energy: float
    high_frequency_area: float
    channel_high_frequency_energy: list[float]
    image_power: list[float] | None = None
    image_high_frequency_energy: float | None = None
    temporal_frequencies: list[float] | None = None
    temporal_power: list[float] | None = None
    temporal_high_frequency_energy: float | None = None
    image_temporal_power: list[float] | None = None
    image_temporal_high_frequency_energy: float | None = None
    shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _images_at(images: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    # Area averaging: what a VAE's downsampling sees, without the aliasing of nearest/bilinear subsampling.
    images = images.double()
    if tuple(images.shape[2:]) == tuple(size):
        return images
    return F.adaptive_avg_pool3d(images, size) if images.ndim == 5 else F.adaptive_avg_pool2d(images, size)


def latent_spectrum(latents: torch.Tensor, images: torch.Tensor | None = None) -> LatentSpectrum:
    """Spectra of latents (N, C, h, w) or (N, C, T, h, w) and, with `images` ((N, 3, H, W) or (N, 3, T, H, W),
    any range), of those images area-resized to the latent grid. See the module docstring for the definitions."""
    if latents.ndim not in (4, 5):
        raise ValueError(
            f"latent_spectrum takes latents (N, C, h, w) or (N, C, T, h, w), got shape {tuple(latents.shape)}; "
            "add the batch dimension with latents.unsqueeze(0)."
        )
    if not torch.isfinite(latents).all():
        raise ValueError("The latents contain NaN or Inf; drop those samples (or re-encode in float32) first.")
    if images is not None and (images.ndim != latents.ndim or images.shape[0] != latents.shape[0]):
        raise ValueError(
            f"images {tuple(images.shape)} must have the latents' rank and sample count ({tuple(latents.shape)})."
        )
    standard = standardize_channels(latents)
    radial = radial_spectrum(standard)
    per_channel = [radial_spectrum(standard[:, c]).high_frequency_energy for c in range(standard.shape[1])]
    result = LatentSpectrum(
        frequencies=radial.frequencies.tolist(),
        latent_power=radial.power.tolist(),
        high_frequency_energy=radial.high_frequency_energy,
        high_frequency_area=radial.high_frequency_area,
        channel_high_frequency_energy=per_channel,
        shape=list(latents.shape[1:]),
    )
    image_standard = None
    if images is not None:
        image_standard = standardize_channels(_images_at(images, tuple(latents.shape[2:])))
        image_radial = radial_spectrum(image_standard)
        result.image_power = image_radial.power.tolist()
        result.image_high_frequency_energy = image_radial.high_frequency_energy
    if latents.ndim == 5:
        frequencies, power, share = _temporal(standard)
        result.temporal_frequencies, result.temporal_power = frequencies.tolist(), power.tolist()
        result.temporal_high_frequency_energy = share
        if image_standard is not None:
            _, image_power, image_share = _temporal(image_standard)
            result.image_temporal_power, result.image_temporal_high_frequency_energy = (
                image_power.tolist(),
                image_share,
            )
    return result
