"""The public face of exact tiling: `enable_tiling()` on the autoencoder, `tiled_encode` / `tiled_decode`.

Also the checks that a VAE can be tiled and that the call is inference. How the tiler works is explained in
the package docstring (`diffusers_vae_ext.tiling`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D

from .run import _TiledRun


class TiledAutoencoderMixin:
    """`enable_tiling()` / `disable_tiling()` for `AutoencoderKL`, backed by the exact tiler of this package.

    The host class sets `use_tiling = False` in `__init__` and calls `tiled_encode` / `tiled_decode` from its
    `_encode` / `_decode` when `use_tiling` is on and `_tiles_needed(height, width)` says the image is larger
    than one tile. The tile size lives in `tile_sample_min_size` (diffusers' attribute name, so code that sets
    it on diffusers' AutoencoderKL keeps working).
    """

    def enable_tiling(
        self,
        tile_sample_size: int | None = None,
        tile_overlap: int | None = None,
        *,
        offload_to_cpu: bool | None = None,
    ) -> None:
        r"""Encode and decode images larger than one tile tile by tile, with the same result as untiled.

        Args:
            tile_sample_size (`int`, *optional*): tile edge in image pixels, a multiple of
                `downsampling_factor`. Images with a side larger than this are tiled. Defaults to the current
                `tile_sample_min_size`, initially `config.sample_size` (as in diffusers). Smaller tiles lower the
                peak memory; below ~128 pixels the per-tile overhead starts to show.
            tile_overlap (`int`, *optional*): accepted so that code written for overlap-and-blend tilers runs
                unchanged, and has no effect: this tiler needs no overlap, because every layer reads its true
                neighbourhood from the neighbouring tiles (see the package docstring). Must be non-negative.
            offload_to_cpu (`bool`, *optional*): keep the intermediate activations in host memory, so the
                compute device holds only one tile at a time. Defaults to on for accelerators and is meaningless
                on CPU. Off keeps them on the device: faster (no transfers), still well below the untiled peak.
        """
        check_tiling_supported(self)
        factor = self.downsampling_factor
        if tile_sample_size is not None:
            if not isinstance(tile_sample_size, int) or tile_sample_size < factor or tile_sample_size % factor:
                raise ValueError(
                    f"tile_sample_size must be a positive multiple of the downsampling factor {factor}, "
                    f"got {tile_sample_size!r}."
                )
            self.tile_sample_min_size = tile_sample_size
        if tile_overlap is not None and (not isinstance(tile_overlap, int) or tile_overlap < 0):
            raise ValueError(f"tile_overlap must be a non-negative int or None, got {tile_overlap!r}.")
        self.tile_offload_to_cpu = offload_to_cpu
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Go back to encoding and decoding in one piece."""
        self.use_tiling = False

    @property
    def tile_sample_min_size(self) -> int:
        """Tile edge in image pixels (diffusers' attribute name); defaults to `config.sample_size`."""
        size = self.__dict__.get("_tile_sample_min_size")
        if size is None:
            size = self.config.sample_size
            size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size)

    @tile_sample_min_size.setter
    def tile_sample_min_size(self, value: int) -> None:
        self.__dict__["_tile_sample_min_size"] = int(value)

    @property
    def tile_latent_min_size(self) -> int:
        """Tile edge in latent pixels (diffusers' attribute name)."""
        return self.tile_sample_min_size // self.downsampling_factor

    @tile_latent_min_size.setter
    def tile_latent_min_size(self, value: int) -> None:
        self.tile_sample_min_size = int(value) * self.downsampling_factor

    def _tiles_needed(self, height: int, width: int) -> bool:
        """Whether an image of `height` x `width` pixels is larger than one tile."""
        tile = self.tile_sample_min_size
        return height > tile or width > tile


def check_tiling_supported(vae: nn.Module) -> None:
    """Raise `NotImplementedError` naming the first part of `vae` the exact tiler cannot run layer by layer.

    Supported: `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks of `ResnetBlock2D` (no time embedding),
    convolutional `Downsample2D` / nearest `Upsample2D`, GroupNorm output norms: every AutoencoderKL config that
    diffusers' Stable Diffusion, SDXL, SD3 and FLUX VAEs use.
    """
    problems = []
    encoder, decoder = vae.encoder, vae.decoder
    for block in encoder.down_blocks:
        if type(block) is not DownEncoderBlock2D:
            problems.append(f"encoder block {type(block).__name__}")
            continue
        problems += [p for r in block.resnets for p in _resnet_problems(r)]
        for down in block.downsamplers or []:
            if not (type(down) is Downsample2D and down.use_conv and down.norm is None):
                problems.append("a downsampler other than a strided convolution")
    for block in decoder.up_blocks:
        if type(block) is not UpDecoderBlock2D:
            problems.append(f"decoder block {type(block).__name__}")
            continue
        problems += [p for r in block.resnets for p in _resnet_problems(r)]
        for up in block.upsamplers or []:
            ok = type(up) is Upsample2D and up.use_conv and not up.use_conv_transpose and up.interpolate
            if not (ok and up.norm is None and up.conv.kernel_size == (3, 3) and up.conv.padding == (1, 1)):
                problems.append("an upsampler other than nearest interpolation + 3x3 convolution")
    for name, coder in (("encoder", encoder), ("decoder", decoder)):
        if type(coder.conv_norm_out) is not nn.GroupNorm:
            problems.append(f"{name} output norm {type(coder.conv_norm_out).__name__}")
    if problems:
        raise NotImplementedError(
            f"Exact tiling does not support this {type(vae).__name__}: {problems[0]}. Use it untiled, or with "
            "enable_slicing() to save memory on batches."
        )


def _resnet_problems(resnet: nn.Module) -> list[str]:
    if type(resnet) is not ResnetBlock2D:
        return [f"residual block {type(resnet).__name__}"]
    if resnet.time_emb_proj is not None or resnet.upsample is not None or resnet.downsample is not None:
        return ["a residual block with a time embedding or its own resampling"]
    if not (isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)):
        return ["a residual block without GroupNorm"]
    convs = (resnet.conv1, resnet.conv2)
    if any(c.kernel_size != (3, 3) or c.padding != (1, 1) or c.stride != (1, 1) for c in convs):
        return ["a residual block with convolutions other than 3x3"]
    if resnet.conv_shortcut is not None and resnet.conv_shortcut.kernel_size != (1, 1):
        return ["a residual block with a non-1x1 shortcut"]
    return []


def _check_inference(vae: nn.Module, inputs: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in vae.parameters())):
        raise RuntimeError(
            "Tiled encode/decode is for inference: it writes tiles in place, which autograd cannot follow. Call "
            "it under torch.no_grad() or torch.inference_mode() (pipelines do), freeze the VAE with "
            "vae.requires_grad_(False), or disable_tiling() to differentiate through the VAE."
        )
    if any(p.device.type == "meta" for p in vae.parameters()):
        raise RuntimeError(
            "Tiled encode/decode reads the weights directly and cannot run with them offloaded to the meta device "
            "(sequential CPU offload); use enable_model_cpu_offload() or disable_tiling()."
        )


def tiled_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder moments of `x` (N, C, H, W), including `quant_conv`, computed tile by tile (see package docstring).

    Equals `vae.quant_conv(vae.encoder(x))` up to float rounding.
    """
    _check_inference(vae, x)
    check_tiling_supported(vae)
    with torch.no_grad():
        return _TiledRun(vae, x.shape[0], x.shape[-2], x.shape[-1], x.device).encode(x)


def tiled_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decoded images of the (unscaled) latents `z`, including `post_quant_conv`, computed tile by tile.

    Equals `vae.decoder(vae.post_quant_conv(z))` up to float rounding.
    """
    _check_inference(vae, z)
    check_tiling_supported(vae)
    factor = vae.downsampling_factor
    with torch.no_grad():
        return _TiledRun(vae, z.shape[0], z.shape[-2] * factor, z.shape[-1] * factor, z.device).decode(z)
