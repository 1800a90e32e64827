"""Latent statistics of data: `diffusers-vae stats` over images, videos or an existing latent cache.

`compute_latent_statistics` encodes an image folder or a folder of videos (clips cut as `video.ClipOptions` says;
image-sequence folders too) with any supported autoencoder (`autoencoders.load_autoencoder`), or reads a latent
cache, into a `diffusers_vae_ext.scaling.LatentStatistics`, exactly the same under `accelerate launch` as in one
process. The independent units of the standard errors are images and clips (a clip's frames are correlated).
`run_stats` prints the table and JSON line and optionally writes the numbers where that class's pipelines read
them (`conventions.write_pipeline_statistics`: config keys, or weights for LTX-Video and FLUX.2). This module sits
above `scaling`/`conventions` (conventions, the accumulator), `autoencoders`, `video` and `cache` (the reader).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from .autoencoders import AutoencoderAdapter, load_autoencoder
from .cache import LatentCacheDataset, load_cache_info
from .conventions import (
    allowed_conventions,
    pipeline_convention,
    pipeline_statistics_updates,
    write_pipeline_statistics,
)
from .data import (
    UnreadableImageError,
    list_image_files,
    load_image_rgb,
    pil_to_tensor,
    resize_and_crop,
    to_model_channels,
)
from .hardware import distributed_state
from .optional import require, require_filesystem
from .scaling import LatentStatistics, posterior_seed
from .video import ClipOptions, VideoError, clips_from_file, has_videos, list_videos, load_clip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class _VideoShard(torch.utils.data.Dataset):
    """Videos `sources[i]` for i in `indices`, cut into clips (frames centre-cropped to `resolution`).

    Items are `(index, [(clip number, pixels (C, T, H, W)), ...], skip reason or None)`.
    """

    def __init__(
        self,
        sources: Sequence[Path],
        indices: Sequence[int],
        resolution: int,
        channels: int,
        options: ClipOptions,
        frame_multiple: int,
    ):
        self.sources, self.indices, self.resolution, self.channels = sources, indices, resolution, channels
        self.options, self.frame_multiple = options, frame_multiple

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, list[tuple[int, torch.Tensor]], str | None]:
        index = self.indices[position]
        size = (self.resolution, self.resolution)
        try:
            clips = clips_from_file(self.sources[index], self.options, self.frame_multiple)
            pixels = [(clip.index, to_model_channels(load_clip(clip, size), self.channels)) for clip in clips]
        except VideoError as err:
            return index, [], f"{err.kind}: {err.reason}"
        return index, pixels, None


def _first_item(items: list[Any]) -> Any:
    return items[0]  # one video per loader item: its clips are batched after decoding


def _clip_seed(seed: int, index: int, clip: int) -> int:
    """Posterior-noise seed of clip `clip` of video `index`, independent of batching and sharding."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index, clip]).generate_state(1, dtype=np.uint64)[0])


def _patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C * p * p, h / p, w / p), channel `c * p * p + dy * p + dx` (FLUX.2's pipelines)."""
    n, c, h, w = latents.shape
    latents = latents.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(n, c * patch * patch, h // patch, w // patch)


@torch.no_grad()
def adapter_latents(
    adapter: AutoencoderAdapter, pixels: torch.Tensor, sample_posterior: bool | None, seeds: Sequence[int]
) -> torch.Tensor:
    """Raw latents of `pixels` (already shaped for the adapter): posterior draws, one seeded CPU generator per row
    (as `scaling.encode_latents`), posterior means, or the deterministic latents of classes without a posterior.
    """
    moments = adapter.encode_moments(pixels)
    if not adapter.has_posterior:
        return moments
    mean, logvar = moments.chunk(2, dim=1)
    if not sample_posterior:
        return mean
    if len(seeds) != mean.shape[0]:
        raise ValueError(f"Got {len(seeds)} seeds for {mean.shape[0]} samples.")
    noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


def _statistics_units(adapter: AutoencoderAdapter, latents: torch.Tensor, frames: int | None) -> torch.Tensor:
    """Latents laid out as the pipelines normalise them, one row per independent unit (image or clip)."""
    if frames is not None and not adapter.is_video:
        # An image autoencoder encoded a clip's frames as a batch: back to one clip per row (N, C, T, h, w).
        latents = latents.unflatten(0, (-1, frames)).transpose(1, 2)
    patch = adapter.convention.latents_patch_size
    if patch > 1:
        latents = _patchify(latents, patch)
    return latents


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
    clip_options: ClipOptions | None = None,
    image_sequences: bool = False,
) -> tuple[LatentStatistics, list[tuple[str, str]]]:
    """Latent statistics of an image or video folder (encoded with the autoencoder at `vae`) or of a latent cache.

    `vae` is any supported autoencoder folder (`autoencoders.load_autoencoder`). `train_data_dir` holding video
    files (or, with `image_sequences`, folders of frames) is read as videos: each video gives up to
    `clip_options.clips_per_video` clips (`video.ClipOptions`), each clip one unit of the statistics, its frames
    centre-cropped to `resolution`; videos that give no clip are skipped with the reason. Video autoencoders see
    images as one-frame videos and image autoencoders see a clip's frames as images. Deterministic autoencoders
    (no posterior) give statistics of their latents whatever `sample_posterior` says. For FLUX.2 the statistics
    are of the 2x2-patchified latents its pipelines normalise.

    Works unchanged under `accelerate launch`: each process takes the disjoint shard `samples[rank::world]`
    (no padding, no duplicates), posterior noise is seeded per sample (`posterior_seed(seed, index)`, per clip
    `(seed, index, clip)`), and the shards' statistics are merged in rank order, so N processes give the result
    of one. `num_images` picks a seeded random subset of the images or videos (the same on every rank).

    Returns the merged statistics (on every rank) and the skipped `(path, reason)` pairs of all ranks. Raises
    `ValueError` when there is nothing to measure (empty folder, no readable image, no usable clip).
    """

    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    if (train_data_dir is None) == (cache_dir is None):
        raise ValueError("Give exactly one of --train_data_dir (images or videos) or --cache_dir (a latent cache).")
    state = distributed_state()
    rank, world = state.process_index, state.num_processes
    skipped_here: list[tuple[str, str]] = []
    if cache_dir is not None:
        stats, total = _cache_statistics(vae, subfolder, cache_dir, num_images, sample_posterior, seed, show_progress)
        stats.all_reduce(state)
    else:
        videos = _has_video_files(train_data_dir) or image_sequences  # PyAV checked before the model is loaded
        adapter = load_autoencoder(vae, subfolder=subfolder or None, torch_dtype=DTYPES[dtype])
        adapter.vae.to(state.device).eval().requires_grad_(False)
        factor = adapter.size_multiple
        if resolution < factor or resolution % factor:
            raise ValueError(f"--resolution must be a positive multiple of the VAE's downsampling factor {factor}.")
        label = sample_posterior if adapter.has_posterior else None
        if videos:
            options = clip_options or ClipOptions()
            options.check(adapter.frame_multiple, adapter.class_name)
            files = list_videos(train_data_dir)
        else:
            files = list_image_files(train_data_dir)
        selected = _select(len(files), num_images, seed)
        if videos:
            shard = _VideoShard(
                files, selected[rank::world], resolution, adapter.in_channels, options, adapter.frame_multiple
            )
        else:
            shard = _ImageShard(files, selected[rank::world], resolution, adapter.in_channels)
        loader = torch.utils.data.DataLoader(
            shard,
            batch_size=1 if videos else batch_size,
            num_workers=dataloader_num_workers,
            collate_fn=_first_item if videos else _collate_images,
            pin_memory=state.device.type == "cuda",
        )
        stats = LatentStatistics(num_channels=None, sample_posterior=label)

        def add(pixels: torch.Tensor, seeds: list[int], frames: int | None) -> None:
            latents = adapter_latents(adapter, pixels, sample_posterior, seeds)
            stats.update(_statistics_units(adapter, latents, frames))

        is_main = state.is_local_main_process
        unit = "video" if videos else "img"
        with tqdm(total=len(shard), disable=not (show_progress and is_main), desc="Encoding", unit=unit) as bar:
            for batch in loader:
                if videos:
                    index, clips, reason = batch
                    if reason is not None:
                        skipped_here.append((str(files[index]), reason))
                    for start in range(0, len(clips), batch_size):
                        for number, pixels in clips[start : start + batch_size]:
                            frames = pixels.shape[1]
                            if adapter.is_video:
                                add(pixels[None], [_clip_seed(seed, index, number)], frames)
                            else:  # frames as images, one noise seed per frame
                                seeds = [_clip_seed(seed, index, number * 100_000 + t) for t in range(frames)]
                                add(pixels.transpose(0, 1), seeds, frames)
                else:
                    skipped_here.extend((str(files[i]), reason) for i, reason in batch["skipped"])
                    if batch["pixels"] is not None:
                        pixels = batch["pixels"].unsqueeze(2) if adapter.is_video else batch["pixels"]
                        add(pixels, [posterior_seed(seed, i) for i in batch["indices"]], None)
                bar.update(1 if videos else len(batch["indices"]) + len(batch["skipped"]))
        stats.all_reduce(state)
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

    from tqdm.auto import tqdm

    state = distributed_state()
    config = _current_config(str(vae), subfolder)
    dataset = LatentCacheDataset(cache_dir, sample_posterior=sample_posterior, seed=seed, scale=False)
    selected = _select(len(dataset), num_images, seed)
    shard = selected[state.process_index :: state.num_processes]
    class_name = config.get("_class_name", "AutoencoderKL")
    patch = pipeline_convention(class_name, config).latents_patch_size
    stats = LatentStatistics(sample_posterior=sample_posterior)
    pending: list[torch.Tensor] = []
    for index in tqdm(shard, disable=not (show_progress and state.is_local_main_process), desc="Reading", unit="img"):
        latents = dataset[index]["latents"]
        if patch > 1:  # FLUX.2: statistics of the patchified latents its pipelines normalise
            latents = _patchify(latents[None], patch)[0]
        # Buckets give latents of several sizes: batch consecutive ones of the same shape.
        if pending and pending[0].shape != latents.shape:
            stats.update(torch.stack(pending))
            pending = []
        pending.append(latents)
    if pending:
        stats.update(torch.stack(pending))
    return stats, len(selected)


def _current_values(vae: str, subfolder: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The class name, config, and the scaling values its pipelines use now (weights included), as plain lists."""
    config = _current_config(vae, subfolder)
    name = config.get("_class_name", "AutoencoderKL")
    if pipeline_convention(name, config).statistics_in != "weights":
        return (
            name,
            config,
            {k: config.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")},
        )
    values = load_autoencoder(vae, subfolder=subfolder or None).scaling_config()
    current = {key: values.get(key) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    for key in ("latents_mean", "latents_std"):
        if isinstance(current[key], torch.Tensor):
            current[key] = current[key].tolist()
    return name, config, current


def _has_video_files(train_data_dir: str | os.PathLike) -> bool:
    """Whether the folder holds video files; then PyAV must be installed (the install hint otherwise). Frame
    folders (image sequences) are read with PIL and need no PyAV."""
    found = has_videos(train_data_dir)
    if found:
        require("av", f"the videos in {str(train_data_dir)!r}")
    return found


def _counts_clips(train_data_dir: str | None, cache_dir: str | None, image_sequences: bool) -> bool:
    """Whether the samples are video clips: a video folder, or a latent cache built from one."""
    if train_data_dir is not None:
        return image_sequences or has_videos(train_data_dir)
    return load_cache_info(cache_dir)["provenance"]["preprocessing"].get("video") is not None


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
    clip_options: ClipOptions | None = None,
    image_sequences: bool = False,
) -> dict[str, Any]:
    """`diffusers-vae stats` / `scripts/compute_scaling_factor.py`: measure, report and optionally write.

    Computes the statistics (`compute_latent_statistics`), and on the main process prints a table and one JSON
    line with the numbers and the autoencoder's current values, and with `write_config` writes them where the
    class's pipelines read them (`conventions.write_pipeline_statistics`: config.json keys, or the weights for
    LTX-Video and FLUX.2; each file replaced atomically). `convention` defaults to the one the pipelines of the
    class (for AutoencoderKL: its config) already use; classes whose pipelines fix it refuse another. Returns the
    JSON record (on every rank).
    """

    # Optional packages first: the install hint before a config or a model is read.
    if train_data_dir is not None:
        _has_video_files(train_data_dir)
    if cache_dir is not None:
        require_filesystem(cache_dir)
    if (
        subfolder is None
        and not (Path(vae) / "config.json").is_file()
        and (Path(vae) / "vae" / "config.json").is_file()
    ):
        subfolder = "vae"  # a pipeline folder
    class_name, config, current = _current_values(vae, subfolder)
    allowed = allowed_conventions(class_name, config)
    current_convention = allowed[0]
    convention = convention or current_convention
    if convention not in allowed:
        raise ValueError(
            f"{class_name}'s pipelines apply the {allowed[0]!r} convention"
            + (f" (or {', '.join(repr(c) for c in allowed[1:])})" if len(allowed) > 1 else "")
            + f"; --convention {convention} would write keys they do not read. Drop --convention."
        )
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
        clip_options=clip_options,
        image_sequences=image_sequences,
    )
    config_updates, weight_updates = pipeline_statistics_updates(class_name, config, stats, convention)
    record = stats.summary()
    record.update(
        autoencoder=class_name,
        convention=convention,
        config_updates=config_updates,
        weight_updates=weight_updates,
        current_config=current,
        skipped=len(skipped),
        source=str(train_data_dir if train_data_dir is not None else cache_dir),
        resolution=resolution if train_data_dir is not None else None,
        unit="clip" if _counts_clips(train_data_dir, cache_dir, image_sequences) else "image",
    )
    state = distributed_state()
    if state.is_main_process:
        if convention != current_convention:
            keys = ", ".join(k for k, v in config_updates.items() if v is not None)
            print(
                f"Note: the VAE config uses the {current_convention!r} convention, these numbers are for "
                f"{convention!r}: only pipelines that read {keys} apply them (see docs/scaling.md)."
            )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
        unit = "clips" if record["unit"] == "clip" else "images"
        print(format_statistics_table(stats, current, skipped=len(skipped), unit=unit))
        patch = pipeline_convention(class_name, config).latents_patch_size
        if patch > 1:
            print(
                f"Note: {class_name}'s pipelines normalise {patch}x{patch}-patchified latents: channel "
                f"c * {patch * patch} + dy * {patch} + dx above is latent channel c at patch position (dy, dx)."
            )
        print(json.dumps(record))
        if write_config:
            folder = Path(vae) / (subfolder or "")
            changes = write_pipeline_statistics(folder, class_name, stats, convention)
            for key, (old, new) in changes.items():
                where = "weights" if key in weight_updates else "config.json"
                print(f"{where}: {key}: {_short(old)} -> {_short(new)}")
            print(f"Updated {folder} ({convention} convention, as {class_name}'s pipelines read it).")
    state.wait_for_everyone()
    return record


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(f'{v:.6g}' for v in value[:4])}, ... ({len(value)} values)]"
    return str(value)


def format_statistics_table(
    stats: LatentStatistics, current: Mapping[str, Any] | None = None, skipped: int = 0, unit: str = "images"
) -> str:
    """A human-readable table of `stats` next to the current config values (`unit`: what a row is, e.g. clips)."""
    current = current or {}
    kind = {True: "posterior samples", False: "posterior means", None: "latents"}[stats.sample_posterior]
    lines = [
        f"Latent statistics of {stats.num_images:,} {unit} ({stats.count:,} latent elements per channel, {kind})"
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
        lines.append(f"Note: at least 2 {unit} are needed for a standard error; encode more {unit}.")
    elif relative > 0.01:
        lines.append(f"Note: the factor is uncertain to {relative:.1%}; encode more {unit} for a tighter estimate.")
    return "\n".join(lines)
