"""The equivariance error: the metric that tells whether `--equivariance` / `--scale_equivariance` worked."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .equivariance import EquivarianceTransform
from .transforms import spatial_factor_of

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
    spatial_factor = spatial_factor_of(latents, images)
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
