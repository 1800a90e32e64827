"""Latent statistics of data: `diffusers-vae stats` over images or over an existing latent cache.

`compute_latent_statistics` encodes an image folder (or reads a latent cache) into a
`diffusers_vae_ext.scaling.LatentStatistics`, exactly the same under `accelerate launch` as in one process;
`run_stats` prints the table and JSON line and optionally writes the numbers into the VAE's config.json. This
module sits above both `scaling` (conventions, the accumulator) and `cache` (the latent-cache reader).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from .cache import LatentCacheDataset
from .data import (
    UnreadableImageError,
    list_image_files,
    load_image_rgb,
    pil_to_tensor,
    resize_and_crop,
    to_model_channels,
)
from .scaling import (
    CONVENTIONS,
    LatentStatistics,
    estimate_latent_statistics,
    posterior_seed,
    scaling_convention,
    write_latent_statistics,
)


class _ImageShard(torch.utils.data.Dataset):
    """Files `files[i]` for i in `indices`, centre-cropped to `resolution`; unreadable ones come back as None."""

    def __init__(self, files: Sequence[Path], indices: Sequence[int], resolution: int, channels: int):
        self.files, self.indices, self.resolution, self.channels = files, indices, resolution, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        index = self.indices[position]
        try:
            image = load_image_rgb(self.files[index])
        except (UnreadableImageError, OSError) as err:
            return index, None, getattr(err, "reason", None) or str(err)
        crop, _ = resize_and_crop(image, (self.resolution, self.resolution), center_crop=True)
        return index, to_model_channels(pil_to_tensor(crop), self.channels), None


def _collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return {
        "indices": [index for index, _ in good],
        "pixels": torch.stack([pixels for _, pixels in good]) if good else None,
        "skipped": [(index, reason) for index, _, reason in items if reason is not None],
    }


def _select(count: int, num_images: int | None, seed: int) -> list[int]:
    """Indices of the samples to use: all, or a seeded random subset of `num_images` (sorted)."""
    import random

    if num_images is None or num_images >= count:
        return list(range(count))
    if num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {num_images}.")
    return sorted(random.Random(seed).sample(range(count), num_images))


def _current_config(vae: str, subfolder: str | None) -> dict[str, Any]:
    from .modeling import AutoencoderKL

    return dict(AutoencoderKL.load_config(vae, subfolder=subfolder or None))


def compute_latent_statistics(
    vae: str | os.PathLike,
    train_data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    num_images: int | None = None,
    resolution: int = 512,
    batch_size: int = 8,
    sample_posterior: bool = True,
    seed: int = 0,
    dtype: str = "float32",
    dataloader_num_workers: int = 0,
    show_progress: bool = True,
) -> tuple[LatentStatistics, list[tuple[str, str]]]:
    """Latent statistics of an image folder (encoded with the VAE at `vae`) or of an existing latent cache.

    Works unchanged under `accelerate launch`: each process takes the disjoint shard `samples[rank::world]`
    (no padding, no duplicates), posterior noise is seeded per sample (`posterior_seed(seed, index)`), and the
    shards' statistics are merged in rank order, so N processes give the result of one. `num_images` picks a
    seeded random subset (the same on every rank). Images that cannot be read are skipped.

    Returns the merged statistics (on every rank) and the skipped `(path, reason)` pairs of all ranks. Raises
    `ValueError` when there is nothing to measure (empty folder, no readable image).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    if (train_data_dir is None) == (cache_dir is None):
        raise ValueError("Give exactly one of --train_data_dir (images) or --cache_dir (a latent cache).")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    skipped_here: list[tuple[str, str]] = []
    if cache_dir is not None:
        stats, total = _cache_statistics(vae, subfolder, cache_dir, num_images, sample_posterior, seed, show_progress)
        stats.all_reduce(state)
    else:
        from .modeling import AutoencoderKL

        files = list_image_files(train_data_dir)
        selected = _select(len(files), num_images, seed)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder or "", torch_dtype=torch_dtype)
        model = model.to(state.device).eval().requires_grad_(False)
        factor = model.downsampling_factor
        if resolution < factor or resolution % factor:
            raise ValueError(f"--resolution must be a positive multiple of the VAE's downsampling factor {factor}.")
        shard = _ImageShard(files, selected[rank::world], resolution, model.config.in_channels)
        loader = torch.utils.data.DataLoader(
            shard,
            batch_size=batch_size,
            num_workers=dataloader_num_workers,
            collate_fn=_collate_images,
            pin_memory=state.device.type == "cuda",
        )

        def batches():
            for batch in loader:
                skipped_here.extend((str(files[i]), reason) for i, reason in batch["skipped"])
                if batch["pixels"] is not None:
                    yield batch["pixels"], [posterior_seed(seed, i) for i in batch["indices"]]

        stats = estimate_latent_statistics(
            model, batches(), sample_posterior, accelerator=state, show_progress=show_progress, total=len(shard)
        )
        total = len(selected)
    skipped = gather_object(skipped_here) if world > 1 else skipped_here
    if stats.count == 0:
        source = cache_dir if cache_dir is not None else train_data_dir
        reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:5])
        raise ValueError(
            f"None of the {total} samples in {str(source)!r} could be used, nothing to measure."
            + (f" Skipped: {reasons}{' ...' if len(skipped) > 5 else ''}" if skipped else "")
        )
    return stats, skipped


def _cache_statistics(vae, subfolder, cache_dir, num_images, sample_posterior, seed, show_progress):
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    config = _current_config(str(vae), subfolder)
    dataset = LatentCacheDataset(cache_dir, sample_posterior=sample_posterior, seed=seed, scale=False)
    selected = _select(len(dataset), num_images, seed)
    shard = selected[state.process_index :: state.num_processes]
    stats = LatentStatistics(num_channels=config.get("latent_channels"), sample_posterior=sample_posterior)
    pending: list[torch.Tensor] = []
    for index in tqdm(shard, disable=not (show_progress and state.is_local_main_process), desc="Reading", unit="img"):
        latents = dataset[index]["latents"]
        # Buckets give latents of several sizes: batch consecutive ones of the same shape.
        if pending and pending[0].shape != latents.shape:
            stats.update(torch.stack(pending))
            pending = []
        pending.append(latents)
    if pending:
        stats.update(torch.stack(pending))
    return stats, len(selected)


def run_stats(
    vae: str,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    subfolder: str | None = None,
    num_images: int | None = None,
    resolution: int = 512,
    batch_size: int = 8,
    sample_posterior: bool = True,
    seed: int = 0,
    convention: str | None = None,
    write_config: bool = False,
    dtype: str = "float32",
    dataloader_num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`diffusers-vae stats` / `scripts/compute_scaling_factor.py`: measure, report and optionally write.

    Computes the statistics (`compute_latent_statistics`), and on the main process prints a table and one JSON
    line with the numbers and the VAE's current config values, and with `write_config` updates the VAE
    folder's `config.json` atomically (`write_latent_statistics`). `convention` defaults to the one the VAE's
    config already uses. Returns the JSON record (on every rank).
    """
    from accelerate import PartialState

    current = _current_config(vae, subfolder)
    convention = convention or scaling_convention(current)
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")
    if write_config and not (Path(vae) / (subfolder or "") / "config.json").is_file():
        raise ValueError(f"--write_config needs a local VAE folder with a config.json; {vae!r} is not one.")
    stats, skipped = compute_latent_statistics(
        vae,
        train_data_dir=train_data_dir,
        cache_dir=cache_dir,
        subfolder=subfolder,
        num_images=num_images,
        resolution=resolution,
        batch_size=batch_size,
        sample_posterior=sample_posterior,
        seed=seed,
        dtype=dtype,
        dataloader_num_workers=dataloader_num_workers,
        show_progress=show_progress,
    )
    record = stats.summary()
    record.update(
        convention=convention,
        config_updates=stats.config_updates(convention),
        current_config={
            key: current.get(key) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
        },
        skipped=len(skipped),
        source=str(train_data_dir if train_data_dir is not None else cache_dir),
        resolution=resolution if train_data_dir is not None else None,
    )
    state = PartialState()
    if state.is_main_process:
        if convention != scaling_convention(current):
            keys = ", ".join(k for k, v in record["config_updates"].items() if v is not None)
            print(
                f"Note: the VAE config uses the {scaling_convention(current)!r} convention, these numbers are for "
                f"{convention!r}: only pipelines that read {keys} apply them (see docs/scaling.md)."
            )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
        print(format_statistics_table(stats, current, skipped=len(skipped)))
        print(json.dumps(record))
        if write_config:
            folder = Path(vae) / (subfolder or "")
            changes = write_latent_statistics(folder, stats, convention)
            for key, (old, new) in changes.items():
                print(f"config.json: {key}: {old} -> {new}")
            print(f"Updated {folder / 'config.json'} ({convention} convention).")
    state.wait_for_everyone()
    return record


def format_statistics_table(
    stats: LatentStatistics, current: Mapping[str, Any] | None = None, skipped: int = 0
) -> str:
    """A human-readable table of `stats` next to the current config values."""
    current = current or {}
    kind = {True: "posterior samples", False: "posterior means", None: "latents"}[stats.sample_posterior]
    lines = [
        f"Latent statistics of {stats.num_images:,} images ({stats.count:,} latent elements per channel, {kind})"
        + (f", {skipped} skipped" if skipped else "")
    ]
    low, high = stats.scaling_factor_interval(0.95)
    relative = stats.scaling_factor_stderr / stats.scaling_factor

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)

    lines.append(f"{'':16}{'measured':>12}{'std. error':>13}{'current config':>16}")
    lines.append(
        f"{'scaling_factor':16}{stats.scaling_factor:>12.6g}{stats.scaling_factor_stderr:>13.2g}"
        f"{fmt(current.get('scaling_factor')):>16}   95% CI [{low:.6g}, {high:.6g}], {relative:.2%} relative"
    )
    lines.append(
        f"{'shift_factor':16}{stats.shift_factor:>12.6g}{stats.shift_factor_stderr:>13.2g}"
        f"{fmt(current.get('shift_factor')):>16}"
    )
    lines.append(f"{'std':16}{stats.std:>12.6g}")
    current_mean, current_std = current.get("latents_mean"), current.get("latents_std")
    lines.append(f"{'channel':16}{'mean':>12}{'std':>13}{'config mean':>16}{'config std':>14}")
    for c, (mean, std) in enumerate(zip(stats.channel_mean.tolist(), stats.channel_std.tolist())):
        config_mean = fmt(current_mean[c]) if current_mean and c < len(current_mean) else "-"
        config_std = fmt(current_std[c]) if current_std and c < len(current_std) else "-"
        lines.append(f"{c:<16}{mean:>12.6g}{std:>13.6g}{config_mean:>16}{config_std:>14}")
    if stats.num_images < 2 or relative != relative:
        lines.append("Note: at least 2 images are needed for a standard error; encode more images.")
    elif relative > 0.01:
        lines.append(f"Note: the factor is uncertain to {relative:.1%}; encode more images for a tighter estimate.")
    return "\n".join(lines)
