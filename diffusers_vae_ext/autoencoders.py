"""One face for every diffusers autoencoder: `AutoencoderAdapter`, `load_autoencoder`, `as_autoencoder`.

Our tools (statistics, the latent cache, reconstruct, tiling) need the same few facts from every autoencoder
class, and diffusers' classes answer them differently: `encode` returns a posterior (`latent_dist`) or a
deterministic tensor (`.latent` for AutoencoderDC, `.latents` for AutoencoderTiny); video classes take 5-D
tensors (B, C, T, H, W) and silently drop frames that do not fit their causal temporal compression; each family's
pipelines scale latents their own way, some with statistics stored in the weights. The adapter wraps a model
unchanged and answers them uniformly:

| class | encode | pixels | factors (space / time) | frames | pipelines' scaling |
|---|---|---|---|---|---|
| AutoencoderKL (ours: fast path) | posterior | 4-D | 2^(levels-1) / 1 | - | from its config keys |
| AutoencoderKLFlux2 | posterior | 4-D, sides of 16k | 8 / 1 | - | 2x2-patch BatchNorm stats (weights) |
| AutoencoderDC | deterministic | 4-D | 32 / 1 | - | `z * scaling_factor` |
| AutoencoderTiny | deterministic | 4-D | 8 / 1 | - | `z * sf` or `(z - shift) * sf` |
| AutoencoderKLWan, AutoencoderKLQwenImage | posterior | 5-D | 8 (16: Wan 2.2) / 4 | 4k + 1 | `(z - mean_c) / std_c` (config) |
| AutoencoderKLHunyuanVideo | posterior | 5-D | 8 / 4 | 4k + 1 | `z * scaling_factor` |
| AutoencoderKLLTXVideo | posterior | 5-D | 32 / 8 | 8k + 1 | `(z - mean_c) * sf / std_c` (weights) |
| AutoencoderKLCogVideoX | posterior | 5-D | 8 / 4 | 8k + 1 | `z * scaling_factor` |

Qwen-Image is an image model with a 5-D VAE: images are one-frame videos (B, C, 1, H, W). The scaling formulas
live in `diffusers_vae_ext.scaling`, the choice per class in `diffusers_vae_ext.conventions`;
`docs/autoencoders.md` has examples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .conventions import PipelineConvention, pipeline_convention
from .scaling import scale_latents, unscale_latents

__all__ = ["SUPPORTED_CLASSES", "AutoencoderAdapter", "as_autoencoder", "load_autoencoder"]


class AutoencoderAdapter:
    r"""The facts and operations our tools need from an autoencoder, the same for every supported class.

    Build one with `load_autoencoder(folder)` or `as_autoencoder(model)`; the model itself stays untouched in
    `.vae` (use it directly for anything class-specific).

    Attributes:
        vae (`torch.nn.Module`): the wrapped diffusers (or our) model instance.
        class_name (`str`): its diffusers class name, e.g. `"AutoencoderKLWan"`.
        config (`dict`): the model's config as a plain dict.
        spatial_factor (`int`): pixels per latent pixel along height and width.
        temporal_factor (`int`): frames per latent frame after the first (1 for image autoencoders).
        latent_channels (`int`): channels of the raw latents.
        is_video (`bool`): pixels and latents are 5-D (B, C, T, H, W).
        has_posterior (`bool`): `encode_moments` returns mean and log-variance (2C channels); False for
            deterministic latents (AutoencoderDC, AutoencoderTiny), returned as they are (C channels).
        size_multiple (`int`): height and width must be multiples of this; usually `spatial_factor`, 16 for
            FLUX.2 (its pipelines patchify the latents 2x2).
        frame_multiple (`int`): valid frame counts are `frame_multiple * k + 1` (video classes).
        convention (`PipelineConvention`): how this class's pipelines scale latents.
    """

    class_name = "AutoencoderKL"
    is_video = False
    has_posterior = True
    _output_attribute = "latent_dist"

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self.config: dict[str, Any] = dict(vae.config)
        self.spatial_factor = self._spatial_factor()
        self.temporal_factor = self._temporal_factor() if self.is_video else 1
        self.latent_channels = self._latent_channels()
        self.size_multiple = self.spatial_factor
        self.frame_multiple = self.temporal_factor
        self.in_channels = int(self._get("in_channels", 3))
        self.out_channels = int(self._get("out_channels", self.in_channels))

    # ------------------------------------------------------------------------------------------ class facts
    def _get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def _latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    def _spatial_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def _temporal_factor(self) -> int:
        return int(self.config["temporal_compression_ratio"])

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def convention(self) -> PipelineConvention:
        return pipeline_convention(self.class_name, self.config)

    def __repr__(self) -> str:
        kind = "video" if self.is_video else "image"
        frames = f", frames {self.frame_multiple}k+1" if self.is_video else ""
        return (
            f"AutoencoderAdapter({self.class_name}: {kind}, {self.latent_channels} latent channels, factors "
            f"{self.spatial_factor}/{self.temporal_factor}{frames}, "
            f"{'posterior' if self.has_posterior else 'deterministic'}, {self.convention.convention} convention)"
        )

    # ------------------------------------------------------------------------------------------ frames
    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of `num_frames` valid frames: `(T - 1) / temporal_factor + 1` (images: T)."""
        if not self.is_video:
            return num_frames
        return (num_frames - 1) // self.temporal_factor + 1

    def valid_num_frames(self, num_frames: int) -> bool:
        """Whether this class encodes `num_frames` frames without dropping any (`frame_multiple * k + 1`)."""
        if num_frames < 1:
            return False
        return not self.is_video or (num_frames - 1) % self.frame_multiple == 0

    def largest_valid_num_frames(self, num_frames: int) -> int:
        """The largest valid frame count not above `num_frames` (0 when there is none)."""
        if num_frames < 1:
            return 0
        if not self.is_video:
            return num_frames
        return (num_frames - 1) // self.frame_multiple * self.frame_multiple + 1

    def _frame_rule(self) -> str:
        m = self.frame_multiple
        return f"{m}k + 1 frames ({', '.join(str(m * k + 1) for k in range(4))}, ...)"

    # ------------------------------------------------------------------------------------------ checks
    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise a `ValueError` saying what to do unless `pixels` can be encoded exactly by this class.

        Checked: a floating-point tensor, 4-D (B, C, H, W) for image classes and 5-D (B, C, T, H, W) for video
        classes, `in_channels` channels, height and width multiples of `size_multiple`, and for video classes a
        valid frame count (video classes otherwise drop the frames that do not fit, without a word).
        """
        name = self.class_name
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"{name} expects a torch.Tensor of pixels, got {type(pixels).__name__}.")
        if self.is_video and pixels.ndim != 5:
            hint = " For images, add a frame axis: pixels.unsqueeze(2)." if pixels.ndim == 4 else ""
            raise ValueError(f"{name} encodes 5-D videos (B, C, T, H, W), got shape {tuple(pixels.shape)}.{hint}")
        if not self.is_video and pixels.ndim != 4:
            hint = " Add a batch dimension with x.unsqueeze(0)." if pixels.ndim == 3 else ""
            if pixels.ndim == 5:
                hint = " For video frames, fold the frames into the batch: x.transpose(1, 2).flatten(0, 1)."
            raise ValueError(f"{name} encodes 4-D images (B, C, H, W), got shape {tuple(pixels.shape)}.{hint}")
        if not pixels.is_floating_point():
            raise ValueError(
                f"{name} got an integer tensor ({pixels.dtype}). Convert pixels to float in [-1, 1] first, "
                "e.g. x.float() / 127.5 - 1 for uint8 pixels."
            )
        if pixels.shape[0] == 0:
            raise ValueError(f"{name} got an empty batch.")
        if pixels.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} has in_channels={self.in_channels} but got {pixels.shape[1]} channels in dimension 1. "
                f"Pixels are (B, C, {'T, ' if self.is_video else ''}H, W): check the axis order and convert "
                "grayscale/RGBA inputs."
            )
        height, width = pixels.shape[-2:]
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"{name} needs height and width divisible by {multiple}, got {height}x{width}. Resize, crop or "
                f"pad to e.g. {max(height // multiple, 1) * multiple}x{max(width // multiple, 1) * multiple}."
            )
        if self.is_video and not self.valid_num_frames(pixels.shape[2]):
            frames = pixels.shape[2]
            lower = self.largest_valid_num_frames(frames)
            upper = lower + self.frame_multiple
            raise ValueError(
                f"{name} encodes {self._frame_rule()}; got {frames} frames, of which it would silently drop "
                f"{frames - lower}. Use {lower} or {upper} frames (e.g. --num_frames {lower})."
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise ValueError(f"{self.class_name}.decode expects a floating-point latent tensor.")
        ndim = 5 if self.is_video else 4
        if latents.ndim != ndim or latents.shape[1] != self.latent_channels:
            layout = "(B, C, T, h, w)" if self.is_video else "(B, C, h, w)"
            raise ValueError(
                f"{self.class_name} decodes latents {layout} with C={self.latent_channels}, got shape "
                f"{tuple(latents.shape)}."
            )

    # ------------------------------------------------------------------------------------------ encode/decode
    def _encode_output(self, pixels: torch.Tensor) -> Any:
        return getattr(self.vae.encode(pixels), self._output_attribute)

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode pixels in [-1, 1] (checked with `check_pixels`) into raw, unscaled latent moments.

        Returns `cat([mean, logvar], dim=1)` (B, 2C, ...) when `has_posterior` (logvar clamped to [-30, 20] as
        diffusers' `DiagonalGaussianDistribution` does), else the deterministic latents (B, C, ...). Pixels are
        moved to the model's device and dtype; run under `torch.no_grad()` unless you need gradients.
        """
        self.check_pixels(pixels)
        output = self._encode_output(pixels.to(device=self.device, dtype=self.dtype))
        moments = output if not self.has_posterior else torch.cat([output.mean, output.logvar], dim=1)
        frames = (self.num_latent_frames(pixels.shape[2]),) if self.is_video else ()
        height, width = pixels.shape[-2] // self.spatial_factor, pixels.shape[-1] // self.spatial_factor
        channels = self.latent_channels * (2 if self.has_posterior else 1)
        self._check_output("encode", moments, (pixels.shape[0], channels, *frames, height, width))
        return moments

    def _check_output(self, what: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
        # Some classes' own tilers return the wrong size for tile sizes other than their defaults (CogVideoX):
        # an error here is better than latents or frames silently shifted against the input.
        if tuple(tensor.shape) != tuple(expected):
            tiling = " with tiling on: disable it or keep the class's default tile sizes" if self._tiling_on() else ""
            raise RuntimeError(
                f"{self.class_name}.{what} returned shape {tuple(tensor.shape)}, expected {tuple(expected)}{tiling}."
            )

    def _tiling_on(self) -> bool:
        return bool(getattr(self.vae, "use_tiling", False))

    def latents_from_moments(
        self, moments: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw latents from `encode_moments`' output: a posterior draw (`sample`) or its mean.

        Deterministic classes return `moments` unchanged (there is nothing to draw).
        """
        if not self.has_posterior:
            return moments
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        # The same draw as diffusers' `DiagonalGaussianDistribution(moments).sample(generator)`.
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents -> pixels in about [-1, 1] (the decoder's output, not clamped).

        Latents are moved to the model's device and dtype.
        """
        self._check_latents(latents)
        decoded = self.vae.decode(latents.to(device=self.device, dtype=self.dtype)).sample
        self._check_output("decode", decoded, self._decoded_shape(latents))
        return decoded

    def _decoded_shape(self, latents: torch.Tensor) -> tuple[int, ...]:
        frames = ((latents.shape[2] - 1) * self.temporal_factor + 1,) if self.is_video else ()
        height, width = latents.shape[-2] * self.spatial_factor, latents.shape[-1] * self.spatial_factor
        return (latents.shape[0], self.out_channels, *frames, height, width)

    # ------------------------------------------------------------------------------------------ scaling
    def scaling_config(self) -> dict[str, Any]:
        """The numbers this class's pipelines scale with, as a mapping for `scaling.scale_latents`.

        Read at call time, so statistics written into the model later are used.
        """
        return {key: self.config.get(key) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what this class's pipelines feed the diffusion model (same shape and layout)."""
        return scale_latents(latents, self.scaling_config(), self.convention.convention)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale`: what this class's pipelines do to latents right before `vae.decode`."""
        return unscale_latents(latents, self.scaling_config(), self.convention.convention)

    # ------------------------------------------------------------------------------------------ tiling
    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """Tile large inputs: our AutoencoderKL's exact tiler, or the class's own `enable_tiling(...)`.

        Arguments are passed through unchanged; they differ per class (see the class's `enable_tiling`).
        diffusers' tilers blend overlapping tiles, so their results differ a little from untiled ones
        (docs/autoencoders.md has the PSNR); ours equals the untiled result.
        """
        self.vae.enable_tiling(*args, **kwargs)

    def disable_tiling(self) -> None:
        self.vae.disable_tiling()


# ===================================================================================================== families


class _KLAdapter(AutoencoderAdapter):
    pass


class _Flux2Adapter(AutoencoderAdapter):
    class_name = "AutoencoderKLFlux2"

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        self.size_multiple = 2 * self.spatial_factor

    def scaling_config(self) -> dict[str, Any]:
        # The pipelines normalise 2x2-patchified latents with the BatchNorm's running statistics.
        bn = self.vae.bn
        eps = self.config.get("batch_norm_eps", 1e-4)
        return {
            "scaling_factor": 1.0,
            "latents_mean": bn.running_mean.detach().float().cpu(),
            "latents_std": torch.sqrt(bn.running_var.detach().float().cpu() + eps),
            "latents_patch_size": 2,
        }


class _DCAdapter(AutoencoderAdapter):
    class_name = "AutoencoderDC"
    has_posterior = False
    _output_attribute = "latent"

    def _spatial_factor(self) -> int:
        return 2 ** (len(self.config["encoder_block_out_channels"]) - 1)


class _TinyAdapter(AutoencoderAdapter):
    class_name = "AutoencoderTiny"
    has_posterior = False
    _output_attribute = "latents"

    def _spatial_factor(self) -> int:
        # One stride-2 convolution per encoder level after the first.
        return 2 ** (len(self.config["num_encoder_blocks"]) - 1)


class _WanAdapter(AutoencoderAdapter):
    class_name = "AutoencoderKLWan"
    is_video = True

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        # Wan 2.2 patchifies pixels 2x2 before its encoder: its config counts the patchified channels (12 for RGB).
        patch = int(self.config.get("patch_size") or 1)
        self.in_channels //= patch * patch
        self.out_channels //= patch * patch

    def _latent_channels(self) -> int:
        return int(self.config["z_dim"])

    def _spatial_factor(self) -> int:
        # One downsampling per level after the first, times Wan 2.2's pixel patchify.
        return 2 ** (len(self.config["dim_mult"]) - 1) * int(self.config.get("patch_size") or 1)

    def _temporal_factor(self) -> int:
        return 2 ** sum(bool(flag) for flag in self.config["temperal_downsample"])


class _QwenImageAdapter(_WanAdapter):
    class_name = "AutoencoderKLQwenImage"

    def _spatial_factor(self) -> int:
        return 2 ** len(self.config["temperal_downsample"])


class _HunyuanVideoAdapter(AutoencoderAdapter):
    class_name = "AutoencoderKLHunyuanVideo"
    is_video = True

    def _spatial_factor(self) -> int:
        return int(self.config["spatial_compression_ratio"])


class _LTXVideoAdapter(AutoencoderAdapter):
    class_name = "AutoencoderKLLTXVideo"
    is_video = True
    # The pipelines decode at this timestep when the decoder is timestep-conditioned (LTX 0.9.1+), with noise
    # scale equal to it: 0.0 decodes the latents as they are.
    decode_timestep = 0.0

    def _spatial_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    def _temporal_factor(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    def scaling_config(self) -> dict[str, Any]:
        return {
            "scaling_factor": self.config.get("scaling_factor", 1.0),
            "latents_mean": self.vae.latents_mean.detach().float().cpu(),
            "latents_std": self.vae.latents_std.detach().float().cpu(),
        }

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        latents = latents.to(device=self.device, dtype=self.dtype)
        temb = None
        if self.config.get("timestep_conditioning"):
            temb = torch.full((latents.shape[0],), self.decode_timestep, device=self.device, dtype=self.dtype)
        decoded = self.vae.decode(latents, temb=temb).sample
        self._check_output("decode", decoded, self._decoded_shape(latents))
        return decoded


class _CogVideoXAdapter(AutoencoderAdapter):
    class_name = "AutoencoderKLCogVideoX"
    is_video = True

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        # The encoder runs 8-frame batches after the first frame (`num_sample_frames_batch_size`): other counts
        # decode to a different number of frames.
        self.frame_multiple = int(getattr(vae, "num_sample_frames_batch_size", 2 * self.temporal_factor))


_ADAPTERS: dict[str, type[AutoencoderAdapter]] = {
    "AutoencoderKL": _KLAdapter,
    "AutoencoderKLFlux2": _Flux2Adapter,
    "AutoencoderDC": _DCAdapter,
    "AutoencoderTiny": _TinyAdapter,
    "AutoencoderKLWan": _WanAdapter,
    "AutoencoderKLQwenImage": _QwenImageAdapter,
    "AutoencoderKLHunyuanVideo": _HunyuanVideoAdapter,
    "AutoencoderKLLTXVideo": _LTXVideoAdapter,
    "AutoencoderKLCogVideoX": _CogVideoXAdapter,
}

SUPPORTED_CLASSES: tuple[str, ...] = tuple(_ADAPTERS)


def _unsupported(name: str | None, where: str) -> ValueError:
    return ValueError(
        f"{where}: autoencoder class {name!r} is not supported. Supported classes: {', '.join(SUPPORTED_CLASSES)}."
    )


def as_autoencoder(vae: torch.nn.Module | AutoencoderAdapter) -> AutoencoderAdapter:
    """Wrap an already loaded autoencoder (ours or diffusers'; subclasses too) in its adapter.

    An adapter is returned as it is. Unsupported classes raise a `ValueError` naming the supported ones.
    """
    if isinstance(vae, AutoencoderAdapter):
        return vae
    for klass in type(vae).__mro__:
        adapter = _ADAPTERS.get(klass.__name__)
        if adapter is not None and hasattr(vae, "config"):
            return adapter(vae)
    raise _unsupported(type(vae).__name__, "as_autoencoder")


def _model_class(name: str) -> type:
    if name == "AutoencoderKL":
        from .modeling import AutoencoderKL  # our drop-in, with the fast CPU path and exact tiling

        return AutoencoderKL
    import diffusers

    return getattr(diffusers, name)


def load_autoencoder(
    path: str | os.PathLike,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> AutoencoderAdapter:
    """Load the autoencoder class named by the folder's `config.json` (`_class_name`) and wrap it.

    Args:
        path: a local folder or a hub repo id. A pipeline folder (with `vae/config.json` and no `config.json`)
            loads its `vae` subfolder.
        subfolder: e.g. `"vae"` for a pipeline repo.
        torch_dtype: load the weights in this dtype (default: as stored).

    Weights load from safetensors only; a folder holding only pickle weights (`.bin`, `.ckpt`, ...) is refused
    with the one-time conversion command. `"AutoencoderKL"` loads our `diffusers_vae_ext.AutoencoderKL` (same
    weights, faster CPU path, exact tiling); other supported classes load diffusers' own. An unknown class gets
    a `ValueError` naming the supported ones.
    """
    from .modeling import AutoencoderKL, _require_safetensors

    folder = Path(path)
    if subfolder is None and folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "vae" / "config.json").is_file():
            subfolder = "vae"  # a pipeline folder
        else:
            raise FileNotFoundError(
                f"{folder} has no config.json (nor vae/config.json): point at a diffusers autoencoder folder."
            )
    config = AutoencoderKL.load_config(str(path), subfolder=subfolder or None)
    name = config.get("_class_name")
    if name not in _ADAPTERS:
        raise _unsupported(name, f"{Path(path) / (subfolder or '')}/config.json")
    model_folder = folder / (subfolder or "")
    if model_folder.is_dir():
        _require_safetensors(model_folder)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    model = _model_class(name).from_pretrained(str(path), **kwargs)
    return as_autoencoder(model.eval())
