"""`AutoencoderKL`: a drop-in for diffusers' AutoencoderKL (same config keys, same state-dict keys)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.autoencoders.vae import (
    AutoencoderMixin,
    Decoder,
    DecoderOutput,
    Encoder,
)
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor

from .blocks import conv_float32, fast_path_applies, run_decoder, run_encoder
from .posterior import HALF_DTYPES, LatentPosterior
from .tiling import TiledAutoencoderMixin, tiled_decode, tiled_encode

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class AutoencoderKL(ModelMixin, AttentionMixin, TiledAutoencoderMixin, AutoencoderMixin, ConfigMixin):
    r"""A variational autoencoder with a KL-regularised diagonal Gaussian latent space (the Stable Diffusion VAE).

    A drop-in for `diffusers.AutoencoderKL`: the config keys, their defaults and the state-dict keys are the same,
    so a folder saved by either class loads in the other, and pipelines accept it as `vae=`.

    **Encode path.** `encode(x)` runs `encoder` (conv_in, down blocks, mid block with attention, GroupNorm, SiLU,
    conv_out) to `2 * latent_channels` channels at `1 / 2 ** (len(block_out_channels) - 1)` of the resolution,
    then the 1x1 `quant_conv`. Those channels are the *moments*: the first half is the posterior mean, the second
    half its log-variance (clamped to [-30, 20]). Together they define the diagonal Gaussian posterior
    q(z | x) = N(mean, exp(logvar)), returned as `AutoencoderKLOutput.latent_dist`
    (`DiagonalGaussianDistribution`: `.mean`, `.logvar`, `.std`, `.sample(generator)`, `.mode()`, `.kl()`).

    **Why training samples from it.** The KL term pulls q(z | x) towards the N(0, I) prior; the decoder is
    trained on draws `z = mean + std * eps`, so it learns to decode a neighbourhood of each mean. Diffusion
    training encodes with `latent_dist.sample()` for the same reason. Latents are therefore random: pass a seeded
    `torch.Generator` to `sample(generator)` to fix them, or use `mode()` (the mean) for deterministic ones.

    **Decode path.** `decode(z)` runs the 1x1 `post_quant_conv`, then `decoder`, back to pixels in about [-1, 1].
    Latents are the *unscaled* ones: undo `scaling_factor`/`shift_factor` first (see
    `diffusers_vae_ext.scaling.unscale_latents`).

    Parameters:
        in_channels (`int`, defaults to 3): channels of the input images (3 for RGB, 1 for grayscale).
        out_channels (`int`, defaults to 3): channels of the decoded images.
        down_block_types (`tuple[str]`, defaults to `("DownEncoderBlock2D",)`): encoder block types, one per
            resolution level (see `diffusers.models.unets.unet_2d_blocks.get_down_block`).
        up_block_types (`tuple[str]`, defaults to `("UpDecoderBlock2D",)`): decoder block types, one per level.
        block_out_channels (`tuple[int]`, defaults to `(64,)`): channels of each level. Its length sets the
            downsampling factor `2 ** (len(block_out_channels) - 1)` (8 for Stable Diffusion's 4 levels).
        layers_per_block (`int`, defaults to 1): ResNet blocks per encoder level (the decoder has one more).
        act_fn (`str`, defaults to `"silu"`): activation function.
        latent_channels (`int`, defaults to 4): channels of the latent space (4 for SD 1.x/2.x/SDXL, 16 for
            SD3/FLUX).
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every entry of
            `block_out_channels`.
        sample_size (`int`, defaults to 32): nominal image size; the default size of `sample()` and the tile size
            used by diffusers' own tiler.
        scaling_factor (`float`, defaults to 0.18215): multiplies latents before a diffusion model sees them so
            they have unit variance (`1 / std` of the training latents; SD 1.x 0.18215, SDXL 0.13025). See
            `diffusers_vae_ext.scaling` to compute it from data.
        shift_factor (`float`, *optional*): subtracted before scaling (`(z - shift) * scale`), the SD3/FLUX
            convention; `None` for SD 1.x/2.x/SDXL.
        latents_mean (`tuple[float]`, *optional*): per-channel latent mean, used with `latents_std` instead of a
            single shift (`(z - mean) * scale / std`, as SDXL-style pipelines do).
        latents_std (`tuple[float]`, *optional*): per-channel latent standard deviation, see `latents_mean`.
        force_upcast (`bool`, defaults to `True`): tells SDXL pipelines to run this VAE in float32 because it
            overflows in float16; set `False` for VAEs fine-tuned to be fp16-safe.
        use_quant_conv (`bool`, defaults to `True`): whether the 1x1 `quant_conv` follows the encoder.
        use_post_quant_conv (`bool`, defaults to `True`): whether the 1x1 `post_quant_conv` precedes the decoder.
        mid_block_add_attention (`bool`, defaults to `True`): whether the encoder and decoder mid blocks have a
            self-attention layer.

    Runtime switches (`enable_slicing()`, `enable_tiling()`, gradient checkpointing) are attributes, not config,
    so a saved folder stays a plain AutoencoderKL folder. `enable_tiling()` is exact: the tiled result equals the
    untiled one up to float rounding (see `diffusers_vae_ext.tiling`).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({len(block_out_channels)}) must have the same length: one entry per level."
            )
        bad_groups = [c for c in block_out_channels if c % norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels; "
                f"{bad_groups} are not divisible by it."
            )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        # Inference runs diffusers' blocks through `blocks.run_encoder/run_decoder` (same result, faster on CPU);
        # set False to run diffusers' module forwards instead.
        self.use_fast_path = True

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent pixel along each side: `2 ** (len(block_out_channels) - 1)`."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # ----------------------------------------------------------------------------------------------- checks
    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode() expects a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}.")
        if x.ndim != 4:
            hint = " Add a batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
            raise ValueError(f"encode() expects a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}.{hint}")
        if not x.is_floating_point():
            raise ValueError(
                f"encode() got an integer tensor ({x.dtype}). Convert images to float in [-1, 1] first, "
                "e.g. x.float() / 127.5 - 1 for uint8 pixels."
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode() got {x.shape[1]} channels but this VAE has in_channels={self.config.in_channels}. "
                "Images are (N, C, H, W): check the channel order and convert grayscale/RGBA images."
            )
        factor = self.downsampling_factor
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"Image height and width must be divisible by the VAE's downsampling factor {factor}, got "
                f"{height}x{width}. Resize, crop or pad to e.g. {height // factor * factor or factor}x"
                f"{width // factor * factor or factor}."
            )

    def _check_dtype(self, x: torch.Tensor, method: str) -> None:
        # Without autocast, a convolution refuses mixed dtypes with a message about "bias type"; say what to do.
        weights = self.dtype
        if x.dtype == weights or torch.is_autocast_enabled(x.device.type):
            return
        names = [str(d).removeprefix("torch.") for d in (x.dtype, weights)]
        raise ValueError(
            f"{method}() got {names[0]} input but the VAE's weights are {names[1]}: pass x.to(vae.dtype), or cast "
            f"the VAE with vae.to(torch.{names[0]})."
        )

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"decode() expects a torch.Tensor of shape (N, C, h, w), got {type(z).__name__}.")
        if z.ndim != 4:
            raise ValueError(f"decode() expects a 4-D latent tensor (N, C, h, w), got shape {tuple(z.shape)}.")
        if not z.is_floating_point():
            raise ValueError(f"decode() expects floating-point latents, got {z.dtype}.")
        if z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode() got latents with {z.shape[1]} channels but this VAE has "
                f"latent_channels={self.config.latent_channels}."
            )
        if not torch.isfinite(z).all():
            raise ValueError(
                "decode() got NaN or Inf latents. In fp16 this usually means the VAE or the diffusion model "
                "overflowed: run the VAE in float32 (or bfloat16) or use an fp16-safe VAE."
            )

    # ----------------------------------------------------------------------------------------------- encode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and self._tiles_needed(x.shape[-2], x.shape[-1]):
            return tiled_encode(self, x)
        if not self.use_fast_path:
            moments = self.encoder(x)
            return self.quant_conv(moments) if self.quant_conv is not None else moments
        # Half-precision models: the encoder's last convolution and quant_conv (both at the latent resolution, so
        # nearly free) run in float32, and `LatentPosterior` takes the moments from there.
        half = _activation_dtype(x) in HALF_DTYPES and fast_path_applies(self.encoder, x)
        moments = run_encoder(self.encoder, x, float32_output=half)
        if self.quant_conv is not None:
            moments = conv_float32(self.quant_conv, moments) if half else self.quant_conv(moments)
        return moments

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode images in [-1, 1] of shape (N, in_channels, H, W) into the latent posterior.

        Returns `AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)` (or `(latent_dist,)` with
        `return_dict=False`). H and W must be divisible by `downsampling_factor`.
        """
        self._check_images(x)
        self._check_dtype(x, "encode")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(x_slice) for x_slice in x.split(1)])
        else:
            moments = self._encode(x)
        # Handed out in the dtype diffusers' encoder would produce; computed in float32 for half models.
        posterior = LatentPosterior(moments, dtype=_activation_dtype(x))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # ----------------------------------------------------------------------------------------------- decode
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        factor = self.downsampling_factor
        if self.use_tiling and self._tiles_needed(z.shape[-2] * factor, z.shape[-1] * factor):
            return tiled_decode(self, z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return run_decoder(self.decoder, z) if self.use_fast_path else self.decoder(z)

    @apply_forward_hook
    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """Decode unscaled latents of shape (N, latent_channels, h, w) into images in about [-1, 1].

        `generator` is accepted because pipelines pass it; this decoder is deterministic and does not use it.
        """
        self._check_latents(z)
        self._check_dtype(z, "decode")
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(z_slice) for z_slice in z.split(1)])
        else:
            decoded = self._decode(z)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct `sample`: encode, take the posterior mean (or a draw with `sample_posterior=True`), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Decode `num_samples` draws from the N(0, I) prior of the (unscaled) latent space.

        Returns images in [-1, 1] of shape (num_samples, out_channels, height, width); height and width default
        to `config.sample_size` and must be divisible by `downsampling_factor`. The same seeded generator gives
        the same images.
        """
        size = self.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        height, width = height or default_h, width or default_w
        factor = self.downsampling_factor
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if height % factor or width % factor:
            raise ValueError(f"height and width must be divisible by {factor}, got {height}x{width}.")
        shape = (num_samples, self.config.latent_channels, height // factor, width // factor)
        z = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self.decode(z).sample.clamp(-1, 1)

    # ----------------------------------------------------------------------------------------------- attention
    # diffusers' AutoencoderKL overrides AttentionMixin's versions, which skip the VAE's legacy `Attention` blocks;
    # ours must too, or `fuse_qkv_projections()` would silently do nothing.
    def fuse_qkv_projections(self) -> None:
        """Fuse each attention's query, key and value projections into one matmul (diffusers' experimental API)."""
        processors = self.attn_processors
        if any("Added" in type(processor).__name__ for processor in processors.values()):
            raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV projections.")
        self.original_attn_processors = processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections()`: restore the attention processors in use before it."""
        if getattr(self, "original_attn_processors", None) is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> AutoencoderKL:
        """Load from a local folder or a hub repo (`subfolder="vae"` for a pipeline repo), safetensors only.

        Pickle checkpoints (`.bin`, `.ckpt`, ...) are refused: unpickling runs arbitrary code. Convert them once,
        in an environment you trust, with `diffusers-vae convert-to-safetensors PATH`.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("diffusers_vae_ext loads weights from safetensors only; drop use_safetensors=False.")
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if folder.is_dir():
            _require_safetensors(folder)
        kwargs["use_safetensors"] = True
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if on_meta:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the checkpoint is missing weights for {on_meta[:5]}"
                f"{' ...' if len(on_meta) > 5 else ''}. Is it an AutoencoderKL checkpoint with this config?"
            )
        return loaded


# Pipelines record `[module, class]` in model_index.json; the package name keeps it `["diffusers_vae_ext",
# "AutoencoderKL"]` and stable across refactors of our module layout.
AutoencoderKL.__module__ = "diffusers_vae_ext"


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the encoder's convolutions produce for input `x`: the autocast dtype under autocast, else x's."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _require_safetensors(folder: Path) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_WEIGHT_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
            "loaded and are refused. If you trust the file, convert it once with\n"
            f"    diffusers-vae convert-to-safetensors {folder}\n"
            "and load the folder again."
        )


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes) and the model config, hex string.

    Two models with the same fingerprint produce the same outputs; used to tie latent caches to their VAE.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        relevant = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        digest.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # Hashed in place, no copy; flattened first because 0-d tensors (BatchNorm's num_batches_tracked, LTX's
        # scalar buffers) cannot be viewed as bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()
