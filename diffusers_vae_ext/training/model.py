"""What is trained: the autoencoder (any class the adapter loads, from a folder or a config), the forward the
optimiser sees, decoder-only freezing, gradient checkpointing, the optional distillation teacher, EMA weights.

Every class goes through `diffusers_vae_ext.autoencoders` (`AutoencoderAdapter`): KL classes train their
posterior with KL, deterministic classes (`AutoencoderDC`, `AutoencoderTiny`) their latents as they are, video
classes take 5-D clips (B, C, T, H, W). Our `AutoencoderKL` keeps its own fast path (`_decode` without the NaN
check) so its runs are unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..autoencoders import SUPPORTED_CLASSES, AutoencoderAdapter, as_autoencoder, load_autoencoder
from ..modeling import AutoencoderKL
from ..regularisers import EquivarianceTransform, augment_latents, scale_equivariance_pair
from .arguments import BUILTIN_CONFIGS, CONFIG_DIR

# Submodules that produce the latent, per class: what `--train_decoder_only` freezes. Everything else (decoder,
# post_quant_conv, LTX's timestep embedding in the decoder) trains.
ENCODER_MODULES = ("encoder", "quant_conv")

# The decoder's last layer, whose gradients balance the adversarial term (LDM's adaptive weight), per class.
_LAST_LAYERS = {
    "AutoencoderTiny": "decoder.layers.{last}.weight",
    "AutoencoderKLHunyuanVideo": "decoder.conv_out.conv.weight",
    "AutoencoderKLLTXVideo": "decoder.conv_out.conv.weight",
    "AutoencoderKLCogVideoX": "decoder.conv_out.conv.weight",
}


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """A built-in config name (`small_rgb`, `digits`) or a path to a config.json (or a folder holding one)."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN_CONFIGS:
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--model_config {name_or_path!r} is neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) nor a "
            "config.json file."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def model_from_config(config: dict[str, Any], where: str = "--model_config") -> nn.Module:
    """A freshly initialised model of the class named by the config's `_class_name` (default: our AutoencoderKL)."""
    name = config.get("_class_name", "AutoencoderKL")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(
            f"{where}: autoencoder class {name!r} is not supported. Set `_class_name` to one of: "
            f"{', '.join(SUPPORTED_CLASSES)}."
        )
    if name == "AutoencoderKL":
        return AutoencoderKL.from_config(config)
    import diffusers

    return getattr(diffusers, name).from_config(config)


def load_vae(args: argparse.Namespace) -> nn.Module:
    """The model to train: `--pretrained_model_name_or_path` (any supported class, by its config's `_class_name`)
    or a fresh model from `--model_config` (default `small_rgb`)."""
    if not args.pretrained_model_name_or_path:
        return model_from_config(load_model_config(args.model_config or "small_rgb"))
    subfolder = args.vae_subfolder
    local = Path(args.pretrained_model_name_or_path)
    if subfolder is None and (local / "vae" / "config.json").is_file() and not (local / "config.json").is_file():
        subfolder = "vae"
    config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision)
    if config.get("_class_name", "AutoencoderKL") == "AutoencoderKL":
        return AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision
        )
    if args.revision is not None:
        raise ValueError("--revision is only supported for AutoencoderKL; download the revision and pass its folder.")
    return load_autoencoder(args.pretrained_model_name_or_path, subfolder=subfolder).vae


def trains_on_clips(adapter: AutoencoderAdapter) -> bool:
    """Whether the class trains on video clips (Wan, HunyuanVideo, LTX, CogVideoX). Qwen-Image has a 5-D VAE but
    is an image model: it trains on images, as one-frame clips."""
    return adapter.is_video and adapter.class_name != "AutoencoderKLQwenImage"


def check_model_arguments(adapter: AutoencoderAdapter, args: argparse.Namespace) -> None:
    """Arguments that do not fit the class, refused before any data is read."""
    name = adapter.class_name
    if getattr(args, "fp16_safe", False) and name != "AutoencoderKL":
        raise ValueError(f"--fp16_safe is the SDXL-VAE recipe for AutoencoderKL; {name} is not supported.")
    if not trains_on_clips(adapter):
        given = [f"--{key}" for key in ("num_frames", "fps", "frame_stride") if getattr(args, key, None) is not None]
        if getattr(args, "disc_3d", False):
            given.append("--disc_3d")
        if given:
            raise ValueError(
                f"{', '.join(given)}: {name} is an image autoencoder; these options are for video classes."
            )


def latent_shape(adapter: AutoencoderAdapter, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the raw latents of pixels of `pixel_shape` ((N, C, H, W), or (N, C, T, H, W) for clips); images
    given to a 5-D class are one-frame clips."""
    batch, height, width = pixel_shape[0], pixel_shape[-2], pixel_shape[-1]
    frames: tuple[int, ...] = ()
    if adapter.is_video:
        frames = (adapter.num_latent_frames(pixel_shape[2]) if len(pixel_shape) == 5 else 1,)
    factor = adapter.spatial_factor
    return (batch, adapter.latent_channels, *frames, height // factor, width // factor)


def load_teacher(path: str, student: AutoencoderAdapter) -> AutoencoderAdapter:
    """The frozen distillation teacher (`--teacher_vae`), checked against the student before any training.

    The student's latents must have the teacher's shape (channels, spatial and temporal factor), because its
    encoder learns the teacher's scaled latents and its decoder decodes them.
    """
    teacher = load_autoencoder(path)
    teacher.vae.requires_grad_(False).eval()
    mismatches = [
        f"{what}: teacher {t}, student {s}"
        for what, t, s in (
            ("latent channels", teacher.latent_channels, student.latent_channels),
            ("spatial factor", teacher.spatial_factor, student.spatial_factor),
            ("temporal factor", teacher.temporal_factor, student.temporal_factor),
            ("video (5-D)", teacher.is_video, student.is_video),
            ("image channels", teacher.in_channels, student.in_channels),
        )
        if t != s
    ]
    if mismatches:
        raise ValueError(
            f"--teacher_vae {path} ({teacher.class_name}) and the student ({student.class_name}) have different "
            f"latent shapes ({'; '.join(mismatches)}). Give the student a config with the teacher's latent channels "
            "and factor (AutoencoderTiny: latent_channels, and len(num_encoder_blocks) - 1 downsamplings)."
        )
    if student.has_posterior:
        raise ValueError(
            f"--teacher_vae distils into a deterministic student (AutoencoderTiny or AutoencoderDC); "
            f"{student.class_name} has a posterior. Pass e.g. a --model_config with _class_name AutoencoderTiny."
        )
    return teacher


def last_decoder_layer(vae: nn.Module) -> torch.Tensor:
    """The weight of the decoder's last layer (where LDM's adaptive weight compares gradients), for any class."""
    name = type(vae).__name__
    pattern = _LAST_LAYERS.get(name, "decoder.conv_out.weight")
    if "{last}" in pattern:
        pattern = pattern.format(last=len(vae.decoder.layers) - 1)
    return vae.get_parameter(pattern)


class ForwardOutput(NamedTuple):
    """What one training forward returns.

    Attributes:
        reconstructions: decoded pixels (same shape as the pixels fed in).
        moments: `cat([mean, logvar])` of the posterior (KL classes) or the deterministic latents.
        latent_target: distillation only: the teacher's latents in the student's raw space (the encoder's target).
        pixel_target: what `reconstructions` should equal when it is not the pixels fed in: distillation (images,
            or the teacher's decode) and `--equivariance` steps (tau(x)).
        latents: the latents drawn from the encoder (before any transform or decoder-input noise): what
            `--align_to` aligns. None in distillation.
        scale_reconstructions / scale_target: `--scale_equivariance`: D(down(z)) and down(x).
    """

    reconstructions: torch.Tensor
    moments: torch.Tensor
    latent_target: torch.Tensor | None = None
    pixel_target: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    scale_reconstructions: torch.Tensor | None = None
    scale_target: torch.Tensor | None = None


class VAETrainingForward(nn.Module):
    """Encode, draw the latent (posterior with the given noise; deterministic classes: as they are), decode: one
    `forward` so DDP sees encoder and decoder.

    With `train_decoder_only` the encoder runs without autograd (its weights are frozen). Our `AutoencoderKL` uses
    `_decode`, which skips decode()'s NaN check on purpose: a non-finite loss must reach the loop, which skips the
    step, instead of crashing the run. Image batches (N, C, H, W) given to a 5-D class (Qwen-Image) are one-frame
    clips.

    With a `teacher` (distillation), the student's encoder is trained towards the teacher's latents (scaled by the
    teacher's pipeline convention and unscaled by the student's, so the student drops into the teacher's pipelines)
    and its decoder decodes the teacher's latents, towards the images (`distill_target="images"`, as TAESD) or
    the teacher's decode (`"teacher"`).
    """

    def __init__(
        self,
        vae: nn.Module,
        train_decoder_only: bool = False,
        teacher: AutoencoderAdapter | None = None,
        distill_target: str = "images",
    ):
        super().__init__()
        self.vae = vae
        self.train_decoder_only = train_decoder_only
        # Plain attributes (not submodules): the teacher is frozen and stays out of DDP and the checkpoints.
        self.__dict__["adapter"] = as_autoencoder(vae)
        self.__dict__["teacher"] = teacher
        self.distill_target = distill_target

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.vae.encode(pixels)
        if self.adapter.has_posterior:
            return output.latent_dist.parameters
        return getattr(output, self.adapter._output_attribute)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if isinstance(self.vae, AutoencoderKL):
            return self.vae._decode(latents)
        if self.adapter.class_name == "AutoencoderKLLTXVideo" and self.vae.config.get("timestep_conditioning"):
            temb = torch.full((latents.shape[0],), self.adapter.decode_timestep, device=latents.device)
            return self.vae.decode(latents, temb=temb.to(latents.dtype)).sample
        return self.vae.decode(latents).sample

    def forward(
        self,
        pixels: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        transform: EquivarianceTransform | None = None,
        scale_factor: int | None = None,
        latent_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> ForwardOutput:
        """Encode `pixels`, draw the latent z (posterior mean + std * `noise`), decode; the regularisers' extra work
        happens here too, so that DDP sees one forward per backward:

        - `transform` (`--equivariance`, a latent-side EQ-VAE transform tau): decode tau(z) instead of z, and return
          tau(x) as the pixel target;
        - `latent_noise` (`--latent_noise`): the decoder sees z + sigma * eps (`regularisers.augment_latents`, noise
          from `generator`), the KL and `latents` keep the clean z;
        - `scale_factor` (`--scale_equivariance`): also decode down(z) and return it with down(x).
        """
        one_frame = self.adapter.is_video and pixels.ndim == 4
        if one_frame:
            pixels = pixels.unsqueeze(2)
        with torch.no_grad() if self.train_decoder_only else nullcontext():
            moments = self._encode(pixels)
        if self.teacher is not None:
            output = self._distill(pixels, moments)
        else:
            latents = moments
            if self.adapter.has_posterior:
                posterior = DiagonalGaussianDistribution(moments)
                latents = posterior.mean + posterior.std * noise.to(moments.dtype)
            decoder_input, pixel_target = latents, None
            if transform is not None:
                factor = self.adapter.spatial_factor
                decoder_input, pixel_target = transform.apply_latent(latents), transform.apply_image(pixels, factor)
            if latent_noise > 0:
                decoder_input = augment_latents(decoder_input, latent_noise, generator)
            scale_reconstructions = scale_target = None
            if scale_factor is not None:
                down_z, scale_target = scale_equivariance_pair(
                    latents, pixels, scale_factor, spatial_factor=self.adapter.spatial_factor
                )
                scale_reconstructions = self._decode(down_z)
            output = ForwardOutput(
                self._decode(decoder_input),
                moments,
                pixel_target=pixel_target,
                latents=latents,
                scale_reconstructions=scale_reconstructions,
                scale_target=scale_target,
            )
        if one_frame:
            output = ForwardOutput(*(t.squeeze(2) if t is not None and t.ndim == 5 else t for t in output))
        return output

    def _distill(self, pixels: torch.Tensor, latents: torch.Tensor) -> ForwardOutput:
        teacher, student = self.teacher, self.adapter
        with torch.no_grad():
            teacher_raw = teacher.latents_from_moments(teacher.encode_moments(pixels), sample=False)
            target = student.unscale(teacher.scale(teacher_raw).float().cpu()).to(latents)
            pixel_target = pixels
            if self.distill_target == "teacher":
                pixel_target = teacher.decode(teacher_raw).to(pixels.dtype)
        return ForwardOutput(self._decode(target), latents, target, pixel_target)


def prepare_for_training(vae: nn.Module, args: argparse.Namespace) -> list[nn.Parameter]:
    """Training mode, `--train_decoder_only` freezing and `--gradient_checkpointing`; returns the trained parameters.

    Decoder-only freezes every submodule that produces the latent (`ENCODER_MODULES`: `encoder` and, where the
    class has one, `quant_conv`), for every class. Gradient checkpointing is refused with a clear error for the
    classes diffusers does not implement it for (AutoencoderDC, Wan, Qwen-Image: Wan's causal feature cache);
    AutoencoderTiny checkpoints its decoder only (see below).
    """
    vae.train()
    if args.train_decoder_only:
        for name in ENCODER_MODULES:
            module = getattr(vae, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
    if args.gradient_checkpointing:
        if not getattr(vae, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"--gradient_checkpointing: diffusers does not implement gradient checkpointing for "
                f"{type(vae).__name__}. Drop the flag, or lower --train_batch_size / --resolution / --num_frames."
            )
        vae.enable_gradient_checkpointing()
        if type(vae).__name__ == "AutoencoderTiny":
            # diffusers' EncoderTiny skips its [-1, 1] -> [0, 1] input scaling on the checkpointed path, so the
            # encoder would train on other inputs than it sees at inference: only the decoder is checkpointed.
            vae.encoder.gradient_checkpointing = False
    return [p for p in vae.parameters() if p.requires_grad]


@contextmanager
def ema_weights(ema, model: nn.Module) -> Iterator[None]:
    """Swap EMA weights in for validation and back afterwards (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())
