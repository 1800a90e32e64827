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
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import adaptive_weight

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

# EQ-VAE's scale factors: s / 32 for s in 8..31, i.e. [0.25, 1) (zelaki/eqvae `uniform_sample_scale=True`).
EQ_VAE_SCALES: tuple[float, ...] = tuple(s / 32 for s in range(8, 32))
# Skorokhodov et al. downsample latents and images 2x or 4x; integer factors keep the pixel and latent grids aligned.
SCALE_EQUIVARIANCE_FACTORS: tuple[int, ...] = (2, 4)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REGULARISER_DEFAULTS: dict[str, dict] = {
    "equivariance": {
        "flag": "--equivariance",
        "paper": "EQ-VAE (Kouzelis et al., ICML 2025, arXiv:2502.09509); code zelaki/eqvae",
        "help": (
            "EQ-VAE (arXiv:2502.09509): decode scaled (0.25-1x) and 90/180/270-degree rotated latents against the "
            "same transform of the images; with probability p_prior a plain step (prior preservation)."
        ),
        "defaults": {
            "p_prior": 0.5,
            "p_prior_low_res": 0.25,
            "scales": "s/32 for s in 8..31",
            "rotate": True,
            "anisotropic": False,
            "antialias": True,
        },
        "paper_recipe": {"kl_weight": 1e-6, "disc_weight": 0.5, "learning_rate": 4.5e-6, "epochs": 5},
        "ours": ["antialias (EQ-VAE's code resizes with plain bilinear)", "p_prior read as the README defines it"],
    },
    "scale_equivariance": {
        "flag": "--scale_equivariance",
        "paper": "Improving the Diffusability of Autoencoders (Skorokhodov et al., ICML 2025, arXiv:2502.14831)",
        "help": (
            "Scale equivariance (arXiv:2502.14831): 2x/4x-downsampled latents must decode to the downsampled "
            "images (an extra reconstruction term); 10-20k fine-tuning steps in the paper."
        ),
        "defaults": {"factors": list(SCALE_EQUIVARIANCE_FACTORS), "weight": 1.0, "antialias": True},
        "ours": ["weight 1.0 (the paper's weight was not checked here)", "antialias"],
    },
    "align": {
        "flag": "--align_to PATH / --align_weight",
        "paper": "VA-VAE / LightningDiT (Yao et al., CVPR 2025, arXiv:2501.01423); code hustvl/LightningDiT",
        "help": (
            "VA-VAE (arXiv:2501.01423): align latents (1x1-conv projected) to a frozen vision model loaded from "
            "the local transformers folder PATH (e.g. DINOv2): margin cosine + distance-matrix loss, adaptive weight."
        ),
        "defaults": {
            "align_weight": 0.1,
            "cos_margin": 0.5,
            "distmat_margin": 0.25,
            "cos_weight": 1.0,
            "distmat_weight": 1.0,
            "adaptive": True,
            "max_adaptive_weight": 1e8,
        },
        "ours": ["ImageNet normalisation of the vision model's input", "features resized to the latent grid"],
    },
    "latent_noise": {
        "flag": "--latent_noise SIGMA",
        "paper": "Noise-augmented decoder training, RAE (Zheng et al., arXiv:2510.11690)",
        "help": (
            "Noise-augmented decoder (RAE, arXiv:2510.11690): the decoder sees z + sigma * eps, sigma drawn per "
            "sample from [0, SIGMA] in units of the latent's own std."
        ),
        "defaults": {"sigma": 0.1, "relative": True},
        "ours": ["sigma 0.1, uniform per sample, relative to the latent's std"],
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Spatial transforms shared by the regularisers
# ----------------------------------------------------------------------------------------------------------------


def _fold_frames(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
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
    folded, unfold = _fold_frames(x)
    work = folded.float() if folded.dtype in (torch.float16, torch.bfloat16) else folded
    out = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return unfold(out.to(x.dtype))


def _scaled_size(length: int, scale: float) -> int:
    # Floor like `F.interpolate(scale_factor=...)` (what EQ-VAE's code uses); the epsilon keeps 32 * 0.75 at 24.
    return max(1, int(math.floor(length * scale + 1e-6)))


def _spatial_factor_of(z: Tensor, x: Tensor) -> int:
    """Pixels per latent pixel, from the shapes of a latent and the image it encodes."""
    (h, w), (height, width) = z.shape[-2:], x.shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"Images {tuple(x.shape)} and latents {tuple(z.shape)} do not have one integer spatial factor; "
            "pass spatial_factor explicitly or crop the images to a multiple of the autoencoder's factor."
        )
    return height // h


def _check_image_grid(x: Tensor, spatial_factor: int) -> tuple[int, int]:
    if spatial_factor < 1:
        raise ValueError(f"spatial_factor must be a positive integer, got {spatial_factor}.")
    height, width = x.shape[-2:]
    if height % spatial_factor or width % spatial_factor:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the autoencoder's spatial factor {spatial_factor}; "
            "crop or resize the images to a multiple first."
        )
    return height // spatial_factor, width // spatial_factor


# ----------------------------------------------------------------------------------------------------------------
# EQ-VAE
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivarianceTransform:
    """One EQ-VAE transform tau: a bilinear rescale by `scale` (height, width) followed by `quarter_turns` x 90
    degrees of rotation, applied to latents and (at pixel resolution) to images alike.

    Sizes are decided on the latent grid: a latent of h x w becomes floor(h * s_h) x floor(w * s_w), and an image of
    (h * f) x (w * f) becomes exactly floor(h * s_h) * f x floor(w * s_w) * f, so the transformed image is what
    the decoder of the transformed latent must produce (f = the autoencoder's spatial factor).

    `input_only=True` marks EQ-VAE's low-resolution prior preservation: the *input* image is rescaled (no rotation)
    and the step is a plain reconstruction of that smaller image; `apply_latent` is then not used.

    How a trainer uses it (x images, f spatial factor, `rec` its reconstruction + LPIPS + GAN loss)::

        tau = sample_equivariance_transform(generator)
        if tau is not None and tau.input_only:
            x = tau.apply_image(x, f)                 # smaller input, plain step below
        z = vae.encode(x).latent_dist.sample()
        if tau is None or tau.input_only:
            loss = rec(x, vae.decode(z).sample)       # + KL on the posterior, as usual
        else:
            loss = rec(tau.apply_image(x, f), vae.decode(tau.apply_latent(z)).sample)
    """

    scale: tuple[float, float] = (1.0, 1.0)
    quarter_turns: int = 0
    input_only: bool = False
    antialias: bool = True

    def __post_init__(self):
        if len(self.scale) != 2 or min(self.scale) <= 0:
            raise ValueError(f"scale must be two positive factors (height, width), got {self.scale}.")

    @property
    def name(self) -> str:
        """Short description for logs, e.g. `scale 0.75x0.5 rot 90` or `low-res prior 0.5`."""
        sh, sw = self.scale
        scale = f"{sh:g}" if sh == sw else f"{sh:g}x{sw:g}"
        if self.input_only:
            return f"low-res prior {scale}"
        rotation = f" rot {90 * (self.quarter_turns % 4)}" if self.quarter_turns % 4 else ""
        return f"scale {scale}{rotation}"

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The size (before rotation) a latent of `height` x `width` is rescaled to."""
        return _scaled_size(height, self.scale[0]), _scaled_size(width, self.scale[1])

    def _rotate(self, x: Tensor) -> Tensor:
        turns = self.quarter_turns % 4
        return torch.rot90(x, k=turns, dims=(-2, -1)) if turns else x

    def apply_latent(self, z: Tensor) -> Tensor:
        """tau(z) for latents (N, C, h, w) or (N, C, T, h, w)."""
        return self._rotate(resize_spatial(z, self.latent_size(*z.shape[-2:]), self.antialias))

    def apply_image(self, x: Tensor, spatial_factor: int) -> Tensor:
        """tau(x) for images (N, C, H, W) or videos (N, C, T, H, W) whose sides are multiples of `spatial_factor`."""
        h, w = _check_image_grid(x, spatial_factor)
        th, tw = self.latent_size(h, w)
        resized = resize_spatial(x, (th * spatial_factor, tw * spatial_factor), self.antialias)
        return resized if self.input_only else self._rotate(resized)


def sample_equivariance_transform(
    generator: torch.Generator,
    *,
    p_prior: float = 0.5,
    p_prior_low_res: float = 0.25,
    scales: tuple[float, ...] = EQ_VAE_SCALES,
    rotate: bool = True,
    anisotropic: bool = False,
    antialias: bool = True,
) -> EquivarianceTransform | None:
    """Draw this step's EQ-VAE transform, or None for a plain step.

    Args:
        generator: the caller's `torch.Generator`; every call consumes exactly five uniforms from it, whatever
            the outcome, so the stream (and a resumed run restoring its state) stays in step.
        p_prior: probability of *prior preservation*, i.e. of an ordinary reconstruction step instead of the
            equivariance one. The EQ-VAE README defines it this way; its training code takes the equivariance
            branch when `random() < p_prior`, the opposite. With the paper's 0.5 both read the same; we follow the
            README (and the name) so that `p_prior=1` means "never regularise".
        p_prior_low_res: within prior preservation, probability that the input image is first rescaled by a
            factor from `scales` (EQ-VAE's `p_prior_s`, 0.25): returned as a transform with `input_only=True`.
        scales: rescale factors drawn uniformly (EQ-VAE: s/32 for s in 8..31).
        rotate: also rotate by 90, 180 or 270 degrees (EQ-VAE's code always does, with every rescale).
        anisotropic: draw the height and width factors independently.
        antialias: low-pass when shrinking. EQ-VAE's code resizes with plain bilinear; we antialias by default
            so the target image is a faithful smaller picture rather than an aliased one (the decoder would
            otherwise learn to draw aliasing). Set False to follow the code exactly.
    """
    for name, p in (("p_prior", p_prior), ("p_prior_low_res", p_prior_low_res)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}.")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}.")
    u = torch.rand(5, generator=generator, device=generator.device, dtype=torch.float64).tolist()

    def pick(value: float, options):
        return options[min(int(value * len(options)), len(options) - 1)]

    scale_h = pick(u[2], scales)
    if u[0] < p_prior:
        if u[1] < p_prior_low_res:
            return EquivarianceTransform((scale_h, scale_h), 0, input_only=True, antialias=antialias)
        return None
    scale_w = pick(u[3], scales) if anisotropic else scale_h
    turns = pick(u[4], (1, 2, 3)) if rotate else 0
    return EquivarianceTransform((scale_h, scale_w), turns, antialias=antialias)


# ----------------------------------------------------------------------------------------------------------------
# Scale equivariance (Skorokhodov et al.)
# ----------------------------------------------------------------------------------------------------------------


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
        spatial_factor = _spatial_factor_of(z, x)
    h, w = _check_image_grid(x, spatial_factor)
    if (h, w) != tuple(z.shape[-2:]):
        raise ValueError(
            f"Images {tuple(x.shape)} do not match latents {tuple(z.shape)} at spatial factor {spatial_factor}."
        )
    th, tw = _scaled_size(h, 1 / factor), _scaled_size(w, 1 / factor)
    return (
        resize_spatial(z, (th, tw), antialias),
        resize_spatial(x, (th * spatial_factor, tw * spatial_factor), antialias),
    )


# ----------------------------------------------------------------------------------------------------------------
# Noise-augmented decoder training
# ----------------------------------------------------------------------------------------------------------------


def augment_latents(
    z: Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
    *,
    relative: bool = True,
    global_batch_size: int | None = None,
    offset: int = 0,
) -> Tensor:
    """z + sigma_i * eps with sigma_i ~ U[0, sigma] drawn per sample and eps ~ N(0, I): the decoder's input in
    noise-augmented decoder training (RAE, arXiv:2510.11690), so it learns to decode the slightly-off latents a
    diffusion model samples.

    With `relative=True` (default) sigma is in units of each sample's own latent standard deviation (detached), so
    one value means the same for every autoencoder class whatever its raw latent scale; `relative=False` adds
    absolute noise. Use it on the decoder's input only: the KL and any encoder-side loss keep the clean `z`.
    The gradient to `z` is unchanged (identity). Noise is drawn on `generator`'s device (CPU by default, so runs
    are reproducible across devices) and moved to `z`'s device and dtype.

    Several processes: give every rank the same generator state, `global_batch_size` (the batch summed over ranks)
    and `offset` (this rank's first row); each draws the global batch's noise and keeps its own rows, so the run
    adds the same noise to each sample as one process would, and the generators stay in step.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}.")
    if sigma == 0:
        return z
    rows = z.shape[0] if global_batch_size is None else global_batch_size
    if offset < 0 or offset + z.shape[0] > rows:
        raise ValueError(f"Rows {offset}..{offset + z.shape[0]} do not fit in a global batch of {rows}.")
    device = generator.device if generator is not None else z.device
    levels = torch.rand(rows, generator=generator, device=device, dtype=torch.float32) * sigma
    eps = torch.randn((rows, *z.shape[1:]), generator=generator, device=device, dtype=torch.float32)
    levels, eps = levels[offset : offset + z.shape[0]], eps[offset : offset + z.shape[0]]
    levels = levels.to(z.device).view(-1, *([1] * (z.ndim - 1)))
    if relative:
        levels = levels * z.detach().float().flatten(1).std(dim=1).view_as(levels)
    return z + (levels * eps.to(z.device)).to(z.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------------------------

EQUIVARIANCE_ERROR_TRANSFORMS: dict[str, EquivarianceTransform] = {
    "scale_0.5": EquivarianceTransform((0.5, 0.5)),
    "scale_0.75": EquivarianceTransform((0.75, 0.75)),
    "rotate_90": EquivarianceTransform((1.0, 1.0), quarter_turns=1),
}


@torch.no_grad()
def equivariance_error(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    transforms: dict[str, EquivarianceTransform] | None = None,
    per_transform: bool = False,
) -> float | dict[str, float]:
    """Relative equivariance error of an encoder: mean over images and transforms of
    ||E(tau(x)) - tau(E(x))|| / ||tau(E(x))||.

    Args:
        encode: images -> latents, deterministic (e.g. `lambda x: vae.encode(x).latent_dist.mode()`).
        images: (N, C, H, W) or (N, C, T, H, W) in the encoder's range, sides a multiple of its spatial factor
            (the factor is read off the shapes of `images` and `encode(images)`).
        transforms: name -> transform; default `EQUIVARIANCE_ERROR_TRANSFORMS` (rescale 0.5, rescale 0.75,
            rotation by 90 degrees, each alone).
        per_transform: return {name: error, ..., "mean": error} instead of the mean alone.

    0 for an encoder that commutes with every transform; the trainer's tests expect `--equivariance` to lower it.
    """
    transforms = EQUIVARIANCE_ERROR_TRANSFORMS if transforms is None else transforms
    if not transforms:
        raise ValueError("transforms must not be empty.")
    latents = encode(images)
    spatial_factor = _spatial_factor_of(latents, images)
    errors = {}
    for name, transform in transforms.items():
        if transform.input_only:
            raise ValueError(f"Transform {name!r} is input-only (prior preservation); it has no latent side.")
        expected = transform.apply_latent(latents).float()
        got = encode(transform.apply_image(images, spatial_factor)).float()
        if got.shape != expected.shape:
            raise ValueError(
                f"{name}: the encoder returned {tuple(got.shape)} for the transformed images but tau(E(x)) has "
                f"{tuple(expected.shape)}; the encoder must keep the spatial factor {spatial_factor} at every size."
            )
        distance = (got - expected).flatten(1).norm(dim=1)
        errors[name] = (distance / expected.flatten(1).norm(dim=1).clamp_min(1e-12)).mean().item()
    mean = sum(errors.values()) / len(errors)
    return {**errors, "mean": mean} if per_transform else mean


# ----------------------------------------------------------------------------------------------------------------
# VA-VAE: vision foundation model alignment
# ----------------------------------------------------------------------------------------------------------------


class VisionFoundationAlignment(nn.Module):
    """VA-VAE's "VF loss": latents, mapped by a 1x1 conv to the vision model's width, are pulled towards its
    features (arXiv:2501.01423; hustvl/LightningDiT `vavae/ldm/modules/losses/contperceptual.py`).

        z'   = proj(z)                                    (1x1 conv, no bias: LightningDiT's `reverse_proj`)
        cos  = mean_{n,i} relu(1 - cos_margin - cos(z'_{n,:,i}, f_{n,:,i}))
        dist = mean_{n,i,j} relu(|S(z')_{n,i,j} - S(f)_{n,i,j}| - distmat_margin),  S = cosine-similarity matrix
               of the positions of one sample
        loss = cos_weight * cos + distmat_weight * dist

    Defaults are LightningDiT's `vavae/configs/f16d32_vfdinov2.yaml` (margins 0.5 / 0.25, vf_weight 0.1 with the
    adaptive weight, see `vf_adaptive_weight`); its first long stage uses margins 0 and weight 0.5.

    Grids: DINOv2's patch 14 rarely gives the latent grid (stride 8 or 16). We resize the *foundation features* to
    the latent grid (bilinear, antialiased when shrinking), never the latents: every latent position is then
    constrained and the encoder's gradient is not blurred by a resize; the features are frozen targets, so their
    resize costs nothing backward. (LightningDiT instead feeds DINOv2 224 px images so that its 16x16 grid equals
    an f16 latent of a 256 px image; `VisionFeatureExtractor(images, grid=...)` does that when asked.)

    Memory: S has (h * w)^2 entries per sample (1 GiB in float32 for a 128x128 latent), so above
    `distmat_max_positions` positions the distance-matrix term compares average-pooled maps (the cosine term stays at
    full resolution). LightningDiT's f16 latents of 256 px images have 256 positions; the default 4096 (a 64x64
    latent) keeps the exact formula up to 512 px at f8.

    Videos: latents (N, C, T, h, w) against features (N, D, T, h', w') of the frames matching the latent frames
    (e.g. `x[:, :, ::temporal_factor]` for causal video VAEs); positions are compared within each frame.

    The projection is trained with the autoencoder: put `parameters()` in the generator's optimizer and save them
    with the training checkpoints (they are not part of the exported diffusers folder).
    """

    def __init__(
        self,
        latent_channels: int,
        feature_dim: int,
        *,
        cos_margin: float = 0.5,
        distmat_margin: float = 0.25,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        distmat_max_positions: int = 4096,
    ):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)
        self.cos_margin = cos_margin
        self.distmat_margin = distmat_margin
        self.cos_weight = cos_weight
        self.distmat_weight = distmat_weight
        self.distmat_max_positions = distmat_max_positions

    def project(self, z: Tensor) -> Tensor:
        """proj(z), frame by frame for 5-D latents; same layout as `z` with `feature_dim` channels."""
        folded, unfold = _fold_frames(z)
        return unfold(self.proj(folded.to(self.proj.weight.dtype)))

    def forward(self, z: Tensor, features: Tensor, return_terms: bool = False) -> Tensor | tuple[Tensor, dict]:
        """The VF loss (a float32 scalar) of latents `z` against frozen `features` (N, D, h', w') / (N, D, T, h', w').

        With `return_terms=True` also returns {"vf_cos": ..., "vf_distmat": ...} (detached) for logging.
        """
        if (
            z.ndim != features.ndim
            or z.shape[0] != features.shape[0]
            or (z.ndim == 5 and z.shape[2] != features.shape[2])
        ):
            raise ValueError(
                f"Latents {tuple(z.shape)} and vision features {tuple(features.shape)} must have the same batch "
                "(and, for videos, frame) count; for causal video VAEs pick the frames x[:, :, ::temporal_factor]."
            )
        if features.shape[1] != self.proj.out_channels:
            raise ValueError(
                f"Vision features have {features.shape[1]} channels but the projection maps to "
                f"{self.proj.out_channels}; build VisionFoundationAlignment(feature_dim=vision.feature_dim)."
            )
        projected, _ = _fold_frames(self.project(z))
        target, _ = _fold_frames(features.detach())
        projected = projected.float()
        target = resize_spatial(target.float(), projected.shape[-2:], antialias=True)
        cos_zf = F.cosine_similarity(projected, target, dim=1)  # (B, h, w)
        cos = F.relu(1.0 - self.cos_margin - cos_zf).mean()
        positions = projected.shape[-2] * projected.shape[-1]
        if positions > self.distmat_max_positions:
            stride = math.ceil(math.sqrt(positions / self.distmat_max_positions))
            projected = F.avg_pool2d(projected, stride, ceil_mode=True)
            target = F.avg_pool2d(target, stride, ceil_mode=True)
        projected = F.normalize(projected.flatten(2), dim=1)  # (B, D, positions), unit vectors
        target = F.normalize(target.flatten(2), dim=1)
        similarity_z = projected.transpose(1, 2) @ projected
        similarity_f = target.transpose(1, 2) @ target
        distmat = F.relu((similarity_z - similarity_f).abs() - self.distmat_margin).mean()
        loss = self.cos_weight * cos + self.distmat_weight * distmat
        if return_terms:
            return loss, {"vf_cos": cos.detach(), "vf_distmat": distmat.detach()}
        return loss


def vf_adaptive_weight(nll_loss: Tensor, vf_loss: Tensor, last_layer: Tensor, vf_weight: float = 0.1) -> Tensor:
    """VA-VAE's weight of the VF loss: ||d nll/d W|| / (||d vf/d W|| + 1e-4), clamped to [0, 1e8], detached,
    times `vf_weight` (`--align_weight`); W is the encoder's last layer (`encoder_last_layer(vae)`).

    The trainer adds `vf_adaptive_weight(nll, vf, W, align_weight) * vf` to the generator loss, nll being its
    reconstruction (+ perceptual) term. Both losses must depend on W (the encoder must be trained).
    """
    return adaptive_weight(nll_loss, vf_loss, last_layer, vf_weight, max_weight=1e8)


def encoder_last_layer(vae: nn.Module) -> Tensor:
    """The weight of the last convolution of `vae.encoder`: where VA-VAE balances its VF loss.

    `encoder.conv_out` for our AutoencoderKL and diffusers' AutoencoderKL, AutoencoderKLFlux2, AutoencoderDC and
    AutoencoderKLWan / QwenImage (a Conv2d/Conv3d), its inner `.conv` for the causal-conv wrappers of HunyuanVideo,
    LTX and CogVideoX; the last Conv2d of `encoder.layers` for AutoencoderTiny. (LightningDiT uses
    `encoder.conv_out.weight`, before `quant_conv`.)
    """
    encoder = getattr(vae, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(vae).__name__} has no `encoder` module; cannot find its last layer.")
    conv_out = getattr(encoder, "conv_out", None)
    search = encoder if conv_out is None else conv_out
    convs = [m for m in search.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"No convolution found in {type(vae).__name__}.encoder; pass its last layer explicitly.")
    return convs[-1].weight


class VisionFeatureExtractor(nn.Module):
    """A frozen transformers vision model as a feature map: images in [-1, 1] -> patch features (N, D, h, w).

    Build it with `load_vision_model(path)`. Images are mapped to [0, 1], normalised with the folder's
    preprocessor mean/std (ImageNet's when it has none) and resized (bilinear, antialiased) to a multiple of the
    patch size; the CLS and register tokens are dropped from `last_hidden_state`. Always in eval mode, no parameter
    requires grad, and features are computed without a graph: they are targets, never trained through.
    """

    def __init__(self, model: nn.Module, patch_size: int, mean, std, source: str = ""):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.patch_size = int(patch_size)
        self.feature_dim = int(model.config.hidden_size)
        self.source = source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._takes_interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def train(self, mode: bool = True) -> VisionFeatureExtractor:
        """Always eval: a trainer's `.train()` on a parent module must not switch on dropout in the frozen model."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Features (N, D, h, w) of images (N, 3, H, W) in [-1, 1]; videos (N, 3, T, H, W) give (N, D, T, h, w).

        `grid=(h, w)` resizes the images to (h * patch, w * patch) so the features come out on exactly that grid
        (LightningDiT's choice); by default the images are resized down to the nearest multiple of the patch size.
        """
        folded, unfold = _fold_frames(images)
        if folded.shape[1] != self.mean.shape[1]:
            raise ValueError(f"The vision model takes {self.mean.shape[1]}-channel images, got {tuple(images.shape)}.")
        patch = self.patch_size
        if grid is None:
            grid = (folded.shape[-2] // patch, folded.shape[-1] // patch)
            if min(grid) < 1:
                raise ValueError(f"Images {tuple(images.shape)} are smaller than one {patch}px patch.")
        h, w = int(grid[0]), int(grid[1])
        pixels = resize_spatial(folded.float(), (h * patch, w * patch), antialias=True)
        pixels = ((pixels + 1) / 2 - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        kwargs = {"interpolate_pos_encoding": True} if self._takes_interpolate else {}
        tokens = self.model(pixel_values=pixels.to(dtype), **kwargs).last_hidden_state
        prefix = tokens.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"The vision model returned {tokens.shape[1]} tokens for a {h}x{w} patch grid.")
        features = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return unfold(features)


def _refuse(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"--align_to {path}: {problem}. It must be a local folder holding a transformers vision model saved with "
        "safetensors (config.json with a patch_size, model.safetensors, optionally preprocessor_config.json), e.g. "
        "DINOv2: on a machine with network run `huggingface-cli download facebook/dinov2-base --local-dir DIR` "
        "(or `Dinov2Model.from_pretrained(...).save_pretrained(DIR)`) and pass --align_to DIR."
    )


def load_vision_model(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> VisionFeatureExtractor:
    """Load a frozen vision model (e.g. DINOv2) from a LOCAL transformers folder as a `VisionFeatureExtractor`.

    Only local files (`local_files_only=True`) and only safetensors weights (`use_safetensors=True`) are read;
    the mean/std come from the folder's `preprocessor_config.json` (`image_mean`, `image_std`), ImageNet's when it
    has none. Raises ValueError saying what to put where for a missing folder, a folder without a transformers
    config or safetensors weights, or a model that is not a patch-based vision model taking `pixel_values`.
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path).expanduser()
    if not path.is_dir():
        raise _refuse(path, "no such folder")
    if not (path / "config.json").is_file():
        raise _refuse(path, "no config.json in it, so it is not a transformers model folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise _refuse(path, "no .safetensors weights in it (other weight formats are never loaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise _refuse(path, f"transformers cannot read its config.json ({error})") from error
    patch_size = getattr(config, "patch_size", None)
    if not isinstance(patch_size, int) or not hasattr(config, "hidden_size"):
        kind = getattr(config, "model_type", "unknown")
        raise _refuse(
            path, f"its model (model_type={kind!r}) is not a patch-based vision model (no integer patch_size)"
        )
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(dtype)
    parameters = inspect.signature(model.forward).parameters
    needs_text = "input_ids" in parameters and parameters["input_ids"].default is inspect.Parameter.empty
    if "pixel_values" not in parameters or needs_text:
        raise _refuse(path, f"{type(model).__name__} does not take images alone (pixel_values)")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    channels = int(getattr(config, "num_channels", 3))
    if len(mean) != channels or len(std) != channels:
        raise _refuse(path, f"its preprocessor mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    extractor = VisionFeatureExtractor(model, patch_size, mean, std, source=str(path))
    return extractor.to(device) if device is not None else extractor
