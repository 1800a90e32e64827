"""What the generator step minimises: reconstruction + LPIPS + KL + the adaptive-weighted adversarial term.

The loss is summed over pixels (the latent-diffusion convention), so `num_pixels` scales the per-image terms; for
clips (N, C, T, H, W) a pixel is one of C*T*H*W. KL is added only for classes with a posterior. LPIPS is a 2-D
network: clips are compared frame by frame (frames folded into the batch). The discriminator sees frames the same
way, or whole clips with `--disc_3d`. The discriminator's own loss (hinge or vanilla) is `discriminator_loss_fn`;
both live in `losses`. Distillation adds the encoder's squared error to the teacher's latents (summed like the
pixels).

Regularisers for diffusability (`diffusers_vae_ext.regularisers`; flags in `arguments`): `draw_regularisers` draws a
step's random choices (EQ-VAE transform, scale factor, decoder-input noise) from a generator seeded by (seed, step,
micro step, rank), so a resumed run draws the same ones; `VAETrainingForward` does the extra decodes;
`generator_loss` adds `--scale_equivariance`'s term and `alignment_loss` (`--align_to`, VA-VAE's VF loss).
`--equivariance` adds no term: on its steps the whole reconstruction loss is taken on D(tau(z)) against tau(x).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .. import losses
from ..regularisers import (
    REGULARISER_DEFAULTS,
    EquivarianceTransform,
    VisionFeatureExtractor,
    VisionFoundationAlignment,
    sample_equivariance_transform,
    sample_scale_factor,
    vf_adaptive_weight,
)


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
    scale_pair: tuple[torch.Tensor, torch.Tensor] | None = None,
    alignment: nn.Module | None = None,
    latents: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    encoder_layer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """(loss, logs) of the generator step at optimisation step `step`.

    `reconstructions` are float32; `moments` the posterior's parameters (`has_posterior`) or the deterministic
    latents. `pixels` is what the reconstructions should equal (distillation: the student's decode target).
    `discriminator` (unwrapped) is given only once the adversarial term is on: it is called with
    `requires_grad_(False)` so this step neither updates it nor leaves gradients in it, and the adaptive weight
    balances its gradient at `last_layer` against the NLL's. `latent_target` (distillation): the encoder's
    target latents; their squared error, summed over latent elements and averaged over the batch, is added with
    `args.distill_latent_weight`.

    `scale_pair` (`--scale_equivariance`): (down(x), D(down(z))); their reconstruction error, per pixel as the main
    term (so summed and multiplied by `num_pixels / pixels of down(x)`), is added times
    `args.scale_equivariance_weight` (no LPIPS: the downsampled images can be smaller than LPIPS's receptive field).
    `alignment` (`--align_to`, the VF projection) with the drawn `latents`, the vision model's `features` and the
    encoder's last layer `encoder_layer`: `alignment_loss`'s term is added, weighted against this step's NLL
    (reconstruction + LPIPS) at `encoder_layer` (VA-VAE's adaptive weight).
    """
    rec = losses.reconstruction_loss(pixels.float(), reconstructions, args.rec_loss)
    nll = rec
    logs = {"rec_per_pixel": rec.item() / num_pixels}
    if lpips is not None and min(pixels.shape[-2:]) >= LPIPS_MIN_SIDE:  # small --equivariance targets: no LPIPS
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
    if scale_pair is not None:
        down_pixels, down_reconstructions = scale_pair
        per_pixel = losses.reconstruction_loss(down_pixels.float(), down_reconstructions.float(), args.rec_loss)
        per_pixel = per_pixel / down_pixels[0].numel()
        loss = loss + args.scale_equivariance_weight * per_pixel * num_pixels
        logs["scale_rec_per_pixel"] = per_pixel.item()
    if alignment is not None:
        vf_term, vf_logs = alignment_loss(alignment, latents, features, nll, encoder_layer, args.align_weight)
        loss = loss + vf_term
        logs.update(vf_logs)
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


def patchgan_fits(pixels: torch.Tensor, num_layers: int) -> bool:
    """Whether the PatchGAN (`num_layers` stride-2 convolutions, then two 4x4 ones) gives at least one logit on
    images of this size: sides of at least 3 * 2**num_layers (24 px for the default 3 layers)."""
    return min(pixels.shape[-2:]) >= 3 * 2**num_layers


LPIPS_MIN_SIDE = 16  # VGG16's four max-pools before relu5_3 need at least 16 px


def discriminator_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`--disc_loss` -> loss(logits on real images, logits on reconstructions)."""
    return losses.hinge_d_loss if name == "hinge" else losses.vanilla_d_loss


@dataclass
class StepRegularisers:
    """One step's random choices for the regularisers (`draw_regularisers`).

    Attributes:
        transform: `--equivariance`: this step's EQ-VAE transform; None for a plain (prior-preservation) step; an
            `input_only` transform (low-resolution prior preservation) rescales the input images before the step.
        scale_factor: `--scale_equivariance`: this step's downsampling factor (2 or 4).
        latent_noise: `--latent_noise` sigma (0: none).
        generator: the step's own generator (CPU), for the decoder-input noise.
    """

    transform: EquivarianceTransform | None = None
    scale_factor: int | None = None
    latent_noise: float = 0.0
    generator: torch.Generator | None = None
    equivariance: bool = False

    def forward_kwargs(self) -> dict:
        """Keyword arguments of `VAETrainingForward.forward` (an input-only transform is applied by the caller)."""
        latent_side = self.transform is not None and not self.transform.input_only
        return dict(
            transform=self.transform if latent_side else None,
            scale_factor=self.scale_factor,
            latent_noise=self.latent_noise,
            generator=self.generator,
        )

    def logs(self) -> dict:
        """What the step's log line records: the EQ-VAE transform (`plain` for a prior-preservation step), the scale
        factor, the decoder-input noise level."""
        logs = {}
        if self.equivariance:
            logs["eq_transform"] = "plain" if self.transform is None else self.transform.name
        if self.scale_factor is not None:
            logs["scale_factor"] = self.scale_factor
        if self.latent_noise:
            logs["latent_noise"] = self.latent_noise
        return logs


def regularisers_on(args: argparse.Namespace) -> bool:
    return bool(args.equivariance or args.scale_equivariance or args.latent_noise)


def draw_regularisers(args: argparse.Namespace, step: int, micro_step: int, rank: int) -> StepRegularisers:
    """The step's EQ-VAE transform, scale factor and noise generator, all from one generator seeded by (seed, step,
    micro step, rank) like the posterior noise (its second seed word), so a resumed run draws the same ones."""
    if not regularisers_on(args):
        return StepRegularisers()
    seed = int(np.random.SeedSequence([args.seed, step, micro_step, rank]).generate_state(2)[1])
    generator = torch.Generator().manual_seed(seed)
    transform = scale_factor = None
    if args.equivariance:
        eq = REGULARISER_DEFAULTS["equivariance"]["defaults"]
        transform = sample_equivariance_transform(
            generator,
            p_prior=args.equivariance_p_prior,
            p_prior_low_res=eq["p_prior_low_res"],
            rotate=eq["rotate"],
            anisotropic=eq["anisotropic"],
            antialias=eq["antialias"],
        )
    if args.scale_equivariance:
        scale_factor = sample_scale_factor(generator)
    return StepRegularisers(transform, scale_factor, float(args.latent_noise or 0.0), generator, args.equivariance)


def build_alignment(latent_channels: int, vision: VisionFeatureExtractor) -> VisionFoundationAlignment:
    """`--align_to`'s trained projection (1x1 conv from the latent channels to the vision model's width), with the
    margins and term weights of `REGULARISER_DEFAULTS["align"]` (LightningDiT's f16d32_vfdinov2 config)."""
    defaults = REGULARISER_DEFAULTS["align"]["defaults"]
    return VisionFoundationAlignment(
        latent_channels,
        vision.feature_dim,
        cos_margin=defaults["cos_margin"],
        distmat_margin=defaults["distmat_margin"],
        cos_weight=defaults["cos_weight"],
        distmat_weight=defaults["distmat_weight"],
    )


def vision_features(vision: VisionFeatureExtractor, pixels: torch.Tensor, temporal_factor: int = 1) -> torch.Tensor:
    """Frozen features of what the encoder saw; for clips only the frames that start each latent frame
    (x[:, :, ::temporal_factor], the causal video VAEs' first frame plus one per temporal block)."""
    if pixels.ndim == 5 and temporal_factor > 1:
        pixels = pixels[:, :, ::temporal_factor]
    return vision(pixels)


def alignment_loss(
    alignment: nn.Module,
    latents: torch.Tensor,
    features: torch.Tensor,
    nll: torch.Tensor | None,
    encoder_layer: torch.Tensor | None,
    align_weight: float,
) -> tuple[torch.Tensor, dict]:
    """`--align_to`'s term: `vf_adaptive_weight(nll, vf, encoder_layer, align_weight) * vf` with
    vf = VA-VAE's VF loss of the drawn latents against the vision features; without `nll` (or `encoder_layer`)
    the weight is `align_weight` alone. Its gradient reaches the encoder and the projection, never the decoder
    (the latents are taken before the decoder)."""
    if features.ndim == 5 and latents.ndim == 5 and features.shape[2] != latents.shape[2]:
        raise ValueError(
            f"--align_to: {features.shape[2]} feature frames for {latents.shape[2]} latent frames; use a clip length "
            "the class encodes to whole temporal blocks (--num_frames 1 + k * temporal factor)."
        )
    vf, terms = alignment(latents, features, return_terms=True)
    if nll is not None and encoder_layer is not None:
        weight = vf_adaptive_weight(nll, vf, encoder_layer, align_weight)
    else:
        weight = torch.tensor(align_weight)
    logs = {"vf_loss": vf.item(), "vf_weight": float(weight), **{k: v.item() for k, v in terms.items()}}
    return weight * vf, logs
