"""Exact tiled encode and decode for `AutoencoderKL`: the tiled result equals the untiled one up to float rounding.

diffusers' tiler runs every tile through the whole network on its own, so each tile gets its own GroupNorm
statistics and its own attention, and overlapping tiles are blended; the result differs from the untiled one
(visible seams and tone shifts). This tiler instead runs the network **layer by layer over all tiles**:

* Between two GroupNorms the network is local: one or two convolutions (a 3x3 convolution reads 1 pixel of
  neighbourhood at its resolution; the encoder's stride-2 downsampling reads 1 more pixel below and right; the
  decoder's nearest-upsample + 3x3 convolution reads 1 pixel at the coarse resolution). Each such *stage*
  computes only the non-overlapping core of every tile, reading exactly that neighbourhood from the stored
  output of the previous stage (true neighbours inside the image, zeros at the image border, as the untiled
  zero padding does). No convolution output is computed twice, so tiling costs no extra convolution work.
* At every GroupNorm the statistics are those of the whole image: each stage accumulates, per sample and group,
  the count, mean and sum of squared deviations of every tile core (Welford per tile in fp32, combined with
  Chan's formula in float64), and the next stage normalises all tiles with the combined statistics.
* The mid blocks (with their attention) run on the whole latent-resolution feature map, which is small
  (`block_out_channels[-1]` channels at 1/`downsampling_factor` of the resolution), with the model's own modules.
* Stage outputs are kept as horizontal bands; a band an input is no longer needed for is freed as soon as the
  tiles below it are done, and a ResNet block's residual sum is written in place over its input.
* As in the untiled fast path (`blocks.py`), work tiles are channels_last on CPU (oneDNN's faster layout) and the
  decoder's nearest-2x + 3x3 convolutions run as sub-pixel convolutions (`blocks.subpixel_weight`), so tiling
  does the same convolution work as the untiled path; the extra cost is one statistics pass per GroupNorm and
  the copies of tile borders.

Tiles are `tile_sample_size` pixels (at the image resolution; the image is split into equal tiles aligned to the
downsampling factor, so a stride-2 layer never straddles a tile origin). At coarse stages, where a tile holds
few pixels, neighbouring tiles are merged into one work tile of about the same number of elements as a full
resolution tile: one convolution over a merged tile computes the same pixels as a batch of the small tiles,
without their duplicated borders, and keeps the convolutions large enough to run efficiently.

Peak memory (N images of H x W, tile T x T pixels, C_k channels at stage k, `factor` the downsampling factor):

* compute device: the weights; the latent-resolution part run whole (mid block: a few tensors of
  N x C_mid x (H/factor) x (W/factor), plus what the attention kernel needs for (H/factor * W/factor) tokens);
  and one work tile at a time: about 4 tensors of N x C_k x (t + 2)^2 elements (the tile with its border, its
  normalised copy, the zero-padded copy at the image edge, the convolution output), with t ~ T at full
  resolution (merged tiles at coarse stages hold about as many elements).
* storage (host memory when the compute device is an accelerator and `offload_to_cpu` is on, else the compute
  device): the current stage's inputs and outputs at their resolution. Inputs that the stage consumes are freed
  band by band, so the live total is at most the input plus the output of one stage plus one band of
  T rows: for a ResNet block about N x (C_in + 2 C_out) x H_k x W_k (input, first convolution's output, shortcut),
  for the decoder's upsampling stages about N x C x (H_k W_k / 4 + H_k W_k). For the Stable Diffusion kl-f8 VAE
  the largest is the first full-resolution decoder block (256 -> 128 channels): about N x 512 x H x W values,
  i.e. 2 GiB at 1024 x 1024 in float32 if held at once, about 1.25 GiB with the band-wise release
  (untiled diffusers holds about 3 GiB at that point: input, GroupNorm output and SiLU output at 256 channels).
  With offloading, the compute device never holds a full-resolution activation.

Tiling is for inference: it writes tiles in place, which autograd cannot follow, so a call that would need
gradients (grad mode on and the input or a parameter requires grad) raises a `RuntimeError`; wrap the call in
`torch.no_grad()` or `torch.inference_mode()` (pipelines already do).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D

from .blocks import subpixel_weight

__all__ = ["TiledAutoencoderMixin", "tiled_decode", "tiled_encode", "check_tiling_supported"]


# ------------------------------------------------------------------------------------------------ public API
class TiledAutoencoderMixin:
    """`enable_tiling()` / `disable_tiling()` for `AutoencoderKL`, backed by the exact tiler of this module.

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
                neighbourhood from the neighbouring tiles (see the module docstring). Must be non-negative.
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


# Tile borders and halo rows are small: run them on one thread. Waking a second intra-op thread for a few
# thousand elements costs more than the work, and on a loaded CPU it stalls until the thread is scheduled
# (measured: ~7 ms per border fill on this project's shared 2-core machine, 0.01 ms on one thread).
SMALL_OP_ELEMENTS = 1 << 18


@contextmanager
def _one_thread(device: torch.device):
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _memory_format(device: torch.device) -> torch.memory_format:
    # As in blocks.py: oneDNN's convolutions are faster on channels_last (NHWC) activations on CPU.
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _storage_device(vae: nn.Module, compute: torch.device) -> torch.device:
    offload = getattr(vae, "tile_offload_to_cpu", None)
    if offload is None:
        offload = compute.type != "cpu"
    return torch.device("cpu") if offload else compute


def tiled_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder moments of `x` (N, C, H, W), including `quant_conv`, computed tile by tile (see module docstring).

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


# ------------------------------------------------------------------------------------------------ layout
# Work tiles hold about tile_sample_size^2 pixels, shaped as strips up to this many tiles wide: the thinner the
# strips, the sooner a consumed input band is released (see the peak memory model above).
STRIP_WIDTH_IN_TILES = 4


def _split(length: int, part: int, align: int) -> list[int]:
    """Edges of ceil(length / part) nearly equal parts of `length`, each a multiple of `align`."""
    units = length // align
    parts = min(units, max(1, math.ceil(length / part)))
    base, extra = divmod(units, parts)
    edges = [0]
    for index in range(parts):
        edges.append(edges[-1] + (base + (index < extra)) * align)
    return edges


def _layout(height: int, width: int, tile: int, align: int) -> tuple[list[int], list[int]]:
    """Row and column edges of the full-resolution work tiles: strips of about tile^2 pixels, aligned to the
    downsampling factor so that every coarser resolution has integer edges."""
    col_edges = _split(width, STRIP_WIDTH_IN_TILES * tile, align)
    strip_width = max(b - a for a, b in zip(col_edges[:-1], col_edges[1:]))
    strip_height = max(align, tile * tile // strip_width // align * align)
    return _split(height, strip_height, align), col_edges


def _coarsen(edges: list[int], merge: int) -> list[int]:
    return edges[::merge] if (len(edges) - 1) % merge == 0 else edges[::merge] + [edges[-1]]


# ------------------------------------------------------------------------------------------------ storage
class _Store:
    """An (N, C, H, W) activation kept as horizontal bands (separate tensors) so consumed bands can be freed."""

    def __init__(self, shape: tuple[int, ...], edges: list[int], device: torch.device, dtype: torch.dtype):
        self.shape, self.edges, self.device, self.dtype = tuple(shape), edges, device, dtype
        self.bands: list[torch.Tensor | None] = [None] * (len(edges) - 1)
        self.released = 0  # bands [0, released) are gone

    @classmethod
    def of(cls, tensor: torch.Tensor, edges: list[int], device: torch.device) -> _Store:
        """Bands viewing `tensor` (moved to `device`): releasing them frees nothing until the last view goes."""
        store = cls(tensor.shape, edges, device, tensor.dtype)
        tensor = tensor.to(device).contiguous(memory_format=_memory_format(device))
        store.bands = [tensor[:, :, a:b] for a, b in zip(edges[:-1], edges[1:])]
        return store

    def pieces(self, r0: int, r1: int):
        """(band slice, first row) for the bands covering rows [r0, r1) (inside the image)."""
        for index, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            if hi <= r0 or lo >= r1:
                continue
            band = self.bands[index]
            if band is None:
                raise RuntimeError(f"internal tiling error: band {index} used after release")
            yield band[:, :, max(r0, lo) - lo : min(r1, hi) - lo], max(r0, lo)

    def gather(
        self, r0: int, r1: int, c0: int, c1: int, device: torch.device, norm: _Norm | None = None
    ) -> torch.Tensor:
        """Rows [r0, r1) x cols [c0, c1) as one new tensor on `device`, zero outside the image (like a
        convolution's zero padding), normalised and activated with `norm` inside it."""
        height, width = self.shape[2], self.shape[3]
        a, b, c, d = max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)
        shape = (self.shape[0], self.shape[1], r1 - r0, c1 - c0)
        out = torch.empty(shape, device=device, dtype=self.dtype, memory_format=_memory_format(device))
        with _one_thread(device):
            for edge in (out[:, :, : a - r0], out[:, :, b - r0 :], out[:, :, :, : c - c0], out[:, :, :, d - c0 :]):
                edge.zero_()
        for piece, row in self.pieces(a, b):
            target = out[:, :, row - r0 : row - r0 + piece.shape[2], c - c0 : d - c0]
            piece = piece[:, :, :, c:d].to(device)
            with _one_thread(device) if piece.numel() < SMALL_OP_ELEMENTS else nullcontext():
                if norm is None:
                    target.copy_(piece)
                else:
                    norm.normalize_into(piece, target)
        if norm is not None:
            norm.activate_(out[:, :, a - r0 : b - r0, c - c0 : d - c0])
        return out

    def view(self, r0: int, r1: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
        """Rows [r0, r1) x cols [c0, c1) (inside the image): a view when one band holds them, else a copy."""
        pieces = list(self.pieces(r0, r1))
        if len(pieces) == 1 and self.device == device:
            return pieces[0][0][:, :, :, c0:c1]
        return self.gather(r0, r1, c0, c1, device)

    def write(self, r0: int, c0: int, value: torch.Tensor) -> None:
        r1, c1 = r0 + value.shape[2], c0 + value.shape[3]
        for index, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            if hi <= r0 or lo >= r1:
                continue
            if self.bands[index] is None:
                if (r0, r1, c0, c1) == (lo, hi, 0, self.shape[3]):
                    self.bands[index] = value.to(self.device)  # the tile is the whole band: keep it, no copy
                    continue
                shape = (self.shape[0], self.shape[1], hi - lo, self.shape[3])
                self.bands[index] = torch.empty(
                    shape, device=self.device, dtype=self.dtype, memory_format=_memory_format(self.device)
                )
            a, b = max(r0, lo), min(r1, hi)
            self.bands[index][:, :, a - lo : b - lo, c0:c1].copy_(value[:, :, a - r0 : b - r0])

    def release_rows_before(self, row: int) -> None:
        while self.released < len(self.bands) and self.edges[self.released + 1] <= row:
            self.bands[self.released] = None
            self.released += 1

    def release(self) -> None:
        self.bands = [None] * len(self.bands)
        self.released = len(self.bands)

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.cat([band.to(device) for band in self.bands], dim=2).contiguous()


class _GroupStats:
    """Per-(sample, group) mean and variance of an activation, accumulated tile by tile.

    Each tile contributes (count, mean, M2) from GroupNorm's own fused kernel (`torch.native_group_norm`, one pass
    over at most a tile's elements; several times faster than `torch.var_mean` on a channels_last tile); tiles
    are combined in float64 with Chan et al.'s parallel formula, so the result matches GroupNorm's whole-image
    statistics to float rounding whatever the number of tiles.
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.counts: list[int] = []
        self.means: list[torch.Tensor] = []
        self.m2s: list[torch.Tensor] = []

    def add(self, tile: torch.Tensor) -> None:
        tile = tile if tile.dtype in (torch.float32, torch.float64) else tile.float()
        batch, channels, height, width = tile.shape
        # The kernel wants a dense NCHW or NHWC tensor with canonical strides (even on size-1 dims).
        if tile.is_contiguous():
            tile = tile.as_strided(tile.shape, (channels * height * width, height * width, width, 1))
        elif tile.is_contiguous(memory_format=torch.channels_last):
            tile = tile.as_strided(tile.shape, (channels * height * width, 1, width * channels, channels))
        else:  # a column slice of a band
            tile = tile.contiguous(memory_format=_memory_format(tile.device))
        # eps = 0, so rstd = var ** -0.5 exactly as the kernel computed it (inf for a constant group: var 0).
        _, mean, rstd = torch.native_group_norm(tile, None, None, batch, channels, height * width, self.groups, 0.0)
        count = channels // self.groups * height * width
        self.counts.append(count)
        self.means.append(mean.double())
        self.m2s.append(rstd.double().pow(-2) * count)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.means[0].device)[:, None, None]
        means, m2s = torch.stack(self.means), torch.stack(self.m2s)
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        return mean, m2 / total


@dataclass
class _Norm:
    """A GroupNorm with fixed (whole-image) statistics, folded into a per-(sample, channel) scale and shift,
    followed by the block's activation."""

    scale: torch.Tensor
    shift: torch.Tensor
    act: nn.Module | None

    @classmethod
    def from_stats(cls, norm: nn.GroupNorm, stats: _GroupStats, act: nn.Module | None, dtype: torch.dtype):
        mean, var = stats.finalize()
        per_group = norm.num_channels // norm.num_groups
        rstd = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
        mean = mean.repeat_interleave(per_group, dim=1)
        scale = rstd if norm.weight is None else rstd * norm.weight.double()
        shift = -mean * scale if norm.bias is None else norm.bias.double() - mean * scale
        work_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return cls(scale[:, :, None, None].to(work_dtype), shift[:, :, None, None].to(work_dtype), act)

    def normalize_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if x.dtype == self.scale.dtype:
            torch.addcmul(self.shift, x, self.scale, out=out)
        else:  # half precision: normalise in fp32 as GroupNorm does, store rounded
            out.copy_(torch.addcmul(self.shift, x.to(self.scale.dtype), self.scale))

    def activate_(self, x: torch.Tensor) -> None:
        if isinstance(self.act, nn.SiLU):
            F.silu(x, inplace=True)
        elif self.act is not None:
            x.copy_(self.act(x))


def _interleave_phases(phases: torch.Tensor, channels: int) -> torch.Tensor:
    """The (N, C, 2h, 2w) output of a sub-pixel convolution from its (N, 4C, h + 1, w + 1) phase outputs, as in
    `blocks.upsample_nearest2x_conv3x3`: phase (a, b) holds output pixels (2i + a, 2j + b) at [a : a + h, b : b + w]."""
    batch, _, height, width = phases.shape
    height, width = height - 1, width - 1
    out = torch.empty(
        (batch, channels, 2 * height, 2 * width),
        dtype=phases.dtype,
        device=phases.device,
        memory_format=_memory_format(phases.device),
    )
    grid = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # (N, C, h, a, w, b), a view of `out`
    for a in range(2):
        for b in range(2):
            block = phases[:, (2 * a + b) * channels : (2 * a + b + 1) * channels]
            grid[:, :, :, a, :, b].copy_(block[:, :, a : a + height, b : b + width])
    return out


# ------------------------------------------------------------------------------------------------ execution
class _TiledRun:
    """One tiled encode or decode: the tile layout, the devices, and the stages of the network."""

    def __init__(self, vae: nn.Module, batch: int, height: int, width: int, device: torch.device):
        self.vae = vae
        self.batch = batch
        self.factor = vae.downsampling_factor
        self.compute = device
        self.storage = _storage_device(vae, device)
        self.row_edges, self.col_edges = _layout(height, width, vae.tile_sample_min_size, self.factor)
        self.base_channels = vae.config.block_out_channels[0]

    # -- geometry: every resolution is `scale` times coarser than the image; tile edges are multiples of it
    def edges(self, scale: int, rows: bool = True) -> list[int]:
        return [e // scale for e in (self.row_edges if rows else self.col_edges)]

    def work_grid(self, scale: int, channels: int) -> tuple[list[int], list[int]]:
        """Tile edges for a stage at `scale`: coarse stages merge tiles (rows first) so a work tile holds about
        as many elements as a full-resolution one (its pixels x block_out_channels[0])."""
        rows, cols = self.edges(scale, True), self.edges(scale, False)
        merge = max(1, scale * scale * self.base_channels // max(channels, 1))
        merge_rows = min(merge, len(rows) - 1)
        merge_cols = max(1, merge // merge_rows)
        return _coarsen(rows, merge_rows), _coarsen(cols, merge_cols)

    def new_store(self, channels: int, scale: int, dtype: torch.dtype, rows: list[int], device=None) -> _Store:
        # Bands = the producing stage's work-tile rows, so a full-width work tile becomes a band without a copy.
        height, width = self.row_edges[-1] // scale, self.col_edges[-1] // scale
        return _Store((self.batch, channels, height, width), rows, device or self.storage, dtype)

    # -- the one kind of stage: [GroupNorm + act] -> [nearest x2] -> conv, over all tiles
    def conv_stage(
        self,
        x: _Store,
        conv: nn.Conv2d,
        scale_in: int,
        *,
        norm: _Norm | None = None,
        upsample: bool = False,
        extra_pad: int = 0,
        shortcut: nn.Conv2d | None = None,
        residual: _Store | None = None,
        output_scale_factor: float = 1.0,
        consume: bool = False,
        stats_groups: int | None = None,
        out_device: torch.device | None = None,
    ) -> tuple[_Store, _GroupStats | None, _Store | None]:
        """Run `conv` (zero padding as in the untiled layer) on the whole image, one work tile at a time.

        `norm` (GroupNorm with global statistics + activation) is applied to the input first; `upsample` doubles
        the input with nearest interpolation before the convolution (decoder's Upsample2D); `extra_pad` zero
        rows/columns are added after the image's end before the convolution (encoder's Downsample2D pads
        (0, 1, 0, 1)). `shortcut` (1x1) maps the raw input core into a second output; `residual` is added to the
        convolution output, `(residual + out) / output_scale_factor` being written in place into `residual`.
        `consume` frees the input band by band. `stats_groups` accumulates the output's GroupNorm statistics.
        """
        stride, kernel, before = conv.stride[0], conv.kernel_size[0], conv.padding[0]
        scale_out = scale_in // 2 if upsample else scale_in * stride
        rows, cols = self.work_grid(scale_out, max(x.shape[1], conv.out_channels))

        def span(a: int, b: int) -> tuple[int, int]:
            """Rows (or columns) of the convolution input that outputs [a, b) read."""
            return a * stride - before, (b - 1) * stride - before + kernel

        def source_span(a: int, b: int) -> tuple[int, int]:
            lo, hi = span(a, b)
            return (lo // 2, (hi - 1) // 2 + 1) if upsample else (lo, hi)

        if upsample:
            if norm is not None or shortcut is not None or any(e % 2 for e in rows + cols):
                raise RuntimeError("internal tiling error: unsupported upsampling stage")
            phase_weight = subpixel_weight(conv.weight).contiguous(memory_format=_memory_format(self.compute))
            phase_bias = conv.bias.repeat(4) if conv.bias is not None else None
        if residual is None:
            out = self.new_store(conv.out_channels, scale_out, x.dtype, rows, out_device)
        else:
            out = residual
        skip = self.new_store(shortcut.out_channels, scale_out, x.dtype, rows) if shortcut is not None else None
        stats = _GroupStats(stats_groups) if stats_groups else None
        in_place = residual is not None and residual.device == self.compute

        for index, (a, b) in enumerate(zip(rows[:-1], rows[1:])):
            for c, d in zip(cols[:-1], cols[1:]):
                (top, bottom), (left, right) = span(a, b), span(c, d)
                if upsample:
                    # The nearest-2x + 3x3 convolution as blocks.py's sub-pixel convolution: output pixels
                    # [a, b) read coarse pixels [a/2 - 1, b/2 + 1) (zeros outside the image, like the padding).
                    hidden = x.gather(a // 2 - 1, b // 2 + 1, c // 2 - 1, d // 2 + 1, self.compute)
                    result = _interleave_phases(F.conv2d(hidden, phase_weight, phase_bias), conv.out_channels)
                else:
                    # Extra padding (Downsample2D) is zeros past the image end, which gather() provides.
                    hidden = x.gather(top, bottom, left, right, self.compute, norm)
                    if shortcut is not None:  # 1x1 on the raw input: the same pixels as the output tile
                        skip.write(a, c, shortcut(x.view(a, b, c, d, self.compute)))
                    result = F.conv2d(hidden, conv.weight, conv.bias, stride=stride)
                del hidden
                if residual is None:
                    if stats is not None:
                        stats.add(result)
                    out.write(a, c, result)
                elif in_place:  # (residual + result) / factor, accumulated straight into the residual's bands
                    for piece, row in residual.pieces(a, b):
                        target = piece[:, :, :, c:d].add_(result[:, :, row - a : row - a + piece.shape[2]])
                        if output_scale_factor != 1.0:
                            target.div_(output_scale_factor)
                        if stats is not None:
                            stats.add(target)
                else:
                    result += residual.view(a, b, c, d, self.compute)
                    if output_scale_factor != 1.0:
                        result /= output_scale_factor
                    if stats is not None:
                        stats.add(result)
                    out.write(a, c, result)
                del result
            if consume and index + 2 < len(rows):
                x.release_rows_before(source_span(rows[index + 1], rows[index + 2])[0])
        if consume:
            x.release()
        return out, stats, skip

    # -- a diffusers ResnetBlock2D: two stages (norm1-act-conv1 [+ shortcut], norm2-act-conv2 + residual)
    def resnet(
        self, resnet: ResnetBlock2D, x: _Store, stats: _GroupStats, scale: int, next_groups: int | None
    ) -> tuple[_Store, _GroupStats | None]:
        if resnet.dropout.p and resnet.training:
            raise RuntimeError("Tiled encode/decode needs the VAE in eval mode when dropout is on: call vae.eval().")
        norm1 = _Norm.from_stats(resnet.norm1, stats, resnet.nonlinearity, x.dtype)
        h, h_stats, skip = self.conv_stage(
            x,
            resnet.conv1,
            scale,
            norm=norm1,
            shortcut=resnet.conv_shortcut,
            consume=resnet.conv_shortcut is not None,
            stats_groups=resnet.norm2.num_groups,
        )
        norm2 = _Norm.from_stats(resnet.norm2, h_stats, resnet.nonlinearity, h.dtype)
        out, out_stats, _ = self.conv_stage(
            h,
            resnet.conv2,
            scale,
            norm=norm2,
            residual=skip if skip is not None else x,
            output_scale_factor=resnet.output_scale_factor,
            consume=True,
            stats_groups=next_groups,
        )
        return out, out_stats

    def blocks(self, blocks: nn.ModuleList, x: _Store, stats: _GroupStats | None, scale: int, final_groups):
        """The down or up blocks; returns the last output, its statistics for `final_groups`, and its scale."""
        for block_index, block in enumerate(blocks):
            following = blocks[block_index + 1].resnets[0].norm1.num_groups if block_index + 1 < len(blocks) else None
            following = following or final_groups
            resamplers = (block.downsamplers if hasattr(block, "downsamplers") else block.upsamplers) or []
            for index, resnet in enumerate(block.resnets):
                if index + 1 < len(block.resnets):
                    next_groups = block.resnets[index + 1].norm1.num_groups
                else:
                    next_groups = None if resamplers else following
                x, stats = self.resnet(resnet, x, stats, scale, next_groups)
            for resampler in resamplers:
                if isinstance(resampler, Upsample2D):
                    x, stats, _ = self.conv_stage(
                        x, resampler.conv, scale, upsample=True, consume=True, stats_groups=following
                    )
                    scale //= 2
                else:
                    extra = 1 if resampler.padding == 0 else 0
                    x, stats, _ = self.conv_stage(
                        x, resampler.conv, scale, extra_pad=extra, consume=True, stats_groups=following
                    )
                    scale *= 2
        return x, stats, scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.vae.encoder
        first_groups = encoder.down_blocks[0].resnets[0].norm1.num_groups
        source = _Store.of(images, self.edges(1), self.compute)
        x, stats, _ = self.conv_stage(source, encoder.conv_in, 1, stats_groups=first_groups)
        x, _, scale = self.blocks(encoder.down_blocks, x, stats, 1, None)
        hidden = x.to_tensor(self.compute)
        x.release()
        # Latent resolution: small, and the attention is global, so the model's own modules run it whole.
        hidden = encoder.mid_block(hidden)
        hidden = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(hidden)))
        if self.vae.quant_conv is not None:
            hidden = self.vae.quant_conv(hidden)
        return hidden

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        decoder = self.vae.decoder
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        hidden = decoder.mid_block(decoder.conv_in(z), None)
        stats = _GroupStats(decoder.up_blocks[0].resnets[0].norm1.num_groups)
        stats.add(hidden)
        x = _Store.of(hidden, self.edges(self.factor), self.storage)
        del hidden
        x, stats, scale = self.blocks(decoder.up_blocks, x, stats, self.factor, decoder.conv_norm_out.num_groups)
        norm = _Norm.from_stats(decoder.conv_norm_out, stats, decoder.conv_act, x.dtype)
        out, _, _ = self.conv_stage(x, decoder.conv_out, scale, norm=norm, consume=True, out_device=self.compute)
        return out.to_tensor(self.compute)
