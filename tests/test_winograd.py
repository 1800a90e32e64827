"""Winograd F(2x2, 3x3) convolutions (`winograd.py`): the same result as a direct convolution (against float64), at
odd sizes, in batches and with the residual accumulated into a given tensor; used by the fast path exactly where
`winograd_applies` says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_vae_ext import blocks
from diffusers_vae_ext.winograd import MIN_CHANNELS, MIN_PIXELS, conv3x3_winograd, winograd_applies, winograd_weight


def layer(in_channels: int, out_channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / (9 * in_channels) ** 0.5
    return weight, torch.randn(out_channels, generator=generator)


def channels_last(*shape: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("block_tiles", [256, 3])  # 3: several blocks per image, the last one short
@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (2, 32, 7, 9), (1, 8, 1, 1), (3, 16, 2, 5)])
def test_winograd_equals_the_direct_convolution_at_any_size(shape, block_tiles):
    weight, bias = layer(shape[1], 24)
    x = channels_last(*shape)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = conv3x3_winograd(x, weight, bias, block_tiles=block_tiles)
    assert got.shape == reference.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=2e-6)
    torch.testing.assert_close(conv3x3_winograd(x, weight), F.conv2d(x, weight, padding=1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_the_residual_is_accumulated_into_the_given_tensor(size):
    weight, bias = layer(32, 16)
    x, residual = channels_last(2, 32, *size), channels_last(2, 16, *size, seed=2)
    expected = residual.double() + F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = conv3x3_winograd(x, weight, bias, accumulate=residual, block_tiles=5)
    assert got is residual
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_a_spent_input_receives_the_output_where_the_shapes_allow(size):
    # Even sides and as many output as input channels: written over `x` (read from a padded copy first);
    # odd sides (a padded output) or other widths: a new tensor, `x` untouched.
    for out_channels in (16, 8):
        weight, bias = layer(16, out_channels)
        x = channels_last(2, 16, *size)
        expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        original = x.clone()
        got = conv3x3_winograd(x, weight, bias, block_tiles=5, overwrite_input=True)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)
        assert got.is_contiguous(memory_format=torch.channels_last)
        reused = out_channels == 16 and size[0] % 2 == 0 and size[1] % 2 == 0
        assert (got.data_ptr() == x.data_ptr()) == reused
        assert reused or torch.equal(x, original)


def test_a_wide_layer_is_at_least_as_close_to_float64_as_the_direct_float32_convolution():
    # The transforms are additions and halves; the 16 products each sum C terms instead of 9 C.
    weight, bias = layer(512, 512)
    x = channels_last(1, 512, 16, 16)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    winograd_error = (conv3x3_winograd(x, weight, bias).double() - reference).abs().max().item()
    direct_error = (F.conv2d(x, weight, bias, padding=1).double() - reference).abs().max().item()
    assert winograd_error <= direct_error, (winograd_error, direct_error)
    assert winograd_error < 5e-6


def test_the_weight_transform_is_g_g_gt():
    weight, _ = layer(3, 2)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    expected = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g).reshape(16, 2, 3)
    torch.testing.assert_close(winograd_weight(weight).double(), expected, rtol=0, atol=1e-7)


def test_winograd_applies_to_wide_float32_3x3_stride_1_layers_only():
    wide = torch.empty(MIN_CHANNELS, MIN_CHANNELS, 3, 3)
    side = int(MIN_PIXELS**0.5)
    x = channels_last(1, MIN_CHANNELS, side, side)
    same = ((1, 1), (1, 1), (1, 1), 1)
    assert winograd_applies(wide, x, *same)
    assert not winograd_applies(wide, x[:, :, : side // 2], *same)  # a small plane
    assert not winograd_applies(wide, x, (2, 2), (1, 1), (1, 1), 1)  # stride 2
    assert not winograd_applies(wide, x, (1, 1), (0, 0), (1, 1), 1)  # no padding
    assert not winograd_applies(wide[:, :, :1, :1], x, *same)  # 1x1
    assert not winograd_applies(wide[: MIN_CHANNELS // 2], x, *same)  # narrow output
    assert not winograd_applies(wide.bfloat16(), x.bfloat16(), *same)  # half precision: direct (oneDNN bf16)
    assert not winograd_applies(wide, x.contiguous(), *same)  # NCHW


@pytest.mark.skipif(not blocks._onednn_dtypes(), reason="the fast path's oneDNN convolutions are not available")
def test_the_fast_path_runs_wide_layers_through_winograd(monkeypatch):
    calls = []
    monkeypatch.setattr(blocks, "conv3x3_winograd", lambda *a, **k: calls.append(a) or conv3x3_winograd(*a, **k))
    with torch.no_grad():
        for channels, calls_so_far in ((MIN_CHANNELS, 1), (MIN_CHANNELS // 2, 1)):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
            side = int(MIN_PIXELS**0.5)
            x = channels_last(1, channels, side, side)
            torch.testing.assert_close(blocks.conv2d(conv, x), conv(x), rtol=0, atol=2e-5)
            assert len(calls) == calls_so_far
