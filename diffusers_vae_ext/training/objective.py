"""What the generator step minimises: reconstruction + LPIPS + KL + the adaptive-weighted adversarial term.

The loss is summed over pixels (the latent-diffusion convention), so `num_pixels` scales the per-image terms.
The discriminator's own loss (hinge or vanilla) is `discriminator_loss_fn`; both live in `losses`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .. import losses


def generator_loss(
    pixels: torch.Tensor,
    reconstructions: torch.Tensor,
    moments: torch.Tensor,
    step: int,
    args: argparse.Namespace,
    *,
    num_pixels: int,
    autocast: Callable[[], AbstractContextManager],
    lpips: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """(loss, logs) of the generator step at optimisation step `step`.

    `reconstructions` are float32; `moments` the posterior's parameters. `discriminator` (unwrapped) is given only
    once the adversarial term is on: it is called with `requires_grad_(False)` so this step neither updates it
    nor leaves gradients in it, and the adaptive weight balances its gradient at `last_layer` against the NLL's.
    """
    posterior = DiagonalGaussianDistribution(moments.float())
    rec = losses.reconstruction_loss(pixels.float(), reconstructions, args.rec_loss)
    nll = rec
    logs = {"rec_per_pixel": rec.item() / num_pixels}
    if lpips is not None:
        with autocast():
            perceptual = lpips(pixels, reconstructions).float().mean()
        # LDM adds LPIPS to every pixel's loss, so it is summed over pixels like the rest.
        nll = nll + args.perceptual_weight * perceptual * num_pixels
        logs["lpips"] = perceptual.item()
    kl = losses.kl_loss(posterior)
    logs["kl"] = kl.item()
    loss = nll
    if not args.train_decoder_only:  # a frozen encoder makes KL a constant
        loss = loss + losses.weighted_kl(
            kl,
            step,
            args.kl_mode,
            args.kl_weight,
            beta=args.kl_beta,
            gamma=args.kl_gamma,
            capacity_max=args.capacity_max,
            capacity_stop_steps=args.capacity_stop_steps,
        )
    if discriminator is not None:
        discriminator.requires_grad_(False)
        with autocast():
            g_loss = losses.generator_adversarial_loss(discriminator(reconstructions)).float()
        discriminator.requires_grad_(True)
        d_weight = losses.adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
        loss = loss + d_weight * g_loss
        logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
    return loss, logs


def discriminator_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`--disc_loss` -> loss(logits on real images, logits on reconstructions)."""
    return losses.hinge_d_loss if name == "hinge" else losses.vanilla_d_loss
