"""Inference execution of diffusers' VAE blocks: the same modules and weights, run with fewer copies and MACs.

diffusers' `Encoder`/`Decoder` (and their `ResnetBlock2D`, `Attention`, `Upsample2D`, ... children) stay the
parameter holders, so state dicts and saved folders are unchanged; `run_encoder`/`run_decoder` only execute them
differently:

- activations are channels_last (NHWC) on CPU, and for half precision on CUDA (`hardware.working_memory_format`):
  oneDNN's (and cuDNN's tensor-core) convolutions are faster on it, and the mid-block attention reads and writes
  its token matrix with no transposes;
- nearest 2x upsampling followed by the 3x3 convolution is computed as one 2x2 "sub-pixel" convolution on the
  small input (16/36 of the multiply-adds), whose four phases are interleaved into the output;
- on CPU, convolutions run through oneDNN with their weights packed once into its blocked layout (`conv2d`;
  PyTorch's `conv2d` re-packs them on every call, which costs up to a third of a 512-channel 3x3 convolution at
  32x32), and each ResNet block's residual add is fused into its second convolution, written into the shortcut;
  the packed copies (as large as the weights) are rebuilt when the weights change;
- float32 3x3 convolutions of at least 256 channels on planes of at least 32x32 run as Winograd F(2x2, 3x3)
  (`winograd.py`): 16 instead of 36 multiplies per 2x2 output tile, as matrix products, and closer to float64 than
  the direct convolution;
- SiLU runs in place, and divisions by an output scale factor of 1 are skipped;
- in float32 on CPU, every GroupNorm takes two-pass statistics (`group_norm_channels_last`): PyTorch's channels_last
  kernel sums x and x^2 in one float32 pass, whose error grows with the plane and the activations' mean (2e-4 at
  256 px on one Xeon), which would take the output more than 1e-4 away from diffusers' (default-layout) result.

A bfloat16 (or float16) model given input in its dtype runs the same path in that dtype, with oneDNN's native
bf16 kernels where the CPU has them (AMX-BF16, AVX512-BF16; see `hardware.py`). What keeps quality stays float32:
GroupNorm statistics (PyTorch's CPU and CUDA kernels accumulate half inputs in float32), the attention logits and
softmax (SDPA's kernels accumulate in float32, so logits are never rounded to bf16), and the encoder's last
convolution (`run_encoder(..., float32_output=True)`), whose float32 moments `posterior.LatentPosterior` turns into
mean, log-variance, std and draws.

The fast path runs only when autograd does not record (inference, or frozen weights); training keeps diffusers'
own forward, so gradients and gradient checkpointing are exactly diffusers'. Anything it does not recognise runs
through the module's own forward: hooked modules (sequential CPU offload, `register_forward_hook`), custom
attention processors (`set_attn_processor`, fused QKV), other block types, spatial norms, and so on.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D

from .hardware import working_memory_format
from .winograd import conv3x3_winograd, winograd_applies

# Which 3x3 kernel rows feed each of the two taps of a sub-pixel phase. Output row 2i reads upsampled rows
# 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps: kernel row 0 | rows 1+2); output row 2i+1 reads input rows i, i, i+1
# (taps: rows 0+1 | row 2). The same holds for columns.
_SUBPIXEL_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def run_encoder(encoder: nn.Module, sample: torch.Tensor, float32_output: bool = False) -> torch.Tensor:
    """`encoder(sample)` for diffusers' `Encoder`, through the fast path when it applies; returns a contiguous tensor.

    Args:
        encoder (`nn.Module`): the encoder; anything but diffusers' `Encoder` runs its own forward.
        sample (`torch.Tensor`): images (N, C, H, W) in the encoder's dtype.
        float32_output (`bool`, defaults to `False`): on the fast path, run the last convolution in float32 and
            return float32 moments, so a half-precision encoder's moments are rounded once, by the caller, instead
            of inside the convolution (it runs at the latent resolution, so this costs next to nothing).
    """
    if type(encoder) is not Encoder or not fast_path_applies(encoder, sample):
        return encoder(sample)
    hidden = conv2d(encoder.conv_in, _to_working_format(sample))
    for block in encoder.down_blocks:
        hidden = _down_block(block, hidden)
    hidden = _mid_block(encoder.mid_block, hidden)
    hidden = _norm_act(encoder.conv_norm_out, encoder.conv_act, hidden, overwrite=True)
    if float32_output and type(encoder.conv_out) is nn.Conv2d:
        return conv_float32(encoder.conv_out, hidden).contiguous()
    return conv2d(encoder.conv_out, hidden).contiguous()


def conv_float32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` computed in float32 whatever the dtypes of `x` and the weights (and outside any autocast)."""
    if (
        x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return conv(x)
    with torch.autocast(x.device.type, enabled=False):
        bias = conv.bias.float() if conv.bias is not None else None
        return conv._conv_forward(x.float(), conv.weight.float(), bias)


def run_decoder(decoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`decoder(latents)` for diffusers' `Decoder`, through the fast path when it applies; returns a contiguous tensor."""
    # A spatial-norm (MoVQ) decoder needs latent embeddings at every norm: leave it to diffusers.
    spatial = not isinstance(getattr(decoder, "conv_norm_out", None), nn.GroupNorm)
    if type(decoder) is not Decoder or spatial or not fast_path_applies(decoder, latents):
        return decoder(latents)
    hidden = conv2d(decoder.conv_in, _to_working_format(latents))
    hidden = _mid_block(decoder.mid_block, hidden)
    for block in decoder.up_blocks:
        hidden = _up_block(block, hidden)
    hidden = _norm_act(decoder.conv_norm_out, decoder.conv_act, hidden, overwrite=True)
    return conv2d(decoder.conv_out, hidden).contiguous()


# --------------------------------------------------------------------------------------------------- gating
def fast_path_applies(root: nn.Module, x: torch.Tensor) -> bool:
    """Whether `run_encoder`/`run_decoder` may run `root` on `x` themselves (no autograd recording, no hooks)."""
    # In-place ops and weight folding are only safe when autograd records nothing.
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in root.parameters())):
        return False
    # Hooks and patched forwards (accelerate's per-module offload, feature taps) expect module calls we would skip.
    return x.ndim == 4 and not any(_is_hooked(module) for module in root.modules())


def _is_hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hasattr(module, "_hf_hook")
        or "forward" in module.__dict__
        or any(p.device.type == "meta" for p in module.parameters(recurse=False))
    )


def _to_working_format(x: torch.Tensor) -> torch.Tensor:
    # channels_last on CPU (oneDNN) and for half precision on CUDA (cuDNN's tensor cores); see hardware.py.
    memory_format = working_memory_format(x.device, x.dtype)
    return x.contiguous(memory_format=memory_format) if memory_format == torch.channels_last else x


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    is_nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if is_nhwc else torch.contiguous_format


# --------------------------------------------------------------------------------------------------- blocks
def _norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    # `overwrite`: `x` is not needed afterwards, so the result may take its buffer (one activation less in memory,
    # and no fresh pages for the kernel to fault in and zero).
    silu = type(act) is nn.SiLU
    if _exact_group_norm_applies(norm, x):
        hidden = group_norm_channels_last(norm, x, silu=silu, out=x if overwrite else None)
        return hidden if silu else act(hidden)
    # The norm's output is a fresh tensor, so the activation may overwrite it.
    hidden = norm(x)
    return F.silu(hidden, inplace=True) if silu else act(hidden)


# PyTorch's CPU GroupNorm kernel for channels_last input takes its statistics in one pass: it sums x and x^2 per
# channel in float32, sequentially along the pixels each thread owns (every plane size: by (n, group) below 1024
# pixels, by pixel rows above), then takes E[x^2] - E[x]^2. Its error grows with the pixels summed per thread and
# with mean^2 / variance (~2e-4 at 128x128 for a mean of 6 standard deviations, 1e-3 at 512x512), so no plane size
# is safe on every CPU and thread count. The NCHW kernel (Welford moments per group, cascaded) is accurate, and is
# what diffusers' default layout runs. In float32 on CPU every GroupNorm of the path therefore takes two-pass
# statistics here (`group_norm_channels_last`); half precision keeps the kernel (it accumulates in float32, and
# its error is far below bf16's own rounding).
# Rows of the activation handled at a time by `group_norm_channels_last`: about this many bytes, so each band (and
# its centred copy) stays in cache between its uses.
_GROUP_NORM_CHUNK_BYTES = 1 << 21


def _exact_group_norm_applies(norm: nn.Module, x: torch.Tensor) -> bool:
    return (
        type(norm) is nn.GroupNorm
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return group_norm_channels_last(norm, x) if _exact_group_norm_applies(norm, x) else norm(x)


def group_norm_channels_last(
    norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`norm(x)` (then SiLU with `silu=True`) for a channels_last `x`, with two-pass (centred) statistics.

    The statistics are taken a band of pixel rows at a time, while the band is in cache: each channel's band mean
    (PyTorch's cascaded sum, accurate to a few float32 roundings), then the sum of squares about it. Bands and the
    channels of a group are combined in float64 (Chan's formula), so nothing cancels. The normalisation (and SiLU)
    then runs band by band too, so SiLU reads its input from cache instead of memory. Same memory traffic as the
    channels_last kernel followed by SiLU (two reads of `x`, one write), with the accuracy of the NCHW kernel.

    Args:
        norm (`nn.GroupNorm`): the module (its groups, eps and affine parameters are used).
        x (`torch.Tensor`): (N, C, H, W), channels_last.
        silu (`bool`, defaults to `False`): apply SiLU to the result.
        out (`torch.Tensor`, *optional*): where to write the result, `x` itself included (each band is read before
            it is written); a new channels_last tensor by default.
    """
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    per_group = channels // groups
    rows = max(1, _GROUP_NORM_CHUNK_BYTES // (batch * channels * width * x.element_size()))
    starts = range(0, height, rows)
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of the channels_last memory, channels innermost
    centred = torch.empty(batch * min(rows, height) * width * channels, dtype=x.dtype, device=x.device)
    band_means = torch.empty((len(starts), batch, channels), dtype=x.dtype, device=x.device)
    band_squares = torch.empty_like(band_means)
    counts = []
    for index, start in enumerate(starts):
        band = pixels[:, start : start + rows]
        count = band.shape[1] * width
        counts.append(count)
        torch.sum(band, dim=(1, 2), out=band_means[index]).div_(count)
        work = centred[: band.numel()].view(band.shape)
        torch.sub(band, band_means[index].view(batch, 1, 1, channels), out=work)
        torch.sum(work.square_(), dim=(1, 2), out=band_squares[index])
    # Per band, sample and channel: count, mean, sum of squared deviations -> per sample and group, in float64.
    counts = torch.tensor(counts, dtype=torch.float64, device=x.device).view(-1, 1, 1, 1)
    means = band_means.double().view(len(starts), batch, groups, per_group)
    squares = band_squares.double().view(len(starts), batch, groups, per_group)
    total = counts.sum() * per_group
    mean = (means * counts).sum((0, 3)) / total  # (N, G)
    variance = (squares.sum((0, 3)) + (counts * (means - mean.view(1, batch, groups, 1)) ** 2).sum((0, 3))) / total
    rstd = torch.rsqrt(variance + norm.eps)
    scale = rstd.view(batch, groups, 1).expand(batch, groups, per_group)
    shift = -(mean * rstd).view(batch, groups, 1).expand(batch, groups, per_group)
    if norm.affine:
        weight = norm.weight.double().view(1, groups, per_group)
        shift = shift * weight + norm.bias.double().view(1, groups, per_group)
        scale = scale * weight
    scale = scale.reshape(batch, channels, 1, 1).to(x.dtype)
    shift = shift.reshape(batch, channels, 1, 1).to(x.dtype)
    out = torch.empty_like(x) if out is None else out
    for start in starts:
        piece = out[:, :, start : start + rows]
        torch.addcmul(shift, x[:, :, start : start + rows], scale, out=piece)
        if silu:
            F.silu(piece, inplace=True)
    return out


def _down_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if type(block) is not DownEncoderBlock2D:
        return block(hidden)
    for resnet in block.resnets:
        hidden = _resnet(resnet, hidden)
    for downsampler in block.downsamplers or ():
        hidden = _downsample(downsampler, hidden)
    return hidden


def _up_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if type(block) is not UpDecoderBlock2D:
        return block(hidden)
    for resnet in block.resnets:
        hidden = _resnet(resnet, hidden)
    for upsampler in block.upsamplers or ():
        hidden = _upsample(upsampler, hidden)
    return hidden


def _mid_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if type(block) is not UNetMidBlock2D:
        return block(hidden)
    hidden = _resnet(block.resnets[0], hidden)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        if attn is not None:
            hidden = _attention(attn, hidden)
        hidden = _resnet(resnet, hidden)
    return hidden


def _resnet(resnet: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # `x` is an activation of this path, not needed after the block: its buffer may receive the output.
    plain = (
        type(resnet) is ResnetBlock2D
        and resnet.time_emb_proj is None
        and resnet.upsample is None
        and resnet.downsample is None
        # Without a time embedding, "default" and the decoder's "group" both mean: norm2, then the activation.
        and resnet.time_embedding_norm in ("default", "group")
    )
    if not plain:
        return resnet(x, None)
    # With a shortcut convolution, `x` is spent once it has run, so the first norm may overwrite it.
    shortcut = conv2d(resnet.conv_shortcut, x) if resnet.conv_shortcut is not None else x
    normed = _norm_act(resnet.norm1, resnet.nonlinearity, x, overwrite=shortcut is not x)
    hidden = conv2d(resnet.conv1, normed, overwrite_input=True)  # `normed` is spent once conv1 has read it
    del normed  # freed here, not at the block's end
    hidden = _norm_act(resnet.norm2, resnet.nonlinearity, hidden, overwrite=True)
    if resnet.dropout.p > 0 and resnet.dropout.training:
        hidden = resnet.dropout(hidden)
    # conv2 adds its output into the shortcut's buffer (fused into the convolution on CPU): no new tensor.
    hidden = conv2d(resnet.conv2, hidden, accumulate=shortcut)
    if resnet.output_scale_factor != 1:
        hidden /= resnet.output_scale_factor
    return hidden


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Only the default SDPA processor is reproduced; any other processor (custom, fused QKV, ...) runs itself.
    plain = (
        type(attn) is Attention
        and type(attn.processor) is AttnProcessor2_0
        and attn.spatial_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.is_cross_attention
    )
    if not plain:
        return attn(x)
    batch, channels, height, width = x.shape
    hidden = _group_norm(attn.group_norm, x) if attn.group_norm is not None else x
    # For channels_last activations this (N, H*W, C) token matrix is a view, not a copy.
    tokens = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    # AttnProcessor2_0 uses SDPA's default scale (1 / sqrt(head_dim)) too.
    hidden = F.scaled_dot_product_attention(query, key, value)
    hidden = hidden.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    out = hidden.view(batch, height, width, -1).permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))
    if attn.residual_connection:
        out += x
    if attn.rescale_output_factor != 1:
        out /= attn.rescale_output_factor
    return out


def _upsample(upsampler: nn.Module, x: torch.Tensor) -> torch.Tensor:
    conv = getattr(upsampler, "conv" if getattr(upsampler, "name", None) == "conv" else "Conv2d_0", None)
    plain = (
        type(upsampler) is Upsample2D
        and upsampler.use_conv
        and not upsampler.use_conv_transpose
        and upsampler.interpolate
        and upsampler.norm is None
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
    if not plain:
        return upsampler(x)
    return upsample_nearest2x_conv3x3(x, conv.weight, conv.bias, cache_owner=conv)


def _downsample(downsampler: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # As diffusers' Downsample2D: with padding=0, one row and column of zeros at the bottom/right, then the strided
    # convolution (here through `conv2d`).
    conv = getattr(downsampler, "conv", None)
    plain = type(downsampler) is Downsample2D and downsampler.use_conv and downsampler.norm is None
    if not plain or type(conv) is not nn.Conv2d:
        return downsampler(x)
    return conv2d(conv, F.pad(x, (0, 1, 0, 1), mode="constant", value=0) if downsampler.padding == 0 else x)


# --------------------------------------------------------------------------------------------------- convolutions
# Per convolution module: {use: (key, weight, bias)}, the weights in the form the path runs (packed for oneDNN,
# or folded into sub-pixel phases). Weak keys: a module's entries go with it; `copy.deepcopy` copies no cache.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


@functools.cache
def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return ()
    bf16 = (torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()
    return (torch.float32, *bf16)


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _onednn_dtypes()
        and torch.backends.mkldnn.enabled
        # Autocast casts F.conv2d's inputs itself; the oneDNN op would run them in their own dtype.
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last)
        # Packed weights are kept per weights version; inference tensors have none (see `_prepared`).
        and not weight.is_inference()
    )


def _prepared(
    owner: nn.Module,
    use: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prepare: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`prepare(weight, bias)`, kept for `owner` and rebuilt when a tensor is replaced, moved, cast or updated in
    place (an optimizer step or `load_state_dict` bumps its `_version`)."""
    tensors = (weight, bias)
    if any(t is not None and t.is_inference() for t in tensors):
        # Inference tensors (weights created under `torch.inference_mode()`) keep no version counter, so an
        # in-place update could not be seen: prepare on every call (what F.conv2d does anyway).
        return prepare(weight, bias)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
    entries = _PREPARED.setdefault(owner, {})
    entry = entries.get(use)
    # The weak references rule out a new tensor that reuses a freed one's address and version.
    if entry is None or entry[1] != key or any(ref() is not t for ref, t in zip(entry[0], tensors)):
        refs = tuple(weakref.ref(t) if t is not None else _none_ref for t in tensors)
        entry = entries[use] = (refs, key, *prepare(weight, bias))
    return entry[2], entry[3]


def _none_ref() -> None:
    return None


def _onednn_pack(weight: torch.Tensor, conv_args: tuple) -> torch.Tensor:
    padding, stride, dilation, groups = conv_args
    # An empty input size: the layout oneDNN picks for any input (measured as fast as a per-size one).
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, stride, dilation, groups, [])


def conv2d(
    conv: nn.Module, x: torch.Tensor, accumulate: torch.Tensor | None = None, overwrite_input: bool = False
) -> torch.Tensor:
    """`conv(x)`, or `accumulate += conv(x)` (returned) with `accumulate` given, on the fastest kernel at hand.

    On CPU (float32, and bfloat16 where oneDNN has it) a plain `nn.Conv2d` runs oneDNN's convolution on weights
    packed once, with the accumulation fused into it; elsewhere `conv(x)` then an in-place add.

    Args:
        conv (`nn.Module`): the convolution; anything but a zero-padded `nn.Conv2d` is called as it is.
        x (`torch.Tensor`): the input (N, C, H, W), channels_last for the oneDNN kernel.
        accumulate (`torch.Tensor`, *optional*): a tensor of the output's shape and dtype that this path owns; it
            is overwritten with the sum.
        overwrite_input (`bool`, defaults to `False`): `x` is not needed afterwards; the Winograd kernel then writes
            its output into `x`'s buffer where the shapes match (one activation fewer to allocate).
    """
    plain = (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and _uses_onednn(x, conv.weight)
        and (
            accumulate is None
            or (accumulate.dtype == x.dtype and accumulate.is_contiguous(memory_format=torch.channels_last))
        )
    )
    if not plain:
        out = conv(x)
        if accumulate is None:
            return out
        return accumulate.add_(out)
    conv_args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if winograd_applies(conv.weight, x, *conv_args):
        # Wide float32 3x3 layers: 2.25x fewer multiplies (`winograd.py`); no packed copy is kept for them.
        return conv3x3_winograd(x, conv.weight, conv.bias, accumulate, overwrite_input=overwrite_input)
    weight, bias = _prepared(conv, "onednn", conv.weight, conv.bias, lambda w, b: (_onednn_pack(w, conv_args), b))
    if accumulate is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *conv_args, "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        accumulate, x, weight, bias, *conv_args, "add", None, None, [], None
    )


# --------------------------------------------------------------------------------------------------- sub-pixel
def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """Fold a (O, I, 3, 3) kernel into the (4 * O, I, 2, 2) kernel of `upsample_nearest2x_conv3x3`'s phases.

    Output channel block `2 * a + b` holds phase (a, b): the output pixels (2i + a, 2j + b). The result is laid
    out channels_last, which oneDNN's NHWC convolution takes as is. Folded in float32 so half-precision weights are
    rounded once, after the sums (float64 weights are folded in float64).
    """
    out_channels, in_channels = weight.shape[:2]
    # float64 weights stay float64 (folding them in float32 would round them).
    fold_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    fold = torch.tensor(_SUBPIXEL_FOLD, dtype=fold_dtype, device=weight.device)
    # (16, 9): row (a, b, p, q) of the 2x2 phase kernels, column (k, l) of the 3x3 kernel.
    fold_matrix = torch.einsum("apk,bql->abpqkl", fold, fold).reshape(16, 9)
    folded = fold_matrix @ weight.to(fold_dtype).reshape(out_channels, in_channels, 9).transpose(1, 2)  # (O, abpq, I)
    folded = folded.view(out_channels, 2, 2, 2, 2, in_channels).permute(1, 2, 0, 3, 4, 5)
    return folded.reshape(4 * out_channels, 2, 2, in_channels).permute(0, 3, 1, 2).to(weight.dtype)


def upsample_nearest2x_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache_owner: nn.Module | None = None
) -> torch.Tensor:
    """`conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` with 16/36 of the MACs.

    Every output pixel (2i + a, 2j + b) of the upsampled convolution sees only a 2x2 neighbourhood of `x`, with
    kernel rows/columns summed per phase. One 2x2 convolution with the four phase kernels stacked as output
    channels, over `x` padded by 1, gives (H + 1) x (W + 1) positions; phase (a, b) is its [a : a + H, b : b + W]
    window, copied into the interleaved output (a cheap pass next to the saved convolution work).

    Args:
        x (`torch.Tensor`): the input (N, C, H, W).
        weight (`torch.Tensor`), bias (`torch.Tensor`, *optional*): the 3x3 convolution's parameters.
        cache_owner (`nn.Module`, *optional*): the module holding `weight`; given, the folded (and on CPU packed)
            phase kernels are kept for it and rebuilt only when the weights change.
    """
    batch, _, height, width = x.shape
    out_channels = weight.shape[0]
    conv_args = ([1, 1], [1, 1], [1, 1], 1)
    onednn = _uses_onednn(x, weight)

    def fold(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        folded = subpixel_weight(w)
        folded = _onednn_pack(folded, conv_args) if onednn else folded.contiguous(memory_format=_memory_format(x))
        return folded, b.repeat(4) if b is not None else None

    if cache_owner is None:
        phase_weight, phase_bias = fold(weight, bias)
    else:
        phase_weight, phase_bias = _prepared(
            cache_owner, "subpixel_onednn" if onednn else "subpixel", weight, bias, fold
        )
    if onednn:
        phases = torch.ops.mkldnn._convolution_pointwise(x, phase_weight, phase_bias, *conv_args, "none", [], "")
    else:
        phases = F.conv2d(x, phase_weight, phase_bias, padding=1)
    out = torch.empty(
        (batch, out_channels, 2 * height, 2 * width),
        dtype=phases.dtype,
        device=phases.device,
        memory_format=_memory_format(x),
    )
    grid = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # (N, O, H, a, W, b), a view of `out`
    for a in range(2):
        for b in range(2):
            block = phases[:, (2 * a + b) * out_channels : (2 * a + b + 1) * out_channels]
            grid[:, :, :, a, :, b].copy_(block[:, :, a : a + height, b : b + width])
    return out
