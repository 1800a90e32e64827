"""`evaluate()`: reconstruct a set of images with one or more VAEs and measure everything, image by image.

Per image and VAE: PSNR and SSIM (on [0, 1] pixels, `diffusers_vae_ext.metrics`), LPIPS (when weights are
given), the KL of the posterior to N(0, I) and the per-channel mean/std of the latent (posterior mean).
Reconstructions decode the posterior mode. Over the set: means with 95 % t-intervals, rFID (when the FID Inception
weights are given), the latent statistics and the `scaling_factor` they suggest (`diffusers_vae_ext.scaling`), and
with `check_fp16` the half-precision check (`evaluation.fp16`).

Rows are appended to `metrics.jsonl` and `metrics.csv` as each batch finishes (flushed and fsynced), so a crash
keeps every row done; the report (`evaluation.report`) is written at the end.

The images of a batch pass through every VAE before the next batch is read, so the worst patch of each image can
be picked where the VAEs do worst on average and shown at the same place for all of them. One helper thread reads
the next batch and writes the PNGs while the VAEs run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..autoencoders import as_autoencoder
from ..conventions import pipeline_statistics_updates
from ..metrics import psnr, ssim
from ..scaling import LatentStatistics, posterior_seed
from ..stats import _statistics_units
from .inputs import EvalVAE, ImageItem, image_batches, open_images
from .patches import IMAGES_DIR, worst_patches, write_images
from .results import EvalResult, VAEResult, summarize_metric

METRICS = ("psnr", "ssim", "lpips", "kl")


class _RowWriter:
    """metrics.jsonl and metrics.csv, one row per image and VAE, appended and synced batch by batch."""

    def __init__(self, output_dir: Path, columns: list[str]):
        self.columns = columns
        self.jsonl = open(output_dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.csv_file = open(output_dir / "metrics.csv", "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.csv = csv.DictWriter(self.csv_file, fieldnames=columns, extrasaction="ignore")
        self.csv.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.jsonl.write(json.dumps(row) + "\n")
            self.csv.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        for handle in (self.jsonl, self.csv_file):
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()


def _kl_per_image(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # diffusers' DiagonalGaussianDistribution.kl(): logvar clamped to [-30, 20], summed over all latent elements.
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def _as_video(adapter: Any, pixels: torch.Tensor) -> torch.Tensor:
    # Video classes see each image as a one-frame clip (1 = 4k + 1 frames is valid for all of them).
    return pixels.unsqueeze(2) if adapter.is_video else pixels


def _from_video(adapter: Any, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.squeeze(2) if adapter.is_video else tensor


def _rgb(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class _Measurement:
    """The running measurements of one VAE: its rows' numbers, latent statistics, Inception features, time."""

    def __init__(self, entry: EvalVAE, seed: int):
        self.entry, self.adapter, self.seed = entry, entry.adapter, seed
        channels = self.adapter.latent_channels
        # Statistics channels: FLUX.2's pipelines normalise 2x2-patchified latents (4C channels).
        self.stats = LatentStatistics(
            num_channels=channels * self.adapter.convention.latents_patch_size**2,
            sample_posterior=self.adapter.has_posterior,
        )
        self.scaled = LatentStatistics(num_channels=channels, sample_posterior=self.adapter.has_posterior)
        self.features: list[np.ndarray] = []
        self.seconds = 0.0
        # With --diffusability: the posterior draws (what a diffusion model trains on) and the images at the
        # latents' resolution (area-averaged, small enough to keep for any number of images).
        self.keep_latents = False
        self.latents: list[torch.Tensor] = []
        self.small_images: list[torch.Tensor] = []

    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(reconstruction clamped to [-1, 1], posterior mean, logvar or None), all float32 on the CPU."""
        adapter = self.adapter
        tick = time.perf_counter()
        model_input = _as_video(adapter, pixels.to(next(adapter.vae.parameters()).device))
        adapter.check_pixels(model_input)
        moments = adapter.encode_moments(model_input)
        latents = moments.chunk(2, dim=1)[0] if adapter.has_posterior else moments
        reconstruction = _from_video(adapter, adapter.decode(latents)).float().cpu().clamp(-1, 1)
        moments = _from_video(adapter, moments).float().cpu()
        self.seconds += time.perf_counter() - tick
        if adapter.has_posterior:
            mean, logvar = moments.chunk(2, dim=1)
            return reconstruction, mean, logvar
        return reconstruction, moments, None

    @torch.no_grad()
    def measure(
        self,
        items: list[ImageItem],
        pixels: torch.Tensor,
        lpips: Any = None,
        reference_lpips: list[torch.Tensor] | None = None,
        inception: Any = None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Reconstruct a batch; return the reconstructions and one row per image; update the set statistics."""
        reconstruction, mean, logvar = self.reconstruct(pixels)
        image_psnr, image_ssim = psnr(pixels, reconstruction), ssim(pixels, reconstruction)
        image_lpips = lpips.distance(reference_lpips, lpips.features_of(reconstruction)) if lpips else None
        image_kl = _kl_per_image(mean, logvar) if logvar is not None else None
        samples = mean
        if logvar is not None:
            # One seeded draw per image (seeded by its index), so the statistics do not depend on batching.
            noise = torch.stack(
                [
                    torch.randn(
                        mean.shape[1:], generator=torch.Generator().manual_seed(posterior_seed(self.seed, i.index))
                    )
                    for i in items
                ]
            )
            samples = mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * noise
        # Statistics of the latents as the pipelines normalise them (FLUX.2: 2x2-patchified).
        self.stats.update(_statistics_units(self.adapter, samples, None))
        self.scaled.update(_from_video(self.adapter, self.adapter.scale(_as_video(self.adapter, samples))))
        if inception is not None:
            self.features.append(inception(_rgb(reconstruction)).double().numpy())
        if self.keep_latents:
            self.latents.append(samples)
            self.small_images.append(F.adaptive_avg_pool2d(_rgb(pixels), tuple(samples.shape[-2:])))

        channel_mean, channel_std = mean.flatten(2).mean(2), mean.flatten(2).std(2, unbiased=False)
        rows = []
        for k, item in enumerate(items):
            row = {
                "image": item.name,
                "vae": self.entry.label,
                "index": item.index,
                "psnr": float(image_psnr[k]),
                "ssim": float(image_ssim[k]),
                "lpips": float(image_lpips[k]) if image_lpips is not None else None,
                "kl": float(image_kl[k]) if image_kl is not None else None,
            }
            row.update({f"latent_mean_{c}": float(v) for c, v in enumerate(channel_mean[k])})
            row.update({f"latent_std_{c}": float(v) for c, v in enumerate(channel_std[k])})
            rows.append(row)
        return reconstruction, rows

    def latent_summary(self) -> dict[str, Any]:
        adapter, stats = self.adapter, self.stats
        convention = adapter.convention
        low, high = stats.scaling_factor_interval()
        config_updates, weight_updates = pipeline_statistics_updates(adapter.class_name, adapter.config, stats)
        return {
            # How this class's pipelines scale latents, and the numbers they read now (config keys, or weights
            # for LTX-Video and FLUX.2).
            "convention": convention.convention,
            "statistics_in": convention.statistics_in,
            "current": {key: _plain(value) for key, value in adapter.scaling_config().items()},
            "suggested": {**config_updates, **weight_updates},
            "suggested_scaling_factor": stats.scaling_factor,
            "suggested_scaling_factor_ci95": [low, high],
            "channel_mean": stats.channel_mean.tolist(),
            "channel_std": stats.channel_std.tolist(),
            "mean": stats.mean,
            "std": stats.std,
            # What a diffusion model sees with the current config: about 0 and 1 when the scaling is right.
            "scaled_mean": self.scaled.mean,
            "scaled_std": self.scaled.std,
            "num_images": stats.num_images,
        }


def _check_vaes(vaes: Sequence[EvalVAE | tuple[str, Any]], resolution: int) -> tuple[list[EvalVAE], int]:
    entries = [v if isinstance(v, EvalVAE) else EvalVAE(v[0], as_autoencoder(v[1]), "") for v in vaes]
    if not entries:
        raise ValueError("Give at least one VAE to evaluate (--vae PATH or --vae LABEL=PATH).")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"VAE labels must be unique, got {labels}.")
    channels = {e.adapter.in_channels for e in entries}
    if len(channels) != 1:
        raise ValueError(
            f"The VAEs take different numbers of input channels ({sorted(channels)}); compare VAEs of one kind."
        )
    for entry in entries:
        adapter = entry.adapter
        if adapter.is_video and not adapter.valid_num_frames(1):
            # Images are evaluated as one-frame clips; a class whose frame rule excludes 1 would drop or pad it.
            raise ValueError(
                f"{entry.label} ({adapter.class_name}) cannot evaluate single images: it encodes clips of "
                f"{adapter.frame_multiple}k + 1 frames with k >= 1 only. Evaluate it on videos with "
                "`diffusers-vae reconstruct` instead."
            )
        multiple = adapter.size_multiple
        if resolution % multiple:
            raise ValueError(
                f"--resolution {resolution} is not divisible by {multiple}, which {entry.label} "
                f"({adapter.class_name}) needs; use e.g. {max(multiple, resolution // multiple * multiple)}."
            )
    return entries, channels.pop()


def _unique_slugs(entries: list[EvalVAE]) -> dict[str, str]:
    slugs: dict[str, str] = {}
    for entry in entries:
        slug, counter = entry.slug, 2
        while slug in slugs.values():
            slug, counter = f"{entry.slug}-{counter}", counter + 1
        slugs[entry.label] = slug
    return slugs


def _prefetched(iterator: Iterator[Any], pool: ThreadPoolExecutor) -> Iterator[Any]:
    """`iterator`'s items, each fetched in `pool` while the caller works on the previous one."""
    sentinel = object()
    future = pool.submit(next, iterator, sentinel)
    while True:
        item = future.result()
        if item is sentinel:
            return
        future = pool.submit(next, iterator, sentinel)
        yield item


@torch.no_grad()
def evaluate(
    vaes: Sequence[EvalVAE | tuple[str, Any]],
    output_dir: str | os.PathLike,
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    dataset_split: str = "train",
    image_column: str | None = None,
    resolution: int = 256,
    num_images: int | None = None,
    batch_size: int = 4,
    lpips_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    check_fp16: bool = False,
    fp16_images: int = 4,
    patch_size: int | None = None,
    seed: int = 0,
    save_patches: bool = True,
    show_progress: bool = True,
    diffusability: bool = False,
    probe_steps: int | None = None,
    probe_samples: int = 16,
) -> EvalResult:
    """Evaluate `vaes` on a set of images and write `metrics.jsonl`, `metrics.csv`, `summary.json` and the PNGs.

    Args:
        vaes: `EvalVAE`s, or `(label, model_or_adapter)` pairs. All must take the same number of input channels.
        output_dir: where the rows, PNGs (under `images/`) and, via `evaluation.report`, the report go.
        train_data_dir / dataset_name / dataset_split / image_column: the images, as the latent cache takes them;
            neither: the built-in sample photos.
        resolution: images are resized (short side) and centre-cropped to this square; it must be divisible by
            every VAE's spatial factor.
        num_images: evaluate only the first this many readable images (default: all).
        batch_size: images per encode/decode call.
        lpips_weights: the safetensors file of `diffusers-vae convert-lpips` (LPIPS is skipped without it).
        inception_weights: the safetensors file of `diffusers-vae convert-inception` (rFID is skipped without it).
        check_fp16: also run the half-precision check (`evaluation.fp16`) on the first `fp16_images` images.
        patch_size: side of the worst-patch crops (default `min(128, resolution // 2)`).
        seed: seed of the posterior samples behind the suggested `scaling_factor` (one seed per image).
        save_patches: write the crop and heat-map PNGs.
        show_progress: a tqdm bar over images.
        diffusability: after the reconstructions, also measure how easily a diffusion model learns each VAE's
            latents (`diffusers_vae_ext.diffusability`: spectrum, probe loss, samples) on the posterior draws of
            the evaluated images. The rows and a first summary.json are on disk before the probe starts.
        probe_steps: the probe's training steps (default: `measure_diffusability`'s).
        probe_samples: samples drawn from each probe, decoded and shown as a grid (FID against the images with
            `inception_weights`); 0 for none.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    entries, channels = _check_vaes(vaes, resolution)
    patch_size = patch_size or max(8, min(128, resolution // 2))
    # The images first: a missing input or optional package fails here, before anything is loaded or written.
    total, items, description = open_images(train_data_dir, dataset_name, dataset_split, image_column)
    output_dir = Path(output_dir)
    (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    lpips = inception = None
    if lpips_weights is not None:
        from ..losses import load_lpips

        lpips = load_lpips(lpips_weights)
    if inception_weights is not None:
        from .inception import load_inception

        inception = load_inception(inception_weights)

    if num_images is not None:
        total = num_images if total is None else min(total, num_images)
    limit = total if total is not None else float("inf")
    max_channels = max(e.adapter.latent_channels for e in entries)
    columns = ["image", "vae", "index", *METRICS]
    columns += [f"latent_mean_{c}" for c in range(max_channels)] + [f"latent_std_{c}" for c in range(max_channels)]
    writer = _RowWriter(output_dir, columns)
    measurements = [_Measurement(entry, seed) for entry in entries]
    for measurement in measurements:
        measurement.keep_latents = diffusability
    slugs = _unique_slugs(entries)
    original_features: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    patches: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    fp16_pixels: list[torch.Tensor] = []

    progress = tqdm(total=total, desc="eval", unit="img", disable=not show_progress)
    # A single worker keeps reads and writes in order; PIL and file I/O release the GIL while the VAEs run.
    io_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-io")
    writes: list[Future] = []
    try:
        batches = image_batches(items, limit, resolution, channels, batch_size, skipped)
        for batch in _prefetched(batches, io_thread):
            batch_items = [item for item, _ in batch]
            pixels = torch.stack([tensor for _, tensor in batch])
            kept = sum(p.shape[0] for p in fp16_pixels)
            if check_fp16 and kept < fp16_images:
                fp16_pixels.append(pixels[: fp16_images - kept])
            reference_lpips = lpips.features_of(pixels) if lpips is not None else None
            if inception is not None:
                original_features.append(inception(_rgb(pixels)).double().numpy())
            reconstructions, batch_rows = {}, []
            for measurement in measurements:
                reconstruction, new_rows = measurement.measure(batch_items, pixels, lpips, reference_lpips, inception)
                reconstructions[measurement.entry.label] = reconstruction
                batch_rows += new_rows
            writer.write(batch_rows)
            rows += batch_rows
            if save_patches:
                records, images = worst_patches(batch_items, pixels, reconstructions, slugs, patch_size)
                patches += records
                writes.append(io_thread.submit(write_images, output_dir, images))
            progress.update(len(batch))
        for future in writes:
            future.result()  # raises if a write failed
    finally:
        io_thread.shutdown(wait=True)
        progress.close()
        writer.close()
    if not rows:
        raise ValueError(f"No image could be evaluated ({len(skipped)} skipped, see the report's list).")

    num_evaluated = len(rows) // len(entries)
    results = []
    for measurement in measurements:
        entry, adapter = measurement.entry, measurement.adapter
        mine = [row for row in rows if row["vae"] == entry.label]
        result = VAEResult(
            label=entry.label,
            source=entry.source,
            class_name=getattr(adapter, "class_name", type(adapter.vae).__name__),
            num_parameters=sum(p.numel() for p in adapter.vae.parameters()),
            metrics={name: summarize_metric(row[name] for row in mine) for name in METRICS},
            latent=measurement.latent_summary(),
            seconds=measurement.seconds,
        )
        if inception is not None and num_evaluated >= 2:
            from .fid import frechet_distance_of_features

            result.rfid = frechet_distance_of_features(
                np.concatenate(original_features), np.concatenate(measurement.features)
            )
        if fp16_pixels:
            from .fp16 import check_half_precision

            result.half_precision = check_half_precision(adapter, _as_video(adapter, torch.cat(fp16_pixels)))
        results.append(result)

    settings = {
        "data": description,
        "num_images": num_evaluated,
        "num_skipped": len(skipped),
        "resolution": resolution,
        "batch_size": batch_size,
        "patch_size": patch_size,
        "lpips": str(lpips_weights) if lpips_weights else None,
        "inception": str(inception_weights) if inception_weights else None,
        "check_fp16": check_fp16,
        "fp16_images": sum(p.shape[0] for p in fp16_pixels),
        "seed": seed,
        "device": str(next(entries[0].adapter.vae.parameters()).device),
        "diffusability": diffusability,
    }
    result = EvalResult(results, rows, patches, skipped, settings, output_dir, time.perf_counter() - started)
    _write_summary(result)
    if diffusability:
        # The reconstruction rows and summary are on disk: an interrupted probe loses none of them.
        from .diffusability import measure_all

        settings["diffusability"] = measure_all(
            measurements, results, slugs, output_dir, original_features, inception, probe_steps, probe_samples,
            seed, show_progress,
        )  # fmt: skip
        result.seconds = time.perf_counter() - started
        _write_summary(result)
    return result


def _write_summary(result: EvalResult) -> None:
    summary = json.dumps(_json_safe(result.to_dict()), indent=2, default=str, allow_nan=False)
    (result.output_dir / "summary.json").write_text(summary + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    """Tensors (statistics stored in weights) as lists, for the JSON summary."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _json_safe(value: Any) -> Any:
    """NaN/inf (e.g. an interval from one image) become null: strict JSON that every reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
