"""3x3 convolutions as Winograd F(2x2, 3x3): 16 multiplies per 2x2 output tile instead of 36, for wide layers on CPU.

A stride-1, zero-padded 3x3 convolution is computed on 4x4 input tiles (stride 2) as `A^T [(G g G^T) * (B^T d B)] A`
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): the transformed weights and inputs meet
in 16 independent matrix products `(tiles, C) @ (C, K)`, one per tile position, which run at the CPU's matmul rate
with 2.25x fewer FLOPs than the direct convolution. The transforms are additions only (B, A) or halves (G), so the
result is at least as close to float64 as a direct float32 convolution's (measured: 1.5e-6 vs oneDNN's 7e-6 on a
512-channel layer).

Why our own: oneDNN, as PyTorch ships it, runs direct convolutions only on x86; at 512 channels the transforms
(memory passes over 4x the input) cost less than the multiplies saved. At narrow layers they do not, hence
`winograd_applies`' channel threshold. The transformed weights are recomputed on every call (one small matmul over
the weights) instead of cached: a cache would hold 16/9 of the weights, more memory than the direct path's packed
copies, which these layers then do not need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The kernel transform G (4x3) of F(2x2, 3x3); B^T and A^T are written out as additions in the code below.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Narrower layers run faster as direct convolutions: the transforms' memory passes grow with C*H*W, the savings
# with C*K*H*W (measured on AMD EPYC Zen 4: at 512 channels 0.6-0.8x of oneDNN's time, at 128 channels 2-3x).
MIN_CHANNELS = 512


def winograd_applies(weight: torch.Tensor, x: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether `conv3x3_winograd` runs this convolution faster than the direct one: float32 on CPU, 3x3, stride 1,
    padding 1, no dilation or groups, at least `MIN_CHANNELS` input and output channels, channels_last input."""
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
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` (+ `accumulate`, written into it) by Winograd F(2x2, 3x3).

    Args:
        x (`torch.Tensor`): (N, C, H, W), channels_last.
        weight (`torch.Tensor`): (K, C, 3, 3).
        bias (`torch.Tensor`, *optional*): (K,).
        accumulate (`torch.Tensor`, *optional*): (N, K, H, W) channels_last; overwritten with the sum and returned.

    Returns a channels_last (N, K, H, W) tensor.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // 2), -(-w // 2)  # tiles per column and row; odd sides get one padded row or column
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))  # (N, H+2, W+2, C)

    # B^T d B, rows then columns: B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
    rows = [padded[:, r : r + 2 * th : 2] for r in range(4)]
    half = torch.empty((4, n, th, padded.shape[2], c), dtype=x.dtype)
    torch.sub(rows[0], rows[2], out=half[0])
    torch.add(rows[1], rows[2], out=half[1])
    torch.sub(rows[2], rows[1], out=half[2])
    torch.sub(rows[1], rows[3], out=half[3])
    del padded, rows
    transformed = torch.empty((16, n * th * tw, c), dtype=x.dtype)
    tiles = transformed.view(4, 4, n, th, tw, c)
    for a in range(4):
        cols = [half[a][:, :, s : s + 2 * tw : 2] for s in range(4)]
        torch.sub(cols[0], cols[2], out=tiles[a, 0])
        torch.add(cols[1], cols[2], out=tiles[a, 1])
        torch.sub(cols[2], cols[1], out=tiles[a, 2])
        torch.sub(cols[1], cols[3], out=tiles[a, 3])
    del half

    # The 16 products; (16, K, C) transposed is a column-major operand the matmul reads as it is.
    products = torch.bmm(transformed, winograd_weight(weight).transpose(1, 2))  # (16, tiles, K)
    del transformed

    # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], rows then columns, in place where the inputs are spent.
    m = products.view(4, 4, n, th, tw, k)
    odd = m[1] - m[2]
    even = m[1].add_(m[2]).add_(m[0])
    odd.sub_(m[3])
    exact = (2 * th, 2 * tw) == (h, w)
    if accumulate is not None and exact:
        target = accumulate.permute(0, 2, 3, 1)
    else:
        target = torch.empty((n, 2 * th, 2 * tw, k), dtype=x.dtype)
    phases = target.view(n, th, 2, tw, 2, k)
    adding = accumulate is not None and exact
    for p, r in enumerate((even, odd)):
        inner = r[1] - r[2]
        left, right = r[1].add_(r[2]).add_(r[0]), inner.sub_(r[3])
        for q, value in enumerate((left, right)):
            if bias is not None:
                value.add_(bias)
            if adding:
                phases[:, :, p, :, q].add_(value)
            else:
                phases[:, :, p, :, q].copy_(value)
    out = target[:, :h, :w].permute(0, 3, 1, 2)
    if accumulate is None:
        return out if exact else out.contiguous(memory_format=torch.channels_last)
    if not exact:
        accumulate.add_(out)
    return accumulate
