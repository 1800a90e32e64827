"""fp16-safe fine-tuning: the sdxl-vae-fp16-fix recipe for `scripts/finetune_vae.py --fp16_safe`.

Goal: a VAE that runs in float16 without inf/NaN while its outputs, and its latent space, stay those of the
original. Two steps:

1. **Rescale** (`rescale_activations`, before training). Where an activation is large only because of a scale
   that a later layer removes again, move the scale: exact in float32 (up to GroupNorm's eps), no training
   needed. For diffusers' `Encoder`/`Decoder`:
   - a ResNet block's `conv1` feeds only GroupNorm `norm2`, which is scale-invariant: scale `conv1` down;
   - the residual stream (from `conv_in` through every ResNet, attention and resampling block to
     `conv_norm_out`) is read only by GroupNorms and by linear layers: scale everything that writes to it
     (`conv_in`, each `conv2`, each attention's `to_out`, the biases of shortcuts and resampling convolutions);
   - `post_quant_conv` -> `decoder.conv_in` and `encoder.conv_out` -> `quant_conv` are linear pairs: scale the
     first down and the second's weight up (further, if that balances the two weights' scales).
   Each is applied only where float32 calibration activations exceed `max_activation`, to half of it or less.
2. **Fine-tune** against the original as a frozen teacher (`FP16SafeRecipe.loss`): the student's decoded
   pixels must match the teacher's (same posterior noise), its posterior moments must match the teacher's (the
   latent space stays put), and every activation above `max_activation` is penalised, which shrinks what the
   rescaling cannot reach (e.g. a GroupNorm gain that a SiLU separates from the next layer).

At the end (`FP16SafeRecipe.finish`) the trained VAE is checked in float16 on held-out images
(`evaluation.fp16.check_half_precision`); when it is safe, `force_upcast` is set to false in its config so
pipelines run it in float16 as is. The training loop itself lives in `training/loop.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .evaluation.fp16 import ActivationMonitor
from .losses import reconstruction_loss
from .metrics import psnr

logger = logging.getLogger("diffusers_vae_ext.fp16_safe")

FLOAT16_MAX = 65504.0
# A 16x margin below float16's largest value: unseen images can push activations past the calibration maximum.
DEFAULT_MAX_ACTIVATION = 4096.0


# ================================================================================================ arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's `--fp16_safe*` options."""
    group = parser.add_argument_group("fp16-safe fine-tuning (sdxl-vae-fp16-fix recipe; see docs/evaluation.md)")
    group.add_argument(
        "--fp16_safe",
        action="store_true",
        help="make the VAE run in float16 without overflow while keeping its outputs and latent space: rescale, "
        "then fine-tune against a frozen copy of the starting VAE (needs --pretrained_model_name_or_path)",
    )
    group.add_argument(
        "--fp16_safe_max_activation",
        type=float,
        default=DEFAULT_MAX_ACTIVATION,
        help="largest |activation| allowed anywhere in the network (float16 overflows at 65504)",
    )
    group.add_argument(
        "--fp16_safe_penalty", type=float, default=1.0, help="weight of the penalty on activations above the limit"
    )
    group.add_argument(
        "--fp16_safe_latent_weight", type=float, default=1.0, help="weight of matching the teacher's posterior"
    )


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse combinations that make no sense with `--fp16_safe`; turn off losses the teacher replaces."""
    if not getattr(args, "fp16_safe", False):
        return
    if not args.pretrained_model_name_or_path:
        parser.error("--fp16_safe fine-tunes an existing VAE: give --pretrained_model_name_or_path")
    if not 0 < args.fp16_safe_max_activation < FLOAT16_MAX:
        parser.error(f"--fp16_safe_max_activation must be in (0, {FLOAT16_MAX:g})")
    # The target is the teacher's output, not the image: no adversarial or perceptual term, no scaling change.
    args.disc_weight = 0.0
    args.perceptual_weight = 0.0
    args.recompute_scaling_factor = False


# ================================================================================================ rescaling


def _scale_(module: nn.Module, factor: float, weight: bool = True, bias: bool = True) -> None:
    if weight:
        module.weight.mul_(factor)
    if bias and getattr(module, "bias", None) is not None:
        module.bias.mul_(factor)


def _plain_resnet(block: nn.Module) -> bool:
    return (
        type(block) is ResnetBlock2D
        and isinstance(block.norm1, nn.GroupNorm)
        and isinstance(block.norm2, nn.GroupNorm)
        and block.time_emb_proj is None
        and block.upsample is None
        and block.downsample is None
    )


def _plain_attention(attn: nn.Module) -> bool:
    return (
        type(attn) is Attention
        and isinstance(attn.group_norm, nn.GroupNorm)
        and attn.spatial_norm is None
        and attn.residual_connection
        and not attn.is_cross_attention
    )


def _stream_writers(coder: nn.Module) -> list[tuple[nn.Module, bool]] | None:
    """(module, scale its weight too) for every layer that writes the residual stream of a diffusers Encoder or
    Decoder, or None when a block of unknown type makes the stream's scale unsafe to move."""
    if type(coder) not in (Encoder, Decoder) or not isinstance(coder.conv_norm_out, nn.GroupNorm):
        return None
    writers: list[tuple[nn.Module, bool]] = [(coder.conv_in, True)]
    blocks = list(coder.down_blocks) if isinstance(coder, Encoder) else list(coder.up_blocks)
    for block in [coder.mid_block, *blocks]:
        if type(block) not in (UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D):
            return None
        for resnet in block.resnets:
            if not _plain_resnet(resnet):
                return None
            writers.append((resnet.conv2, True))
            if resnet.conv_shortcut is not None:
                writers.append((resnet.conv_shortcut, False))  # reads the stream: only its bias is new
        for attn in getattr(block, "attentions", None) or []:
            if attn is None:
                continue
            if not _plain_attention(attn):
                return None
            writers.append((attn.to_out[0], True))  # attention reads group-normed input
        for sampler in list(getattr(block, "upsamplers", None) or []) + list(
            getattr(block, "downsamplers", None) or []
        ):
            if type(sampler) not in (Upsample2D, Downsample2D) or getattr(sampler, "norm", None) is not None:
                return None
            conv = getattr(sampler, "conv", None)
            if sampler.use_conv and conv is not None:
                writers.append((conv, False))  # linear in the stream: only its bias is new
            elif sampler.use_conv:
                return None
    return writers


def _stream_outputs(coder_name: str, coder: nn.Module) -> list[str]:
    """Names of the modules whose outputs are (parts of) the residual stream."""
    names = [f"{coder_name}.conv_in"]
    for name, module in coder.named_modules():
        if isinstance(module, (ResnetBlock2D, Attention, Upsample2D, Downsample2D)):
            names.append(f"{coder_name}.{name}")
        if isinstance(module, ResnetBlock2D):
            names.append(f"{coder_name}.{name}.conv2")
    return names


@torch.no_grad()
def _forward_all(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    moments = vae.encode(pixels).latent_dist.parameters
    return moments, vae.decode(moments.chunk(2, dim=1)[0]).sample


@torch.no_grad()
def rescale_activations(
    vae: nn.Module, pixels: torch.Tensor, max_activation: float = DEFAULT_MAX_ACTIVATION
) -> list[str]:
    """Apply the function-preserving rescalings (module docstring) where float32 activations on `pixels` exceed
    `max_activation`, bringing them to half of it. Returns one line per change.

    The float32 outputs before and after are compared; if the moments or the decoded pixels moved (relative error
    above 1e-4, or under 80 dB), every change is undone and a warning says so.
    """
    was_training = vae.training
    vae.eval()
    target = max_activation / 2
    before_state = {k: v.clone() for k, v in vae.state_dict().items()}
    moments_before, decoded_before = _forward_all(vae, pixels)
    with ActivationMonitor(vae, group=lambda name: name) as monitor:
        _forward_all(vae, pixels)
    peak = monitor.max_abs
    changes = []

    def factor_for(names: list[str]) -> tuple[float, float]:
        largest = max((peak.get(n, 0.0) for n in names), default=0.0)
        return (target / largest if largest > max_activation else 1.0), largest

    # Linear pairs: the first layer's output shrinks, the second's weight grows to compensate.
    pairs = [("post_quant_conv", "decoder.conv_in"), ("encoder.conv_out", "quant_conv")]
    for first, second in pairs:
        first_module, second_module = _submodule(vae, first), _submodule(vae, second)
        # Without quant_conv, encoder.conv_out's output is the posterior itself and must not change.
        if not isinstance(first_module, nn.Conv2d) or not isinstance(second_module, nn.Conv2d):
            continue
        factor, largest = factor_for([first])
        if factor < 1:
            # Balance the two weights' scales where that shrinks the activation further (cross-layer weight
            # equalisation): a tiny second weight would make Adam's fixed-size steps huge relative to it.
            balance = (_rms(second_module.weight) / _rms(first_module.weight)) ** 0.5
            factor = min(factor, balance)
            _scale_(first_module, factor)
            _scale_(second_module, 1 / factor, bias=False)
            changes.append(
                f"{first}: x{factor:.3g} (max |activation| {largest:.4g}), {second} weight x{1 / factor:.3g}"
            )

    for coder_name in ("encoder", "decoder"):
        coder = getattr(vae, coder_name, None)
        if coder is None:
            continue
        # ResNet conv1 -> GroupNorm norm2: the norm removes any scale of conv1's output.
        for name, module in coder.named_modules():
            if _plain_resnet(module):
                factor, largest = factor_for([f"{coder_name}.{name}.conv1"])
                if factor < 1:
                    _scale_(module.conv1, factor)
                    changes.append(f"{coder_name}.{name}.conv1: x{factor:.3g} (max |activation| {largest:.4g})")
        writers = _stream_writers(coder)
        if writers is None:
            continue
        factor, largest = factor_for(_stream_outputs(coder_name, coder))
        if factor < 1:
            for module, with_weight in writers:
                _scale_(module, factor, weight=with_weight)
            changes.append(f"{coder_name} residual stream: x{factor:.3g} (max |activation| {largest:.4g})")

    if changes:
        moments_after, decoded_after = _forward_all(vae, pixels)
        moment_error = float(
            (moments_after - moments_before).abs().max() / moments_before.abs().max().clamp_min(1e-12)
        )
        pixel_psnr = float(psnr(decoded_before.float(), decoded_after.float()).min())
        if moment_error > 1e-4 or pixel_psnr < 80:
            vae.load_state_dict(before_state)
            logger.warning(
                "Rescaling changed the float32 outputs (moments rel. error %.2g, pixels %.1f dB): undone; the "
                "fine-tuning alone will shrink the activations.",
                moment_error,
                pixel_psnr,
            )
            changes = []
    vae.train(was_training)
    return changes


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().square().mean().sqrt().clamp_min(1e-30))


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ================================================================================================ training


def activation_penalty(outputs: list[tuple[str, torch.Tensor]], max_activation: float) -> torch.Tensor:
    """Sum over recorded outputs of mean(relu(|a| - max_activation)^2) / max_activation^2: zero while every
    activation is within the limit, and pulling every offending element (not only the largest) back."""
    total = None
    for _, tensor in outputs:
        term = F.relu(tensor.float().abs() - max_activation).square().mean() / max_activation**2
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class FP16SafeRecipe:
    """The teacher, the activation hooks on the student and the loss of `--fp16_safe` training.

    Args:
        vae: the student, already rescaled (`rescale_activations`); hooks are put on it.
        teacher: a frozen float32 copy of the starting VAE (before rescaling; identical outputs).
        args: the trainer's arguments (`fp16_safe_max_activation`, `fp16_safe_penalty`,
            `fp16_safe_latent_weight`, `rec_loss`).
    """

    def __init__(self, vae: nn.Module, teacher: nn.Module, args: argparse.Namespace):
        self.teacher = teacher.requires_grad_(False).eval()
        self.max_activation = args.fp16_safe_max_activation
        self.penalty_weight = args.fp16_safe_penalty
        self.latent_weight = args.fp16_safe_latent_weight
        self.rec_loss = args.rec_loss
        self.monitor = ActivationMonitor(vae, keep_outputs=True, record_stats=False).__enter__()
        # Outputs from one training forward only: the encoder runs first in every forward (and is not re-entered
        # by gradient checkpointing's recomputation, which re-runs blocks), so it starts each step's list.
        self._reset_handle = vae.encoder.register_forward_pre_hook(lambda module, inputs: self.monitor.reset())

    @classmethod
    def from_args(cls, vae: nn.Module, args: argparse.Namespace, calibration: torch.Tensor) -> FP16SafeRecipe:
        """Copy the teacher, rescale the student on `calibration` images (N, C, H, W) in [-1, 1], hook it."""
        teacher = copy.deepcopy(vae)
        for line in rescale_activations(vae, calibration, args.fp16_safe_max_activation):
            logger.info("fp16-safe rescaling: %s", line)
        return cls(vae, teacher, args)

    def loss(
        self, pixels: torch.Tensor, noise: torch.Tensor, reconstructions: torch.Tensor, moments: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step from the student's forward (`reconstructions`, `moments` for `pixels` with
        posterior `noise`): teacher pixels + latent_weight * teacher moments + penalty_weight * activations,
        each summed over elements and averaged over the batch (the trainer's convention)."""
        if next(self.teacher.parameters()).device != pixels.device:
            self.teacher.to(pixels.device)
        with torch.no_grad():
            teacher_moments = self.teacher.encode(pixels.float()).latent_dist.parameters
            posterior = DiagonalGaussianDistribution(teacher_moments)
            latents = posterior.mean + posterior.std * noise.to(device=pixels.device, dtype=teacher_moments.dtype)
            target = self.teacher.decode(latents).sample
        pixel_term = reconstruction_loss(target, reconstructions.float(), self.rec_loss)
        latent_term = reconstruction_loss(teacher_moments, moments.float(), "l2")
        outputs = self.monitor.outputs
        penalty = activation_penalty(outputs, self.max_activation).to(pixel_term.device)
        num_pixels = pixels[0].numel()
        loss = pixel_term + self.latent_weight * latent_term + self.penalty_weight * num_pixels * penalty
        largest = max((float(t.detach().abs().amax()) for _, t in outputs), default=0.0)
        self.monitor.reset()
        logs = {
            "teacher_rec_per_pixel": pixel_term.item() / num_pixels,
            "teacher_latent": latent_term.item(),
            "activation_penalty": penalty.item(),
            "max_activation": largest,
        }
        return loss, logs

    def close(self) -> None:
        """Remove the hooks (before the student is saved, copied or checked)."""
        self.monitor.__exit__(None, None, None)
        self._reset_handle.remove()

    def finish(self, vae: nn.Module, pixels: torch.Tensor, output_dir: str | Path) -> dict[str, Any]:
        """Check the trained VAE in float16/bfloat16 on held-out `pixels`, write `fp16_check.json`, and set
        `force_upcast: false` in `output_dir/config.json` when float16 is safe. Returns the float16 report."""
        from .atomic import atomic_write_text
        from .autoencoders import as_autoencoder
        from .evaluation.fp16 import check_half_precision, format_half_precision

        self.close()
        was_training = vae.training
        vae.eval()
        reports = check_half_precision(as_autoencoder(vae), pixels.to(next(vae.parameters()).device))
        vae.train(was_training)
        output_dir = Path(output_dir)
        atomic_write_text(output_dir / "fp16_check.json", json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
        float16 = reports[0]
        print(format_half_precision(reports, "fp16-safe check"))
        config_path = output_dir / "config.json"
        if float16.safe and config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["force_upcast"] = False
            atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
            print("float16 is safe: force_upcast set to false in config.json")
        elif not float16.safe:
            print(f"Not fp16-safe yet ({float16.verdict}): train longer or lower --fp16_safe_max_activation.")
        return float16.to_dict()


def calibration_pixels(images: list, resolution: int, channels: int, count: int = 8, resize_to: int | None = None):
    """`count` centre crops of the first training images, for the rescaling's calibration."""
    from .data import TrainingImageDataset

    dataset = TrainingImageDataset(images[:count], resolution, channels, random_crop=False, resize_to=resize_to)
    return torch.stack([dataset[index]["pixel_values"] for index in range(min(count, len(dataset)))])
