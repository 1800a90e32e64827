"""`evaluate()`: reconstruct a set of images with one or more VAEs and measure everything, image by image.

Per image and VAE: PSNR and SSIM (on [0, 1] pixels, `diffusers_vae_ext.metrics`), LPIPS (when weights are
given), the KL of the posterior to N(0, I) and the per-channel mean/std of the latent (posterior mean).
Reconstructions decode the posterior mode. Over the set: means with 95 % t-intervals, rFID (when the FID Inception
weights are given), the latent statistics and the `scaling_factor` they suggest (`diffusers_vae_ext.scaling`), and
with `check_fp16` the half-precision check (`evaluation.fp16`).

Rows are appended to `metrics.jsonl` and `metrics.csv` as each batch finishes (flushed and fsynced), so a crash
keeps every row done; the report (`evaluation.report`) is written at the end.

The images of a batch pass through every VAE before the next batch is read, so the worst patch of each image can
be picked where the VAEs do worst on average, and the same patch is shown for all of them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import (
    UnreadableImageError,
    load_image_rgb,
    pil_to_tensor,
    resize_and_crop,
    tensor_to_pil,
    to_model_channels,
)
from ..metrics import psnr, ssim
from ..scaling import LatentStatistics, posterior_seed, scaling_convention
from .adapter import as_adapter, load_adapter

METRICS = ("psnr", "ssim", "lpips", "kl")
# Heat maps: |error| averaged over channels, on the [0, 1] pixel scale; this value and above is white.
HEATMAP_MAX = 0.2
IMAGES_DIR = "images"


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass
class EvalVAE:
    """A VAE under evaluation: its `label` in the report, its adapter and where it came from."""

    label: str
    adapter: Any
    source: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_") or "vae"


def parse_vae_spec(spec: str) -> tuple[str | None, str]:
    """`"LABEL=PATH"` or `"PATH"` -> (label or None, path). An existing path containing "=" stays a path."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise ValueError(f"--vae {spec!r}: expected PATH or LABEL=PATH.")
        return label, path
    return None, spec


def load_vaes(specs: Sequence[str], device: str | torch.device = "cpu") -> list[EvalVAE]:
    """Load each `--vae` spec (see `parse_vae_spec`); labels default to the folder name, made unique."""
    vaes, used = [], set()
    for spec in specs:
        label, path = parse_vae_spec(spec)
        label = label or Path(path).resolve().name or path
        base, counter = label, 2
        while label in used:
            label, counter = f"{base}-{counter}", counter + 1
        used.add(label)
        adapter = load_adapter(path)
        adapter.vae.to(device)
        vaes.append(EvalVAE(label=label, adapter=adapter, source=str(path)))
    return vaes


@dataclass
class _Item:
    index: int
    name: str
    image: Image.Image | None = None
    error: str | None = None


def open_images(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    dataset_split: str = "train",
    image_column: str | None = None,
) -> tuple[int, Iterator[_Item], str]:
    """(count, items, description) of an image folder, a `datasets` dataset, or the built-in sample photos.

    Folders and datasets are read through the latent cache's source layer (same labels, same raw-byte reading),
    and every image is decoded with `data.load_image_rgb`, so odd files behave the same as in the cache.
    """
    if train_data_dir is None and dataset_name is None:
        from ..data import sample_photos

        photos = sample_photos()
        items = (_Item(i, f"{name}.png", image=image) for i, (name, image) in enumerate(photos.items()))
        return len(photos), items, "scikit-image's built-in sample photos"
    from ..cache.sources import open_source, source_label

    source = open_source(train_data_dir, dataset_name, dataset_split, image_column, None)

    def items() -> Iterator[_Item]:
        import io

        for index in range(len(source)):
            name = source_label(source, index)
            try:
                data, _ = source.read(index)
                yield _Item(index, name, image=load_image_rgb(io.BytesIO(data)))
            except (OSError, UnreadableImageError) as err:
                yield _Item(index, name, error=getattr(err, "reason", None) or str(err))

    where = train_data_dir if train_data_dir is not None else dataset_name
    return len(source), items(), str(where)


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class MetricSummary:
    """Mean of a metric over images with the half width of its 95 % t-interval."""

    mean: float
    ci95: float
    std: float
    count: int

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "count": self.count}


def summarize_metric(values: Iterable[float | None]) -> MetricSummary | None:
    """Mean and 95 % t-interval half width (`t_{0.975, n-1} * s / sqrt(n)`) of the finite values; None if none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    count = len(finite)
    mean = sum(finite) / count
    if count < 2:
        return MetricSummary(mean, float("nan"), float("nan"), count)
    std = float(np.std(finite, ddof=1))
    try:
        from scipy.stats import t

        quantile = float(t.ppf(0.975, count - 1))
    except ImportError:  # scipy comes with scikit-image; the normal quantile is the large-sample limit
        quantile = 1.959963984540054
    return MetricSummary(mean, quantile * std / math.sqrt(count), std, count)


@dataclass
class VAEResult:
    """Everything measured for one VAE over the set."""

    label: str
    source: str
    class_name: str
    num_parameters: int
    metrics: dict[str, MetricSummary | None] = field(default_factory=dict)
    rfid: float | None = None
    latent: dict[str, Any] = field(default_factory=dict)
    half_precision: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.source,
            "class_name": self.class_name,
            "num_parameters": self.num_parameters,
            "metrics": {k: (v.to_dict() if v else None) for k, v in self.metrics.items()},
            "rfid": self.rfid,
            "latent": self.latent,
            "half_precision": [r.to_dict() for r in self.half_precision],
            "seconds": self.seconds,
        }


@dataclass
class EvalResult:
    """The whole evaluation: per-VAE results, per-image rows, the patch PNGs, and how it was run."""

    vaes: list[VAEResult]
    rows: list[dict[str, Any]]
    patches: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]
    output_dir: Path
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "seconds": self.seconds,
            "vaes": [v.to_dict() for v in self.vaes],
            "skipped": self.skipped,
        }


# ------------------------------------------------------------------------------------------------------ writing
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


def _heatmap(error: torch.Tensor) -> Image.Image:
    """(H, W) |error| on the [0, 1] scale -> an RGB heat map (magma; 0 black, >= HEATMAP_MAX white)."""
    from matplotlib import colormaps

    values = (error.clamp(0, HEATMAP_MAX) / HEATMAP_MAX).numpy()
    rgb = colormaps["magma"](values)[..., :3]
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))


def worst_patch(error: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(top, left) of the `patch_size` square with the largest mean error in `error` (H, W), on a half-patch grid."""
    height, width = error.shape
    size = min(patch_size, height, width)
    stride = max(1, size // 2)
    means = F.avg_pool2d(error[None, None].double(), kernel_size=size, stride=stride)[0, 0]
    row, col = divmod(int(means.argmax()), means.shape[1])
    return min(row * stride, height - size), min(col * stride, width - size)


# ------------------------------------------------------------------------------------------------------ evaluate
def _kl_per_image(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # diffusers' DiagonalGaussianDistribution.kl(): logvar clamped to [-30, 20], summed over all latent elements.
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def _as_video(adapter: Any, pixels: torch.Tensor) -> torch.Tensor:
    # Video classes see each image as a one-frame clip (1 = 4k + 1 frames is valid for all of them).
    return pixels.unsqueeze(2) if adapter.is_video else pixels


def _from_video(adapter: Any, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.squeeze(2) if adapter.is_video else tensor


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
) -> EvalResult:
    """Evaluate `vaes` on a set of images and write `metrics.jsonl`, `metrics.csv` and the patch PNGs.

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
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    entries = [v if isinstance(v, EvalVAE) else EvalVAE(v[0], as_adapter(v[1]), "") for v in vaes]
    if not entries:
        raise ValueError("Give at least one VAE to evaluate (--vae PATH or --vae LABEL=PATH).")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"VAE labels must be unique, got {labels}.")
    channels = {e.adapter.config.get("in_channels", 3) for e in entries}
    if len(channels) != 1:
        raise ValueError(
            f"The VAEs take different numbers of input channels ({sorted(channels)}); compare VAEs of one kind."
        )
    channels = channels.pop()
    for entry in entries:
        factor = entry.adapter.spatial_factor
        if resolution % factor:
            raise ValueError(
                f"--resolution {resolution} is not divisible by {entry.label}'s spatial factor {factor}; use e.g. "
                f"{max(factor, resolution // factor * factor)}."
            )
    patch_size = patch_size or max(8, min(128, resolution // 2))
    output_dir = Path(output_dir)
    (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    lpips = inception = None
    if lpips_weights is not None:
        from ..losses import load_lpips

        lpips = load_lpips(lpips_weights)
    if inception_weights is not None:
        from .inception import load_inception

        inception = load_inception(inception_weights)

    total, items, description = open_images(train_data_dir, dataset_name, dataset_split, image_column)
    if num_images is not None:
        total = min(total, num_images)

    max_channels = max(e.adapter.latent_channels for e in entries)
    columns = ["image", "vae", "index", "psnr", "ssim", "lpips", "kl"]
    columns += [f"latent_mean_{c}" for c in range(max_channels)] + [f"latent_std_{c}" for c in range(max_channels)]
    writer = _RowWriter(output_dir, columns)

    stats = {e.label: LatentStatistics(num_channels=e.adapter.latent_channels, sample_posterior=True) for e in entries}
    scaled = {
        e.label: LatentStatistics(num_channels=e.adapter.latent_channels, sample_posterior=True) for e in entries
    }
    features: dict[str, list[np.ndarray]] = {"__originals__": []} | {e.label: [] for e in entries}
    seconds = dict.fromkeys(labels, 0.0)
    rows: list[dict[str, Any]] = []
    patches: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    fp16_pixels: list[torch.Tensor] = []

    def batches() -> Iterator[list[tuple[_Item, torch.Tensor]]]:
        batch, taken = [], 0
        for item in items:
            if taken >= total:
                break
            if item.error is not None:
                skipped.append({"image": item.name, "reason": item.error})
                continue
            taken += 1
            crop, _ = resize_and_crop(item.image, (resolution, resolution), center_crop=True)
            batch.append((item, to_model_channels(pil_to_tensor(crop), channels)))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    progress = tqdm(total=total, desc="eval", unit="img", disable=not show_progress)
    # One helper thread reads and resizes the next batch and writes the patch PNGs while the VAEs run (PIL and
    # file I/O release the GIL); everything stays in order because it has a single worker.
    io_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-io")
    pending: list[Future] = []
    try:
        for batch in _prefetched(batches(), io_thread):
            pixels = torch.stack([tensor for _, tensor in batch])
            if check_fp16 and sum(p.shape[0] for p in fp16_pixels) < fp16_images:
                fp16_pixels.append(pixels[: fp16_images - sum(p.shape[0] for p in fp16_pixels)])
            reference_lpips = lpips.features_of(pixels) if lpips is not None else None
            if inception is not None:
                features["__originals__"].append(inception(_rgb(pixels)).double().numpy())
            reconstructions = {}
            batch_rows = []
            for entry in entries:
                adapter = entry.adapter
                tick = time.perf_counter()
                device = next(adapter.vae.parameters()).device
                model_input = _as_video(adapter, pixels.to(device))
                adapter.check_pixels(model_input)
                moments = adapter.encode_moments(model_input)
                if adapter.has_posterior:
                    mean, logvar = moments.float().chunk(2, dim=1)
                else:
                    mean, logvar = moments.float(), None
                reconstruction = _from_video(adapter, adapter.decode(mean.to(moments.dtype))).float().cpu()
                reconstruction = reconstruction.clamp(-1, 1)
                mean, logvar = (
                    _from_video(adapter, mean).cpu(),
                    None if logvar is None else _from_video(adapter, logvar).cpu(),
                )
                seconds[entry.label] += time.perf_counter() - tick

                image_psnr = psnr(pixels, reconstruction)
                image_ssim = ssim(pixels, reconstruction)
                image_lpips = lpips.distance(reference_lpips, lpips.features_of(reconstruction)) if lpips else None
                image_kl = _kl_per_image(mean, logvar) if logvar is not None else None
                if logvar is not None:
                    noise = torch.stack(
                        [
                            torch.randn(
                                mean.shape[1:],
                                generator=torch.Generator().manual_seed(posterior_seed(seed, item.index)),
                            )
                            for item, _ in batch
                        ]
                    )
                    samples = mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * noise
                else:
                    samples = mean
                stats[entry.label].update(samples)
                scaled[entry.label].update(_from_video(adapter, adapter.scale(_as_video(adapter, samples))))
                if inception is not None:
                    features[entry.label].append(inception(_rgb(reconstruction)).double().numpy())
                reconstructions[entry.label] = reconstruction

                channel_mean = mean.flatten(2).mean(2)
                channel_std = mean.flatten(2).std(2, unbiased=False)
                for k, (item, _) in enumerate(batch):
                    row = {
                        "image": item.name,
                        "vae": entry.label,
                        "index": item.index,
                        "psnr": float(image_psnr[k]),
                        "ssim": float(image_ssim[k]),
                        "lpips": float(image_lpips[k]) if image_lpips is not None else None,
                        "kl": float(image_kl[k]) if image_kl is not None else None,
                    }
                    row.update({f"latent_mean_{c}": float(v) for c, v in enumerate(channel_mean[k])})
                    row.update({f"latent_std_{c}": float(v) for c, v in enumerate(channel_std[k])})
                    batch_rows.append(row)
            writer.write(batch_rows)
            rows.extend(batch_rows)
            if save_patches:
                records, writes = _patches(batch, pixels, entries, reconstructions, patch_size)
                patches.extend(records)
                pending.append(io_thread.submit(_write_images, output_dir, writes))
            pending = [future for future in pending if not future.done() or future.result()]
            progress.update(len(batch))
        for future in pending:
            future.result()  # raises a failed write
    finally:
        io_thread.shutdown(wait=True)
        progress.close()
        writer.close()

    if not rows:
        raise ValueError(f"No image could be evaluated ({len(skipped)} skipped): see {output_dir / 'metrics.jsonl'}.")

    results = []
    num_evaluated = len(rows) // len(entries)
    for entry in entries:
        adapter = entry.adapter
        mine = [row for row in rows if row["vae"] == entry.label]
        result = VAEResult(
            label=entry.label,
            source=entry.source,
            class_name=getattr(adapter, "class_name", type(adapter.vae).__name__),
            num_parameters=sum(p.numel() for p in adapter.vae.parameters()),
            metrics={name: summarize_metric(row[name] for row in mine) for name in METRICS},
            seconds=seconds[entry.label],
        )
        result.latent = _latent_summary(adapter, stats[entry.label], scaled[entry.label])
        if inception is not None and num_evaluated >= 2:
            from .fid import frechet_distance_of_features

            result.rfid = frechet_distance_of_features(
                np.concatenate(features["__originals__"]), np.concatenate(features[entry.label])
            )
        if check_fp16 and fp16_pixels:
            from .fp16 import check_half_precision

            pixels = _as_video(adapter, torch.cat(fp16_pixels))
            result.half_precision = check_half_precision(adapter, pixels)
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
        "heatmap_max": HEATMAP_MAX,
        "device": str(next(entries[0].adapter.vae.parameters()).device),
    }
    result = EvalResult(
        vaes=results,
        rows=rows,
        patches=patches,
        skipped=skipped,
        settings=settings,
        output_dir=output_dir,
        seconds=time.perf_counter() - started,
    )
    (output_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _rgb(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def _latent_summary(adapter: Any, stats: LatentStatistics, scaled: LatentStatistics) -> dict[str, Any]:
    config = adapter.config
    convention = scaling_convention(config)
    low, high = stats.scaling_factor_interval()
    current = {key: config.get(key) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    return {
        "convention": convention,
        "current": current,
        "suggested": stats.config_updates(convention),
        "suggested_scaling_factor": stats.scaling_factor,
        "suggested_scaling_factor_ci95": [low, high],
        "channel_mean": stats.channel_mean.tolist(),
        "channel_std": stats.channel_std.tolist(),
        "mean": stats.mean,
        "std": stats.std,
        # What a diffusion model sees with the current config: about 0 and 1 when the scaling is right.
        "scaled_mean": scaled.mean,
        "scaled_std": scaled.std,
        "num_images": stats.num_images,
    }


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


def _write_images(output_dir: Path, writes: list[tuple[str, Image.Image]]) -> None:
    for name, image in writes:
        image.save(output_dir / name)


def _patches(
    batch: list[tuple[_Item, torch.Tensor]],
    pixels: torch.Tensor,
    entries: list[EvalVAE],
    reconstructions: dict[str, torch.Tensor],
    patch_size: int,
) -> tuple[list[dict[str, Any]], list[tuple[str, Image.Image]]]:
    """Per image: the patch where the VAEs do worst on average, as 1:1 crops (original, each reconstruction)
    and a heat map of each VAE's error there. Returns one record per image and the (path, image) to write."""
    # |error| averaged over channels, on the [0, 1] scale.
    errors = {e.label: (reconstructions[e.label] - pixels).abs().mean(1) / 2 for e in entries}
    records, writes = [], []
    for k, (item, _) in enumerate(batch):
        mean_error = torch.stack([errors[e.label][k] for e in entries]).mean(0)
        top, left = worst_patch(mean_error, patch_size)
        size = min(patch_size, *mean_error.shape)
        rows, cols = slice(top, top + size), slice(left, left + size)
        stem = f"{item.index:05d}"
        original = f"{IMAGES_DIR}/{stem}_original.png"
        writes.append((original, tensor_to_pil(pixels[k][:, rows, cols])))
        record = {"image": item.name, "index": item.index, "top": top, "left": left, "size": size}
        record.update(original=original, vaes={})
        for entry in entries:
            crop_name = f"{IMAGES_DIR}/{stem}_{entry.slug}.png"
            heat_name = f"{IMAGES_DIR}/{stem}_{entry.slug}_error.png"
            writes.append((crop_name, tensor_to_pil(reconstructions[entry.label][k][:, rows, cols])))
            writes.append((heat_name, _heatmap(errors[entry.label][k][rows, cols])))
            record["vaes"][entry.label] = {
                "crop": crop_name,
                "error": heat_name,
                "patch_error": float(errors[entry.label][k][rows, cols].mean()),
            }
        records.append(record)
    return records, writes
