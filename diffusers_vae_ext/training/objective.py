"""What the generator step minimises: reconstruction + LPIPS + KL + the adaptive-weighted adversarial term.

The loss is summed over pixels (the latent-diffusion convention), so `num_pixels` scales the per-image terms; for
clips (N, C, T, H, W) a pixel is one of C*T*H*W. KL is added only for classes with a posterior. LPIPS is a 2-D
network: clips are compared frame by frame (frames folded into the batch). The discriminator sees frames the same
way, or whole clips with `--disc_3d`. The discriminator's own loss (hinge or vanilla) is `discriminator_loss_fn`;
both live in `losses`. Distillation adds the encoder's squared error to the teacher's latents (summed like the
pixels).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .. import losses


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) clips -> (N*T, C, H, W) frames; 4-D images are returned as they are."""
    if x.ndim != 5:
        return x
    return x.transpose(1, 2).flatten(0, 1)


def discriminator_input(x: torch.Tensor, clips: bool = False) -> torch.Tensor:
    """What the discriminator sees: frames (2-D PatchGAN) or whole clips (`clips`, the 3-D PatchGAN)."""
    return x if clips else frames_as_images(x)


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
    has_posterior: bool = True,
    latent_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """(loss, logs) of the generator step at optimisation step `step`.

    `reconstructions` are float32; `moments` the posterior's parameters (`has_posterior`) or the deterministic
    latents. `pixels` is what the reconstructions should equal (distillation: the student's decode target).
    `discriminator` (unwrapped) is given only once the adversarial term is on: it is called with
    `requires_grad_(False)` so this step neither updates it nor leaves gradients in it, and the adaptive weight
    balances its gradient at `last_layer` against the NLL's. `latent_target` (distillation): the encoder's
    target latents; their squared error, summed over latent elements and averaged over the batch, is added with
    `args.distill_latent_weight`.
    """
    rec = losses.reconstruction_loss(pixels.float(), reconstructions, args.rec_loss)
    nll = rec
    logs = {"rec_per_pixel": rec.item() / num_pixels}
    if lpips is not None:
        with autocast():
            perceptual = lpips(frames_as_images(pixels), frames_as_images(reconstructions)).float().mean()
        # LDM adds LPIPS to every pixel's loss, so it is summed over pixels like the rest.
        nll = nll + args.perceptual_weight * perceptual * num_pixels
        logs["lpips"] = perceptual.item()
    loss = nll
    if has_posterior:
        kl = losses.kl_loss(DiagonalGaussianDistribution(moments.float()))
        logs["kl"] = kl.item()
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
    if latent_target is not None:
        latent_error = (moments.float() - latent_target.float()).square().sum() / moments.shape[0]
        loss = loss + getattr(args, "distill_latent_weight", 1.0) * latent_error
        logs["latent_mse"] = latent_error.item() / latent_target[0].numel()
    if discriminator is not None:
        clips = getattr(args, "disc_3d", False)
        discriminator.requires_grad_(False)
        with autocast():
            logits = discriminator(discriminator_input(reconstructions, clips))
            g_loss = losses.generator_adversarial_loss(logits).float()
        discriminator.requires_grad_(True)
        d_weight = losses.adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
        loss = loss + d_weight * g_loss
        logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
    return loss, logs


def discriminator_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`--disc_loss` -> loss(logits on real images, logits on reconstructions)."""
    return losses.hinge_d_loss if name == "hinge" else losses.vanilla_d_loss
