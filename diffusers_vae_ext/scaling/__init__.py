"""Latent scaling conventions: apply and undo `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std`.

Diffusion models are trained on latents of about unit variance. diffusers' pipelines undo the scaling right
before `vae.decode`, in one of three ways depending on the VAE config; `unscale_latents` mirrors them exactly
and `scale_latents` is its inverse:

| config has | scale (before the diffusion model) | unscale (pipelines, before `vae.decode`) | used by |
|---|---|---|---|
| `latents_mean` and `latents_std` | `(z - mean_c) * scaling_factor / std_c` | `z * std_c / scaling_factor + mean_c` | SDXL-style configs |
| `shift_factor` | `(z - shift_factor) * scaling_factor` | `z / scaling_factor + shift_factor` | SD3, FLUX |
| only `scaling_factor` | `z * scaling_factor` | `z / scaling_factor` | SD 1.x, 2.x, SDXL |

The numbers come from data: `LatentStatistics` accumulates latent statistics (streaming, float64, mergeable across
processes, with standard errors), `estimate_latent_statistics` encodes pixel batches into it,
and `write_latent_statistics` writes a convention's keys into a VAE folder's config.json. `diffusers-vae stats`
(statistics of an image folder or a latent cache) is built on them in `diffusers_vae_ext.stats`. See
docs/scaling.md.

Modules: `apply` (`scaling_convention`, `scale_latents`, `unscale_latents`), `latent_statistics`
(`LatentStatistics`), `estimate` (`encode_latents`, `estimate_latent_statistics`, `write_latent_statistics`). The
public names are importable from `diffusers_vae_ext.scaling`.
"""

from .apply import CONVENTIONS, scale_latents, scaling_convention, unscale_latents
from .estimate import _atomic_write_text as _atomic_write_text  # the old private name (see estimate.py)
from .estimate import (
    encode_latents,
    estimate_latent_statistics,
    posterior_seed,
    write_latent_statistics,
)
from .latent_statistics import LatentStatistics

__all__ = [
    "CONVENTIONS",
    "LatentStatistics",
    "encode_latents",
    "estimate_latent_statistics",
    "posterior_seed",
    "scale_latents",
    "scaling_convention",
    "unscale_latents",
    "write_latent_statistics",
]
