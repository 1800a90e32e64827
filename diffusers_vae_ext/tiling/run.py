"""One tiled encode or decode (`_TiledRun`): the tile layout, and the network run layer by layer over all tiles."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from ..blocks import subpixel_weight
from .storage import _GroupStats, _memory_format, _Norm, _Store


def _storage_device(vae: nn.Module, compute: torch.device) -> torch.device:
    offload = getattr(vae, "tile_offload_to_cpu", None)
    if offload is None:
        offload = compute.type != "cpu"
    return torch.device("cpu") if offload else compute


# ------------------------------------------------------------------------------------------------ layout
# Work tiles hold about tile_sample_size^2 pixels, shaped as strips up to this many tiles wide: the thinner the
# strips, the sooner a consumed input band is released (see the peak memory model in `tiling/__init__.py`).
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
