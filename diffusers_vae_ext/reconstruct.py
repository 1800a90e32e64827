"""Reconstruct images and videos through an autoencoder and measure how close they come back: PSNR and SSIM.

Any supported autoencoder class works (`diffusers_vae_ext.autoencoders`): images go through image classes as they
are and through video classes as one-frame videos; video clips (`diffusers_vae_ext.video`) go through video classes
as 5-D clips and through image classes frame by frame. Outputs are side-by-side input | reconstruction files: PNGs
for images, mp4 or animated WebP for clips. Clip metrics are the mean over the clip's frames of each frame's PSNR
and SSIM.

The autoencoder needs height and width divisible by its factor (`size_multiple`). Other sizes are either padded
(default) or cropped:

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

from .autoencoders import AutoencoderAdapter, as_autoencoder
from .data import UnreadableImageError, load_image_rgb, pil_to_tensor, tensor_to_pil, to_model_channels
from .metrics import psnr, ssim
from .video import OUTPUT_FORMATS, ClipOptions, VideoError, clips_from_file, load_clip, write_video

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
    """Make an image (C, H, W) or a video (C, T, H, W) divisible by `factor` along height and width.

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
        cropped = image[..., top : top + new_h, left : left + new_w]
        return cropped, (slice(0, new_h), slice(0, new_w)), "crop"
    pad_h, pad_w = -height % factor, -width % factor
    # reflect needs the padding to be smaller than the side it mirrors.
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    flat = image.reshape(1, -1, height, width)  # F.pad pads the last two dimensions of a 4-D input
    padded = F.pad(flat, (0, pad_w, 0, pad_h), mode=mode).reshape(*image.shape[:-2], height + pad_h, width + pad_w)
    return padded, (slice(0, height), slice(0, width)), f"pad {mode}"


def _unique_output_path(output_dir: Path, stem: str, used: set[str], suffix: str = ".png") -> Path:
    name, counter = f"{stem}_reconstruction{suffix}", 2
    while name in used:
        name, counter = f"{stem}_{counter}_reconstruction{suffix}", counter + 1
    used.add(name)
    return output_dir / name


def _posterior_generator(adapter: AutoencoderAdapter, sample_posterior: bool, seed: int) -> torch.Generator | None:
    if not sample_posterior:
        return None
    if not adapter.has_posterior:
        raise ValueError(
            f"{adapter.class_name} has deterministic latents, there is no posterior to sample: drop --sample-posterior."
        )
    return torch.Generator(device=adapter.device).manual_seed(seed)


def _reconstruct(adapter: AutoencoderAdapter, pixels: torch.Tensor, sample_posterior: bool, seed: int) -> torch.Tensor:
    """Encode and decode one batch the adapter accepts; returns float32 pixels on the CPU."""
    generator = _posterior_generator(adapter, sample_posterior, seed)
    moments = adapter.encode_moments(pixels)
    latents = adapter.latents_from_moments(moments, sample=sample_posterior, generator=generator)
    return adapter.decode(latents).float().cpu()


def _checked_adapter(
    vae: torch.nn.Module | AutoencoderAdapter, sample_posterior: bool, seed: int
) -> AutoencoderAdapter:
    """The adapter of `vae`, refused up front when its output cannot be compared with its input or when a
    posterior draw is asked of deterministic latents."""
    adapter = as_autoencoder(vae)
    if adapter.out_channels != adapter.in_channels:
        raise ValueError(
            f"This VAE maps {adapter.in_channels} to {adapter.out_channels} channels; reconstruction metrics need "
            "the same number of input and output channels."
        )
    _posterior_generator(adapter, sample_posterior, seed)
    return adapter


def _output_folder(output_dir: str | os.PathLike | None) -> Path | None:
    if output_dir is None:
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


@torch.no_grad()
def reconstruct_images(
    vae: torch.nn.Module | AutoencoderAdapter,
    paths: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    size_policy: str = "pad",
    sample_posterior: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[ReconstructionResult]:
    """Encode and decode each image with `vae`, one at a time, and measure PSNR/SSIM against the input.

    `vae` is any supported autoencoder (a model or its `AutoencoderAdapter`); video classes see each image as a
    one-frame video. Images are read with `load_image_rgb` and adapted to the VAE's input channels
    (`to_model_channels`: a 1-channel VAE sees and is measured on luminance). Sizes not divisible by the VAE
    factor are handled by `size_policy` (see the module docstring). With `output_dir`, a side-by-side PNG (input |
    reconstruction) is written per image as `<stem>_reconstruction.png`. The posterior mean is decoded unless
    `sample_posterior`, which draws with a generator seeded with `seed` for every image (the same seed gives the
    same result); classes with deterministic latents refuse it.

    Unreadable or missing files do not stop the run: their result has `error` set and no metrics. Returns one
    result per input path, in order.
    """
    adapter = _checked_adapter(vae, sample_posterior, seed)
    factor = adapter.size_multiple
    output_dir = _output_folder(output_dir)
    used_names: set[str] = set()
    results = []
    for path in tqdm(list(paths), desc="reconstruct", unit="image", disable=not progress):
        result = ReconstructionResult(path=str(path))
        results.append(result)
        try:
            image = to_model_channels(pil_to_tensor(load_image_rgb(path)), adapter.in_channels)
            result.height, result.width = image.shape[-2:]
            model_input, (rows, cols), result.fit = fit_to_factor(image, factor, size_policy)
        except (UnreadableImageError, OSError, ValueError) as err:
            # OSError covers missing files and folders; UnreadableImageError already names the path.
            result.error = err.reason if isinstance(err, UnreadableImageError) else str(err)
            continue
        result.processed_height, result.processed_width = model_input.shape[-2:]

        batch = model_input.unsqueeze(0)
        if adapter.is_video:
            batch = batch.unsqueeze(2)  # one frame
        try:
            decoded = _reconstruct(adapter, batch, sample_posterior, seed)
        except torch.OutOfMemoryError:
            result.error = f"out of memory at {result.processed_width}x{result.processed_height}"
            continue
        if adapter.is_video:
            decoded = decoded[:, :, 0]
        reference = model_input[:, rows, cols].unsqueeze(0)
        reconstruction = decoded[:, :, rows, cols].clamp(-1, 1)
        result.psnr = float(psnr(reference, reconstruction)[0])
        if min(reference.shape[-2:]) >= MIN_SSIM_SIDE:
            result.ssim = float(ssim(reference, reconstruction)[0])

        if output_dir is not None:
            side_by_side = torch.cat([reference[0], reconstruction[0]], dim=-1)
            target = _unique_output_path(output_dir, Path(path).stem, used_names)
            tensor_to_pil(side_by_side).save(target)
            result.output_path = str(target)
    return results


# ===================================================================================================== videos


@dataclass
class VideoReconstructionResult:
    """One clip of an input video: its metrics (means over frames) and side-by-side file, or why it was skipped.

    A video that gave no clip has one result with `clip_id=None`, `error` and `error_kind` (see `VideoError`).
    """

    path: str
    clip_id: str | None = None
    num_frames: int | None = None
    frame_indices: list[int] | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    processed_width: int | None = None
    processed_height: int | None = None
    fit: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    frame_psnr: list[float] | None = None
    output_path: str | None = None
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _resized_size(width: int, height: int, resolution: int | None) -> tuple[int, int] | None:
    """(height, width) with the short side at `resolution` and the aspect kept, or None to keep the size."""
    if resolution is None or min(width, height) == resolution:
        return None
    scale = resolution / min(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def reconstruct_videos(
    vae: torch.nn.Module | AutoencoderAdapter,
    sources: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    clip_options: ClipOptions | None = None,
    size_policy: str = "pad",
    resolution: int | None = None,
    output_format: str = "mp4",
    sample_posterior: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[VideoReconstructionResult]:
    """Cut clips from videos (files or image-sequence folders), reconstruct them and measure PSNR/SSIM per clip.

    Args:
        vae: any supported autoencoder (model or adapter). Video classes encode each clip as one 5-D tensor and
            need valid frame counts (`frame_multiple * k + 1`); image classes encode the frames as a batch.
        sources: video files and image-sequence folders.
        output_dir: where `<stem>_clip<k>_reconstruction.<mp4|webp>` (input | reconstruction side by side, at the
            clip's frame rate) are written; None writes nothing.
        clip_options: a `video.ClipOptions` (`num_frames`, `frame_stride`/`fps`, `max_frames`,
            `clips_per_video`, `sequence_fps`); default: one clip of as many frames as the video has.
        size_policy: `"pad"` or `"crop"` to the autoencoder's `size_multiple` (see the module docstring).
        resolution: resize frames so the short side has this many pixels first (None: the source size).
        output_format: `"mp4"` (H.264) or `"webp"` (animated, lossless).
        sample_posterior, seed: decode a seeded posterior draw instead of the mean (one seed for every clip).

    Unreadable, too short, audio-only or variable-frame-rate videos (without `fps`) do not stop the run: they
    get one result with `error` and `error_kind`. A `num_frames` the autoencoder cannot encode raises
    `ValueError` before any file is read.
    """
    adapter = _checked_adapter(vae, sample_posterior, seed)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
    options = clip_options or ClipOptions()
    options.check(adapter.frame_multiple, adapter.class_name)
    output_dir = _output_folder(output_dir)
    used_names: set[str] = set()
    results: list[VideoReconstructionResult] = []
    for source in tqdm(list(sources), desc="reconstruct", unit="video", disable=not progress):
        try:
            clips = clips_from_file(source, options, adapter.frame_multiple, video_id=Path(source).name)
        except VideoError as err:
            results.append(VideoReconstructionResult(path=str(source), error=err.reason, error_kind=err.kind))
            continue
        for clip in clips:
            result = VideoReconstructionResult(
                path=str(source),
                clip_id=clip.clip_id,
                num_frames=clip.num_frames,
                frame_indices=list(clip.frame_indices),
                fps=clip.fps,
            )
            results.append(result)
            try:
                size = _resized_size(*clip.source_size, resolution)
                video = to_model_channels(load_clip(clip, size=size), adapter.in_channels)  # (C, T, H, W)
                result.height, result.width = video.shape[-2:]
                model_input, (rows, cols), result.fit = fit_to_factor(video, adapter.size_multiple, size_policy)
            except (VideoError, ValueError) as err:
                result.error = getattr(err, "reason", None) or str(err)
                result.error_kind = getattr(err, "kind", "unreadable")
                continue
            result.processed_height, result.processed_width = model_input.shape[-2:]
            if adapter.is_video:
                batch = model_input.unsqueeze(0)
            else:
                batch = model_input.transpose(0, 1)  # frames as a batch of images (T, C, H, W)
            try:
                decoded = _reconstruct(adapter, batch, sample_posterior, seed)
            except torch.OutOfMemoryError:
                result.error = f"out of memory at {result.processed_width}x{result.processed_height}"
                result.error_kind = "out_of_memory"
                continue
            decoded = decoded[0] if adapter.is_video else decoded.transpose(0, 1)  # (C, T, H, W)
            reference = model_input[..., rows, cols]
            reconstruction = decoded[..., rows, cols].clamp(-1, 1)
            frames_ref, frames_rec = reference.transpose(0, 1), reconstruction.transpose(0, 1)
            result.frame_psnr = [float(v) for v in psnr(frames_ref, frames_rec)]
            result.psnr = sum(result.frame_psnr) / len(result.frame_psnr)
            if min(reference.shape[-2:]) >= MIN_SSIM_SIDE:
                result.ssim = float(ssim(frames_ref, frames_rec).mean())
            if output_dir is not None:
                stem = f"{Path(source).stem}_clip{clip.index}"
                target = _unique_output_path(output_dir, stem, used_names, suffix=f".{output_format}")
                write_video(target, torch.cat([reference, reconstruction], dim=-1), fps=clip.fps)
                result.output_path = str(target)
    return results


def summarize_videos(results: Sequence[VideoReconstructionResult]) -> dict:
    """Mean PSNR/SSIM over the reconstructed clips, the counts, and every result."""
    return _summary(results, "clips")


def format_video_report(results: Sequence[VideoReconstructionResult]) -> str:
    """A text table, one row per clip (PSNR/SSIM: means over its frames), the average, then the skipped videos."""

    done = [r for r in results if r.ok]
    name_width = max([len(Path(r.path).name) + 8 for r in results] + [len("average")])
    lines = [
        f"{'clip':<{name_width}}  {'frames':>6}  {'fps':>6}  {'size':>11}  {'processed':>11}  {'PSNR dB':>8}  "
        f"{'SSIM':>6}"
    ]
    for r in done:
        label = f"{Path(r.path).name}:{r.clip_id.rsplit(':', 1)[-1]}"
        lines.append(
            f"{label:<{name_width}}  {r.num_frames:>6}  {r.fps:>6.4g}  {f'{r.width}x{r.height}':>11}  "
            f"{f'{r.processed_width}x{r.processed_height}':>11}  {_number(r.psnr, 2):>8}  {_number(r.ssim, 4):>6}"
        )
    summary = summarize_videos(results)
    label = f"average ({summary['num_clips']})"
    lines.append(
        f"{label:<{name_width}}  {'':>6}  {'':>6}  {'':>11}  {'':>11}  {_number(summary['mean_psnr'], 2):>8}  "
        f"{_number(summary['mean_ssim'], 4):>6}"
    )
    for r in results:
        if not r.ok:
            where = f"{r.path} ({r.clip_id})" if r.clip_id else r.path
            lines.append(f"skipped {where}: {r.error_kind}: {r.error}")
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _summary(results: Sequence[ReconstructionResult | VideoReconstructionResult], items: str) -> dict:
    # `items` names the kind of result: "images" or "clips" (the count key and the list key).
    done = [r for r in results if r.ok]
    return {
        f"num_{items}": len(done),
        "num_skipped": len(results) - len(done),
        "mean_psnr": _mean([r.psnr for r in done]),
        "mean_ssim": _mean([r.ssim for r in done if r.ssim is not None]),
        items: [asdict(r) for r in results],
    }


def summarize(results: Sequence[ReconstructionResult]) -> dict:
    """Mean PSNR/SSIM over the processed images, the counts, and every result (skipped ones with their error)."""
    return _summary(results, "images")


def format_report(results: Sequence[ReconstructionResult], size_policy: str, factor: int) -> str:
    """A text table (one row per image, then the average), the skipped files and the size policy in words."""

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
            f"{Path(r.path).name:<{name_width}}  {size:>11}  {processed:>11}  {_number(r.psnr, 2):>8}  "
            f"{_number(r.ssim, 4):>6}"
        )
    summary = summarize(results)
    label = f"average ({summary['num_images']})"
    lines.append(
        f"{label:<{name_width}}  {'':>11}  {'':>11}  {_number(summary['mean_psnr'], 2):>8}  "
        f"{_number(summary['mean_ssim'], 4):>6}"
    )
    lines.extend(f"skipped {r.path}: {r.error}" for r in results if not r.ok)
    return "\n".join(lines)


def report_json(
    results: Sequence[ReconstructionResult],
    size_policy: str,
    video_results: Sequence[VideoReconstructionResult] | None = None,
) -> str:
    """The machine-readable summary as one JSON line (clips under `"videos"` when videos were given)."""
    record = {"size_policy": size_policy, **summarize(results)}
    if video_results is not None:
        record["videos"] = summarize_videos(video_results)
    return json.dumps(record)
