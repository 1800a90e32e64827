"""Regularisers that make latents easy to diffuse (2025), each added to the usual LDM autoencoder loss.

| flag | paper | what the trainer adds to the generator loss |
|---|---|---|
| `--equivariance` | EQ-VAE, Kouzelis et al., ICML 2025, arXiv:2502.09509 | with probability 1 - p_prior the step's whole reconstruction loss is taken on `D(tau(z))` against `tau(x)` instead of `D(z)` against `x` |
| `--scale_equivariance` | Skorokhodov et al., ICML 2025, arXiv:2502.14831 | `weight * rec(D(down(z)), down(x))`, down = 2x or 4x bilinear |
| `--align_to PATH`, `--align_weight` | VA-VAE, Yao et al., CVPR 2025, arXiv:2501.01423 | `adaptive * align_weight * vf_loss(proj(z), DINOv2(x))` |
| `--latent_noise SIGMA` | RAE, Zheng et al., arXiv:2510.11690 | nothing: the decoder sees `z + sigma_i * eps` |

`REGULARISER_DEFAULTS` holds each one's paper, defaults and flag help as plain JSON-able values, so a run can
record them in its provenance. Every function here works on images (N, C, H, W) and videos (N, C, T, H, W); spatial
transforms of videos act on each frame (T is folded into the batch), on any device and float dtype.
`equivariance_error` is the metric that tells whether `--equivariance` / `--scale_equivariance` worked.

Randomness comes from a `torch.Generator` the caller owns, so a resumed run that restores the generator's state
draws the same transforms and noise as the uninterrupted one.

Modules, lower layers first (each imports only those above it):

- `transforms`: frame folding for videos, `resize_spatial`, the pixel/latent grid checks;
- `equivariance`: EQ-VAE's `EquivarianceTransform` and `sample_equivariance_transform`;
- `scale`: scale equivariance's `sample_scale_factor` and `scale_equivariance_pair`;
- `noise`: `augment_latents` for noise-augmented decoders;
- `metric`: `equivariance_error`;
- `alignment`: VA-VAE's `VisionFoundationAlignment`, its adaptive weight, `load_vision_model`;
- `defaults`: `REGULARISER_DEFAULTS`.
"""

from .alignment import (
    VisionFeatureExtractor,
    VisionFoundationAlignment,
    encoder_last_layer,
    load_vision_model,
    vf_adaptive_weight,
)
from .defaults import REGULARISER_DEFAULTS
from .equivariance import EQ_VAE_SCALES, EquivarianceTransform, sample_equivariance_transform
from .metric import EQUIVARIANCE_ERROR_TRANSFORMS, equivariance_error
from .noise import augment_latents
from .scale import SCALE_EQUIVARIANCE_FACTORS, sample_scale_factor, scale_equivariance_pair
from .transforms import resize_spatial

__all__ = [
    "EQ_VAE_SCALES",
    "EQUIVARIANCE_ERROR_TRANSFORMS",
    "REGULARISER_DEFAULTS",
    "SCALE_EQUIVARIANCE_FACTORS",
    "EquivarianceTransform",
    "VisionFeatureExtractor",
    "VisionFoundationAlignment",
    "augment_latents",
    "encoder_last_layer",
    "equivariance_error",
    "load_vision_model",
    "resize_spatial",
    "sample_equivariance_transform",
    "sample_scale_factor",
    "scale_equivariance_pair",
    "vf_adaptive_weight",
]
