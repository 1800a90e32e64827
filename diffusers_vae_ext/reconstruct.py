"""Reconstruct images through a VAE and measure how close they come back: side-by-side PNGs, PSNR and SSIM.

The VAE needs height and width divisible by its downsampling factor. Other sizes are either padded (default) or
cropped:

- `"pad"`: the image is extended at the bottom and right to the next multiple by mirroring its border (`reflect`;
  `replicate` when the image is too small to mirror), reconstructed, and the padding is cut off again. Metrics
  and the PNG cover exactly the original pixels. Mirroring avoids a hard edge that the VAE would spend effort on.
- `"crop"`: the image is centre-cropped down to the previous multiple; metrics and the PNG cover the crop.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import UnreadableImageError, load_image_rgb, pil_to_tensor, tensor_to_pil, to_model_channels
from .metrics import psnr, ssim

SIZE_POLICIES = ("pad", "crop")
# metrics.ssim uses a 7x7 window; smaller images get PSNR only.
MIN_SSIM_SIDE = 7


@dataclass
class ReconstructionResult:
    """One input image: its metrics and side-by-side PNG, or `error` saying why it was skipped.

    `fit` says how the size was made divisible by the VAE factor: `"none"`, `"pad reflect"`, `"pad replicate"` or
    `"crop"`; `processed_width`/`processed_height` is the size the VAE saw.
    """

    path: str
    width: int | None = None
    height: int | None = None
    processed_width: int | None = None
    processed_height: int | None = None
    fit: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    output_path: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fit_to_factor(
    image: torch.Tensor, factor: int, size_policy: str = "pad"
) -> tuple[torch.Tensor, tuple[slice, slice], str]:
    """Make an image (C, H, W) divisible by `factor` along both sides.

    Returns the tensor to encode, the `(rows, cols)` slices of the pixels to compare afterwards (the original
    image for `"pad"`, all of the crop for `"crop"`) and how it was done, e.g. `"pad reflect"`, `"crop"`, `"none"`.
    """
    if size_policy not in SIZE_POLICIES:
        raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}.")
    height, width = image.shape[-2:]
    if height % factor == 0 and width % factor == 0:
        return image, (slice(0, height), slice(0, width)), "none"
    if size_policy == "crop":
        new_h, new_w = height // factor * factor, width // factor * factor
        if new_h == 0 or new_w == 0:
            raise ValueError(
                f"{width}x{height} is smaller than the VAE's factor {factor}; it cannot be cropped, use --size-policy pad."
            )
        top, left = (height - new_h) // 2, (width - new_w) // 2
        cropped = image[:, top : top + new_h, left : left + new_w]
        return cropped, (slice(0, new_h), slice(0, new_w)), "crop"
    pad_h, pad_w = -height % factor, -width % factor
    # reflect needs the padding to be smaller than the side it mirrors.
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    padded = F.pad(image.unsqueeze(0), (0, pad_w, 0, pad_h), mode=mode).squeeze(0)
    return padded, (slice(0, height), slice(0, width)), f"pad {mode}"


def _unique_output_path(output_dir: Path, stem: str, used: set[str]) -> Path:
    name, counter = f"{stem}_reconstruction.png", 2
    while name in used:
        name, counter = f"{stem}_{counter}_reconstruction.png", counter + 1
    used.add(name)
    return output_dir / name


@torch.no_grad()
def reconstruct_images(
    vae: torch.nn.Module,
    paths: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    size_policy: str = "pad",
    sample_posterior: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[ReconstructionResult]:
    """Encode and decode each image with `vae`, one at a time, and measure PSNR/SSIM against the input.

    Images are read with `load_image_rgb` and adapted to the VAE's input channels (`to_model_channels`: a
    1-channel VAE sees and is measured on luminance). Sizes not divisible by the VAE factor are handled by
    `size_policy` (see the module docstring). With `output_dir`, a side-by-side PNG (input | reconstruction) is
    written per image as `<stem>_reconstruction.png`. The posterior mean is decoded unless `sample_posterior`,
    which draws with a generator seeded with `seed` for every image (the same seed gives the same result).

    Unreadable or missing files do not stop the run: their result has `error` set and no metrics. Returns one
    result per input path, in order.
    """
    config = vae.config
    if config.out_channels != config.in_channels:
        raise ValueError(
            f"This VAE maps {config.in_channels} to {config.out_channels} channels; reconstruction metrics need "
            "the same number of input and output channels."
        )
    factor = 2 ** (len(config.block_out_channels) - 1)
    device, dtype = vae.device, vae.dtype
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    results = []
    for path in tqdm(list(paths), desc="reconstruct", unit="image", disable=not progress):
        result = ReconstructionResult(path=str(path))
        results.append(result)
        try:
            image = to_model_channels(pil_to_tensor(load_image_rgb(path)), config.in_channels)
            result.height, result.width = image.shape[-2:]
            model_input, (rows, cols), result.fit = fit_to_factor(image, factor, size_policy)
        except (UnreadableImageError, OSError, ValueError) as err:
            # OSError covers missing files and folders; UnreadableImageError already names the path.
            result.error = err.reason if isinstance(err, UnreadableImageError) else str(err)
            continue
        result.processed_height, result.processed_width = model_input.shape[-2:]

        batch = model_input.unsqueeze(0).to(device=device, dtype=dtype)
        try:
            posterior = vae.encode(batch).latent_dist
            if sample_posterior:
                generator = torch.Generator(device=device).manual_seed(seed)
                latents = posterior.sample(generator=generator)
            else:
                latents = posterior.mode()
            decoded = vae.decode(latents).sample
        except torch.OutOfMemoryError:
            result.error = f"out of memory at {result.processed_width}x{result.processed_height}"
            continue
        reference = model_input[:, rows, cols].unsqueeze(0)
        reconstruction = decoded.float().cpu()[:, :, rows, cols].clamp(-1, 1)
        result.psnr = float(psnr(reference, reconstruction)[0])
        if min(reference.shape[-2:]) >= MIN_SSIM_SIDE:
            result.ssim = float(ssim(reference, reconstruction)[0])

        if output_dir is not None:
            side_by_side = torch.cat([reference[0], reconstruction[0]], dim=-1)
            target = _unique_output_path(output_dir, Path(path).stem, used_names)
            tensor_to_pil(side_by_side).save(target)
            result.output_path = str(target)
    return results


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[ReconstructionResult]) -> dict:
    """Mean PSNR/SSIM over the processed images, the counts, and every result (skipped ones with their error)."""
    done = [r for r in results if r.ok]
    ssims = [r.ssim for r in done if r.ssim is not None]
    return {
        "num_images": len(done),
        "num_skipped": len(results) - len(done),
        "mean_psnr": _mean([r.psnr for r in done]),
        "mean_ssim": _mean(ssims),
        "images": [asdict(r) for r in results],
    }


def format_report(results: Sequence[ReconstructionResult], size_policy: str, factor: int) -> str:
    """A text table (one row per image, then the average), the skipped files and the size policy in words."""

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    if size_policy == "pad":
        policy = (
            f"size policy: pad - sides not divisible by {factor} are padded (reflect; edge if too small) at the "
            "bottom/right, and the padding is cropped off before the metrics and the PNG"
        )
    else:
        policy = (
            f"size policy: crop - sides not divisible by {factor} are centre-cropped down to a multiple of {factor}"
        )
    done = [r for r in results if r.ok]
    name_width = max([len(Path(r.path).name) for r in results] + [len("average")])
    lines = [policy, f"{'image':<{name_width}}  {'size':>11}  {'processed':>11}  {'PSNR dB':>8}  {'SSIM':>6}"]
    for r in done:
        size, processed = f"{r.width}x{r.height}", f"{r.processed_width}x{r.processed_height}"
        lines.append(
            f"{Path(r.path).name:<{name_width}}  {size:>11}  {processed:>11}  {number(r.psnr, 2):>8}  "
            f"{number(r.ssim, 4):>6}"
        )
    summary = summarize(results)
    label = f"average ({summary['num_images']})"
    lines.append(
        f"{label:<{name_width}}  {'':>11}  {'':>11}  {number(summary['mean_psnr'], 2):>8}  "
        f"{number(summary['mean_ssim'], 4):>6}"
    )
    lines.extend(f"skipped {r.path}: {r.error}" for r in results if not r.ok)
    return "\n".join(lines)


def report_json(results: Sequence[ReconstructionResult], size_policy: str) -> str:
    """The machine-readable summary as one JSON line."""
    return json.dumps({"size_policy": size_policy, **summarize(results)})
