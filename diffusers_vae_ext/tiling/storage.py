"""What a tiled run keeps between stages.

`_Store`: an activation as horizontal bands, each freed once consumed. `_GroupStats`: GroupNorm statistics
accumulated tile by tile. `_Norm`: a GroupNorm with those fixed whole-image statistics, plus the activation.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
