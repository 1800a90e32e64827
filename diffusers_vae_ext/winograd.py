"""3x3 convolutions as Winograd F(2x2, 3x3): 16 multiplies per 2x2 output tile instead of 36, for wide layers on CPU.

A stride-1, zero-padded 3x3 convolution is computed on 4x4 input tiles (stride 2) as `A^T [(G g G^T) * (B^T d B)] A`
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): the transformed weights and inputs meet
in 16 independent matrix products `(tiles, C) @ (C, K)`, one per tile position, which run at the CPU's matmul rate
with 2.25x fewer FLOPs than the direct convolution. The transforms are additions only (B, A) or halves (G), so the
result is at least as close to float64 as a direct float32 convolution's (measured: 1.5e-6 vs oneDNN's 7e-6 on a
512-channel layer).

Why our own: oneDNN, as PyTorch ships it, runs direct convolutions only on x86; from 256 channels and 32x32 on, the transforms
(memory passes over 4x the input, blocked so they stay in cache) cost less than the multiplies saved; below, they do
not, hence `winograd_applies`' thresholds. The transformed weights are recomputed on every call (one small matmul over
the weights) instead of cached: a cache would hold 16/9 of the weights, more memory than the direct path's packed
copies, which these layers then do not need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The kernel transform G (4x3) of F(2x2, 3x3); B^T and A^T are written out as additions in the code below.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Where it wins, from what the kernel does: the transforms of activations cost (C + K) H W memory traffic against the
# products' C K H W multiplies, so narrow layers lose (128 channels: 1.3-1.7x oneDNN's time); the weights' transform
# costs C K once per call, so small planes lose (512 channels at 16x16: 1.3x; at 32x32 0.83-0.99x). Measured on AMD
# EPYC Zen 4, 2 threads, against oneDNN on packed weights: 0.67-0.77x at 256-512 channels and 64x64-128x128,
# 0.82-0.92x at the 256/512-channel layers of 256x256 planes or mixed widths.
MIN_CHANNELS = 256
MIN_PIXELS = 32 * 32
# Tiles per block: 16 x 256 x 512 float32 inputs and products, 8 MiB each, stay in a server CPU's L2/L3 (a whole
# 128x128 layer in one pass ran at memory speed: 0.97x against 0.68x blocked).
BLOCK_TILES = 256


def winograd_applies(weight: torch.Tensor, x: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether `conv3x3_winograd` runs this convolution faster than the direct one: float32 on CPU, 3x3, stride 1,
    padding 1, no dilation or groups, at least `MIN_CHANNELS` input and output channels, a plane of at least
    `MIN_PIXELS`, channels_last input."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and tuple(weight.shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and x.dim() == 4
        and x.shape[2] * x.shape[3] >= MIN_PIXELS
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) kernel -> its 16 transformed (K, C) matrices `G g G^T`, shape (16, K, C), in float32."""
    out_channels, in_channels = weight.shape[:2]
    g = torch.tensor(_G, dtype=torch.float32, device=weight.device)
    kron = torch.kron(g, g)  # (16, 9): (G g G^T)[a, b] = sum_ij G[a, i] G[b, j] g[i, j]
    return (kron @ weight.reshape(-1, 9).t().float()).view(16, out_channels, in_channels)


def conv3x3_winograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
    block_tiles: int = BLOCK_TILES,
    overwrite_input: bool = False,
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` (+ `accumulate`, written into it) by Winograd F(2x2, 3x3).

    Args:
        x (`torch.Tensor`): (N, C, H, W), channels_last.
        weight (`torch.Tensor`): (K, C, 3, 3).
        bias (`torch.Tensor`, *optional*): (K,).
        accumulate (`torch.Tensor`, *optional*): (N, K, H, W) channels_last; overwritten with the sum and returned.
        block_tiles (`int`): tiles transformed, multiplied and transformed back together. The three stages of a
            block meet in the CPU's cache; one pass over a whole 128x128 layer would run at memory speed.
        overwrite_input (`bool`, defaults to `False`): `x` is not needed afterwards, so the output may take its
            buffer when the shapes allow (the tiles are read from a padded copy).

    Returns a channels_last (N, K, H, W) tensor.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // 2), -(-w // 2)  # tiles per column and row; odd sides get one padded row or column
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))  # (N, H+2, W+2, C)
    # (16, C, K) as the transpose of (16, K, C): a column-major operand the matmul reads as it is.
    transformed_weight = winograd_weight(weight).transpose(1, 2)
    exact = (2 * th, 2 * tw) == (h, w)
    adding = accumulate is not None and exact
    if adding:
        target = accumulate.permute(0, 2, 3, 1)
    elif overwrite_input and exact and k == c:
        target = x.permute(0, 2, 3, 1)
    else:
        target = torch.empty((n, 2 * th, 2 * tw, k), dtype=x.dtype)
    rows_per_block = max(1, min(th, block_tiles // tw))
    # One set of buffers for every block: a block's stages run in cache, and no block allocates.
    workspace = _Workspace(rows_per_block, tw, c, k, x.dtype)
    for image in range(n):
        for first in range(0, th, rows_per_block):
            rows = min(rows_per_block, th - first)
            _tile_rows(
                padded[image, 2 * first : 2 * (first + rows) + 2],
                transformed_weight,
                bias,
                target[image, 2 * first : 2 * (first + rows)],
                adding,
                workspace,
            )
    out = target[:, :h, :w].permute(0, 3, 1, 2)
    if accumulate is None:
        return out if exact else out.contiguous(memory_format=torch.channels_last)
    if not exact:
        accumulate.add_(out)
    return accumulate


class _Workspace:
    """The buffers of `_tile_rows` for blocks of up to `rows` x `cols` tiles."""

    def __init__(self, rows: int, cols: int, in_channels: int, out_channels: int, dtype: torch.dtype):
        self.half = torch.empty((4, rows, 2 * cols + 2, in_channels), dtype=dtype)
        self.transformed = torch.empty((16, rows * cols, in_channels), dtype=dtype)
        self.products = torch.empty((16, rows * cols, out_channels), dtype=dtype)
        self.spare = torch.empty((4, rows * cols, out_channels), dtype=dtype)


def _tile_rows(
    padded: torch.Tensor,
    transformed_weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    add: bool,
    workspace: _Workspace,
) -> None:
    """One block of tile rows: `padded` (2 R + 2, 2 T + 2, C) in, `target` (2 R, 2 T, K) written (or added to)."""
    th, tw = (padded.shape[0] - 2) // 2, (padded.shape[1] - 2) // 2
    c, k = padded.shape[2], transformed_weight.shape[2]
    tiles_count = th * tw
    # B^T d B, rows then columns: B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
    rows = [padded[r : r + 2 * th : 2] for r in range(4)]
    half = workspace.half[:, :th]
    torch.sub(rows[0], rows[2], out=half[0])
    torch.add(rows[1], rows[2], out=half[1])
    torch.sub(rows[2], rows[1], out=half[2])
    torch.sub(rows[1], rows[3], out=half[3])
    transformed = workspace.transformed[:, :tiles_count]
    tiles = transformed.view(4, 4, th, tw, c)
    for a in range(4):
        cols = [half[a][:, s : s + 2 * tw : 2] for s in range(4)]
        torch.sub(cols[0], cols[2], out=tiles[a, 0])
        torch.add(cols[1], cols[2], out=tiles[a, 1])
        torch.sub(cols[2], cols[1], out=tiles[a, 2])
        torch.sub(cols[1], cols[3], out=tiles[a, 3])

    products = workspace.products[:, :tiles_count]
    torch.bmm(transformed, transformed_weight, out=products)  # the 16 products
    m = products.view(4, 4, th, tw, k)

    # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], rows then columns, in place where the inputs are spent.
    odd = torch.sub(m[1], m[2], out=workspace.spare[:, :tiles_count].view(4, th, tw, k))
    even = m[1].add_(m[2]).add_(m[0])
    odd.sub_(m[3])
    inner = m[2, 0]  # spent: m[2] was added into `even` and subtracted into `odd`
    phases = target.view(th, 2, tw, 2, k)
    for p, r in enumerate((even, odd)):
        torch.sub(r[1], r[2], out=inner)
        for q, value in enumerate((r[1].add_(r[2]).add_(r[0]), inner.sub_(r[3]))):
            if bias is not None:
                value.add_(bias)
            if add:
                phases[:, p, :, q].add_(value)
            else:
                phases[:, p, :, q].copy_(value)
