"""Half-precision safety: does a VAE overflow in float16 / bfloat16, where, and how close is its output?

`check_half_precision` runs the VAE once in float32 and once per half dtype on the same images, with a forward
hook on every submodule (`ActivationMonitor`), and reports per block (e.g. `decoder.up_blocks.2`):

- the largest |activation| seen in float32, against the dtype's largest finite value (65504 for float16);
- whether the half-precision run produced inf or NaN there, and which block did so first;
- the PSNR of the half-precision output against the float32 output, for decoding the float32 latents and for
  the whole encode + decode round trip.

The verdict says it plainly: `"safe"`, `"overflows in float16 at decoder.up_blocks.2"`, or
`"imprecise in bfloat16: 27.3 dB vs float32"`. GroupNorm after a layer hides that layer's scale in float32, which
is why an overflowing VAE can look perfect there (the SDXL VAE; sdxl-vae-fp16-fix exists for it).

On CPU, float16 convolutions are only fast in channels_last layout (NCHW float16 runs a reference kernel about
30x slower), so the half-precision copy is run channels_last there; CUDA keeps the model's layout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..metrics import psnr

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Below this PSNR against float32 a finite half-precision output is called imprecise rather than safe.
MIN_SAFE_PSNR = 30.0


def block_name(module_name: str) -> str:
    """The block a submodule belongs to: the name up to its first list index (when that is among the first three
    parts), else its first two parts. `decoder.up_blocks.2.resnets.0.conv1` -> `decoder.up_blocks.2`,
    `decoder.mid_block.attentions.0` -> `decoder.mid_block`, `post_quant_conv` -> `post_quant_conv`."""
    parts = module_name.split(".")
    for index, part in enumerate(parts[:3]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2])


def _tensors(output: Any) -> Iterable[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):  # diffusers' output classes
        yield output.sample


class ActivationMonitor:
    """Forward hooks on every submodule of `model` recording, per block, the largest finite |activation| and
    whether any output was inf/NaN (and which module was first to produce one, in execution order).

    Use as a context manager; the hooks are removed on exit. With `keep_outputs=True` the (differentiable)
    outputs are also kept, for a training penalty on large activations (`diffusers_vae_ext.fp16_safe`).

    Args:
        model: the module to watch (e.g. `adapter.vae`).
        keep_outputs: also keep every hooked output tensor in `outputs` (cleared with `reset()`), only while
            autograd records (training steps, not validation).
        module_types: only hook modules of these types (default: all submodules that are not plain containers).
        group: maps a module name to the name its numbers are recorded under (default `block_name`; the identity
            records per module).
        record_stats: record `max_abs`/`nonfinite` (a pass over each output; off for a training penalty).
    """

    def __init__(
        self,
        model: nn.Module,
        keep_outputs: bool = False,
        module_types: tuple[type, ...] | None = None,
        group=block_name,
        record_stats: bool = True,
    ):
        self.model = model
        self.keep_outputs = keep_outputs
        self.module_types = module_types
        self.group = group
        self.record_stats = record_stats
        self._handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.max_abs: dict[str, float] = {}
        self.nonfinite: dict[str, bool] = {}
        self.first_nonfinite: str | None = None
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __enter__(self) -> ActivationMonitor:
        for name, module in self.model.named_modules():
            if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                continue
            if "." not in name and any(True for _ in module.children()):
                continue  # `encoder`/`decoder` themselves: their output is their last layer's
            if self.module_types is not None and not isinstance(module, self.module_types):
                continue
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        block = self.group(name)

        def hook(module, inputs, output):
            for tensor in _tensors(output):
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                if self.keep_outputs and torch.is_grad_enabled():
                    self.outputs.append((block, tensor))
                if not self.record_stats:
                    continue
                detached = tensor.detach()
                finite = torch.isfinite(detached)
                all_finite = bool(finite.all())
                largest = float(torch.where(finite, detached.abs(), 0).amax()) if not all_finite else None
                if largest is None:
                    largest = float(detached.abs().amax())
                self.max_abs[block] = max(self.max_abs.get(block, 0.0), largest)
                self.nonfinite[block] = self.nonfinite.get(block, False) or not all_finite
                if not all_finite and self.first_nonfinite is None:
                    self.first_nonfinite = block

        return hook


@dataclass
class BlockActivation:
    """One block: its largest |activation| in float32 and in the half run, and whether the half run overflowed."""

    block: str
    max_abs_float32: float
    max_abs_half: float
    fraction_of_range: float  # max_abs_float32 / the dtype's largest finite value
    nonfinite: bool


@dataclass
class HalfPrecisionReport:
    """The result of `check_half_precision` for one dtype; `verdict` is the plain-words summary."""

    dtype: str
    dtype_max: float
    verdict: str
    safe: bool
    overflow_block: str | None
    decode_psnr: float
    roundtrip_psnr: float
    num_images: int
    blocks: list[BlockActivation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _half_copy(vae: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    # nn.Module.to, not ModelMixin.to: diffusers warns about casting with to(), which is what we mean to do here.
    half = nn.Module.to(copy.deepcopy(vae), device=device, dtype=dtype).eval()
    if device.type == "cpu":
        # Per tensor, not `Module.to(memory_format=...)`: video classes mix 4-D and 5-D (Conv3d) weights.
        with torch.no_grad():
            for param in half.parameters():
                if param.ndim in _CHANNELS_LAST:
                    param.data = param.data.contiguous(memory_format=_CHANNELS_LAST[param.ndim])
    return half


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _in_layout(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(device=device, dtype=dtype)
    if device.type == "cpu" and x.ndim in _CHANNELS_LAST:
        x = x.contiguous(memory_format=_CHANNELS_LAST[x.ndim])
    return x


def _latents_of(adapter, moments: torch.Tensor) -> torch.Tensor:
    # The posterior mode (mean) for KL classes; deterministic classes return their latents directly.
    return moments.chunk(2, dim=1)[0] if adapter.has_posterior else moments


def _psnr_or_nan(reference: torch.Tensor, output: torch.Tensor | None) -> float:
    if output is None or not torch.isfinite(output).all():
        return float("nan")
    if reference.ndim == 5:  # video: frames as images
        reference, output = (t.transpose(1, 2).flatten(0, 1) for t in (reference, output))
    return float(psnr(reference.float().cpu(), output.float().cpu().clamp(-1, 1)).mean())


@torch.no_grad()
def check_half_precision(
    adapter: Any, pixels: torch.Tensor, dtypes: Iterable[str] = ("float16", "bfloat16"), wrap=None
) -> list[HalfPrecisionReport]:
    """Run `adapter` (an autoencoder adapter: `vae`, `encode_moments`, `decode`, `has_posterior`) in float32 and in
    each of `dtypes` on `pixels` (in [-1, 1], on any device; the VAE's device is used) and report per dtype.

    Args:
        adapter: the VAE to check, wrapped (`diffusers_vae_ext.autoencoders.as_autoencoder`).
        pixels: a few real images, (N, C, H, W) or (N, C, T, H, W) for video classes.
        dtypes: any of "float16", "bfloat16".
        wrap: a function wrapping a model in an adapter of the same kind (default: `type(adapter)`'s way, via the
            package's `as_autoencoder`); used for the half-precision copies.
    """
    from ..autoencoders import as_autoencoder

    wrap = wrap or as_autoencoder
    vae = adapter.vae
    device = next(vae.parameters()).device
    float_dtype = next(vae.parameters()).dtype
    if float_dtype != torch.float32:
        raise ValueError(f"check_half_precision needs the VAE in float32 (the reference), got {float_dtype}.")
    pixels32 = pixels.to(device=device, dtype=torch.float32)
    with ActivationMonitor(vae) as monitor32:
        moments32 = adapter.encode_moments(pixels32)
        latents32 = _latents_of(adapter, moments32)
        output32 = adapter.decode(latents32)
    reports = []
    for name in dtypes:
        if name not in HALF_DTYPES:
            raise ValueError(f"Unknown half dtype {name!r}; choose from {', '.join(HALF_DTYPES)}.")
        dtype = HALF_DTYPES[name]
        dtype_max = float(torch.finfo(dtype).max)
        half = wrap(_half_copy(vae, dtype, device))
        # Three runs, each watched on its own so that each reports where *it* first overflowed: decoding the
        # float32 latents (what a pipeline in half precision does), encoding, and decoding the half latents.
        with ActivationMonitor(half.vae) as decode_monitor:
            decoded = _safe_decode(half, _in_layout(latents32, device, dtype))
        with ActivationMonitor(half.vae) as encode_monitor:
            moments = half.encode_moments(_in_layout(pixels32, device, dtype))
        roundtrip_monitor = ActivationMonitor(half.vae)
        roundtrip = None
        if torch.isfinite(moments).all():
            with roundtrip_monitor:
                roundtrip = _safe_decode(half, _latents_of(half, moments))
        monitors = (encode_monitor, decode_monitor, roundtrip_monitor)
        places = []
        for watched in monitors:
            if watched.first_nonfinite is not None and watched.first_nonfinite not in places:
                places.append(watched.first_nonfinite)
        if not places and not torch.isfinite(moments).all():
            places.append("the encoder output")
        blocks = [
            BlockActivation(
                block=block,
                max_abs_float32=value,
                max_abs_half=max([m.max_abs[block] for m in monitors if block in m.max_abs], default=float("nan")),
                fraction_of_range=value / dtype_max,
                nonfinite=any(m.nonfinite.get(block, False) for m in monitors),
            )
            for block, value in monitor32.max_abs.items()
        ]
        decode_psnr = _psnr_or_nan(output32, decoded)
        roundtrip_psnr = _psnr_or_nan(output32, roundtrip)
        if places:
            verdict = f"overflows in {name} at {' and '.join(places)}"
        elif not (decode_psnr >= MIN_SAFE_PSNR and roundtrip_psnr >= MIN_SAFE_PSNR):
            worst = min(decode_psnr, roundtrip_psnr)
            verdict = f"imprecise in {name}: {worst:.1f} dB vs float32"
        else:
            verdict = "safe"
        reports.append(
            HalfPrecisionReport(
                dtype=name,
                dtype_max=dtype_max,
                verdict=verdict,
                safe=verdict == "safe",
                overflow_block=places[0] if places else None,
                decode_psnr=decode_psnr,
                roundtrip_psnr=roundtrip_psnr,
                num_images=pixels.shape[0],
                blocks=blocks,
            )
        )
        del half
    return reports


def _safe_decode(adapter, latents: torch.Tensor) -> torch.Tensor | None:
    try:
        return adapter.decode(latents)
    except ValueError:  # a class refusing non-finite input (ours does): counted as an overflow by the monitor
        return None


def format_half_precision(reports: list[HalfPrecisionReport], label: str | None = None) -> str:
    """A text table per dtype: block, largest |activation| (float32), % of the dtype's range, inf/NaN."""
    lines = []
    for report in reports:
        head = f"{label}: " if label else ""
        lines.append(
            f"{head}{report.dtype}: {report.verdict} (decode {_db(report.decode_psnr)}, round trip "
            f"{_db(report.roundtrip_psnr)} vs float32, {report.num_images} images)"
        )
        width = max([len(b.block) for b in report.blocks] + [5])
        lines.append(f"  {'block':<{width}}  {'max |act| fp32':>14}  {'% of range':>10}  inf/NaN")
        for b in report.blocks:
            lines.append(
                f"  {b.block:<{width}}  {b.max_abs_float32:>14.4g}  {100 * b.fraction_of_range:>9.3g}%  "
                f"{'YES' if b.nonfinite else 'no'}"
            )
    return "\n".join(lines)


def _db(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f} dB"
