"""EQ-VAE (Kouzelis et al., ICML 2025, arXiv:2502.09509; code zelaki/eqvae): the transforms tau the trainer applies to
latents and images alike (`--equivariance`), and the per-step draw with EQ-VAE's prior preservation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .transforms import check_image_grid, resize_spatial, scaled_size

# EQ-VAE's scale factors: s / 32 for s in 8..31, i.e. [0.25, 1) (zelaki/eqvae `uniform_sample_scale=True`).
EQ_VAE_SCALES: tuple[float, ...] = tuple(s / 32 for s in range(8, 32))


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
        return scaled_size(height, self.scale[0]), scaled_size(width, self.scale[1])

    def _rotate(self, x: Tensor) -> Tensor:
        turns = self.quarter_turns % 4
        return torch.rot90(x, k=turns, dims=(-2, -1)) if turns else x

    def apply_latent(self, z: Tensor) -> Tensor:
        """tau(z) for latents (N, C, h, w) or (N, C, T, h, w)."""
        return self._rotate(resize_spatial(z, self.latent_size(*z.shape[-2:]), self.antialias))

    def apply_image(self, x: Tensor, spatial_factor: int) -> Tensor:
        """tau(x) for images (N, C, H, W) or videos (N, C, T, H, W) whose sides are multiples of `spatial_factor`."""
        h, w = check_image_grid(x, spatial_factor)
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
