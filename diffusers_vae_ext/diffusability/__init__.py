"""Diffusability: how easily a diffusion model learns a VAE's latent space (docs/diffusability.md).

- `spectrum`: `latent_spectrum`, per-channel standardised radial power spectra of latents and of their images at
  latent resolution, and `high_frequency_energy`;
- `probe`: `measure_diffusability`, a small diffusers UNet trained with flow matching for a fixed budget on
  per-element standardised latents, held-out loss relative to the per-element Gaussian optimum (`probe_loss`);
- `denoiser`: the probe's fixed denoiser (per frame with temporal mixing for video latents);
- `sources`: latents from a tensor, a `LatentCacheDataset` or a cache folder / URL;
- `samples`: decoding the probe's samples with the VAE, PNG grids;
- `plots`: spectrum and per-t curve plots (matplotlib).

Sits below `evaluation` and `training` (they use it; it imports neither).
"""

from .probe import DiffusabilityResult, gaussian_optimum_loss, measure_diffusability
from .spectrum import LatentSpectrum, latent_spectrum

__all__ = [
    "DiffusabilityResult",
    "LatentSpectrum",
    "gaussian_optimum_loss",
    "latent_spectrum",
    "measure_diffusability",
]
