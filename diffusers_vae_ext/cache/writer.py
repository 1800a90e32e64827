"""`precompute_latents`: encode every unit of a source into a cache (folder or URL), then index it.

The run: check the inputs and the output (before any work), mark `cache.json` "building", process the units with
an engine, then (one process) rebuild the index from the unit manifests and mark the cache complete.

Engines run the same unit of work (`unit.py`):

- `local` (default): the units of this process (`units[rank::world]` under `accelerate launch`, on one machine or
  several sharing the output URL); DataLoader workers read, decode and resize whole units while the VAE encodes.
- `ray`: a Ray cluster (`ray_engine.py`): encoder actors, reading and decoding in Ray tasks, retries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..autoencoders import AutoencoderAdapter, as_autoencoder, load_autoencoder
from ..hardware import distributed_state
from ..optional import require, require_filesystem
from ..video import ClipOptions
from .context import UnitContext
from .format import (
    CACHE_FILE,
    DTYPE_NAMES,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_DIR,
    SHARDS_FILE,
    SKIPPED_FILE,
    UNIT_DIR,
    CacheMismatchError,
    CacheSettings,
    build_provenance,
    describe_mismatch,
    provenance_hash,
)
from .index import CacheSummary, write_index
from .sources import Source, VideoFolderSource, open_source
from .storage import CacheStore, storage_errors
from .unit import Encoder, ObjectWriter, encode_messages, read_unit

ENGINES = ("local", "ray")
# Samples per shard unless given: clips are tens of times larger than images.
DEFAULT_SHARD_SIZE = {"images": 512, "videos": 32}


def _resolve_vae(vae: Any, subfolder: str | None) -> AutoencoderAdapter:
    """The adapter of a loaded autoencoder, or of the one a folder / hub id names (`load_autoencoder`)."""
    if isinstance(vae, (torch.nn.Module, AutoencoderAdapter)):
        return as_autoencoder(vae)
    return load_autoencoder(vae, subfolder=subfolder or None)


def _identity(message: Any) -> Any:
    return message


class _UnitStream(IterableDataset):
    """The reader halves of this process's units; each DataLoader worker reads whole units (`[worker::workers]`)."""

    def __init__(self, source: Source, ctx: UnitContext, rank: int, world: int) -> None:
        self.source, self.ctx, self.rank, self.world = source, ctx, rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The unit listing is lazy (parquet footers are read file by file), so it is walked, not materialised.
        mine = (unit for i, unit in enumerate(self.source.units()) if i % self.world == self.rank)
        for j, unit in enumerate(mine):
            if j % workers == worker:
                yield from read_unit(self.source, unit, self.ctx)


def run_local_engine(
    source: Source,
    ctx: UnitContext,
    encoder: Encoder,
    rank: int,
    world: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Encode this process's units (`units[rank::world]`) with `num_workers` DataLoader workers reading them."""
    loader = DataLoader(
        _UnitStream(source, ctx, rank, world),
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=encoder.device.type == "cuda",
    )
    writer = ObjectWriter()
    units = 0
    unit = "clip" if source.kind == VideoFolderSource.kind else "img"
    try:
        with tqdm(desc="encoding", unit=unit, disable=not progress) as bar:
            for _ in encode_messages(loader, ctx, encoder, writer, on_samples=bar.update):
                units += 1
                bar.set_postfix(units=units, refresh=False)
        writer.wait()
    finally:
        writer.close()


def precompute_latents(
    vae: torch.nn.Module | AutoencoderAdapter | str | os.PathLike,
    output_dir: str | os.PathLike,
    train_data_dir: str | os.PathLike | None = None,
    dataset: Any = None,
    *,
    vae_subfolder: str | None = None,
    dataset_split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    resolution: int = 512,
    center_crop: bool = False,
    buckets: bool = False,
    flip: bool = False,
    max_upscale: float = 2.0,
    dtype: str = "fp32",
    batch_size: int = 8,
    num_workers: int = 2,
    shard_size: int | None = None,
    unit_size: int | None = None,
    clip_options: ClipOptions | None = None,
    image_sequences: bool = False,
    storage_options: dict[str, Any] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_num_encoders: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CacheSummary:
    """Encode images (folder, webdataset shards, parquet, a `datasets` dataset) or videos into a latent cache.

    An existing cache is finished or resumed. Any supported autoencoder class (`autoencoders.SUPPORTED_CLASSES`):
    posterior classes store the moments `cat([mean, logvar])`, deterministic ones (AutoencoderDC, AutoencoderTiny)
    their latents, once (the readers return them without a draw). Video autoencoders store 5-D moments
    (2C, T', h, w) of clips (images: T' = 1); image autoencoders given videos encode each frame as an image and
    store (2C, T, h, w), as `diffusers-vae stats` does.

    Args:
        vae: any supported autoencoder (ours, diffusers', or its `AutoencoderAdapter`), or a folder / hub id to
            load one from (`autoencoders.load_autoencoder`: the class its config names, safetensors only;
            `vae_subfolder`, detected automatically for a pipeline folder). `AutoencoderKL` loads ours (fast path).
        output_dir: the cache: a folder or an fsspec URL (`s3://bucket/cache`). An existing cache built with the
            same VAE and settings is resumed (units with a complete manifest are skipped); one built otherwise is
            refused (`CacheMismatchError`) unless `overwrite=True`, which deletes it first.
        train_data_dir: an image folder (recursive; captions from `metadata.jsonl` or sidecar `.txt`/`.caption`),
            webdataset `.tar` shards (brace pattern, glob, folder or prefix) or `.parquet` files, local or a URL;
            or a local folder of videos (`.mp4 .webm .mov .mkv`; image-sequence folders too), read as videos.
        dataset: a `datasets.Dataset`, a folder saved with `save_to_disk`, or a name for `datasets.load_dataset`
            (`dataset_split`).
        image_column, caption_column: the image and caption columns of a dataset or parquet files (default
            "image" / "text"); for a folder the `metadata.jsonl` key; for webdataset a member extension or json
            field (default `txt`, else the json's `caption` or `text`).
        resolution, center_crop, buckets, flip, max_upscale, dtype: see `CacheSettings`.
        batch_size: images per encoder call (all in one bucket).
        num_workers: DataLoader worker processes that read, decode and resize units while the VAE encodes
            (local engine).
        shard_size: about this many samples per `.safetensors` shard (whole batches); default 512 images or
            32 clips.
        unit_size: images (folder), videos (video folder) or rows (dataset) per unit of work; default
            `shard_size`. Tars and parquet row groups are units as they are.
        clip_options: how clips are cut from videos (`video.ClipOptions`: `num_frames`, `frame_stride` or `fps`,
            `max_frames`, `clips_per_video`); default `ClipOptions()` (one clip per video, as many frames as the
            autoencoder encodes exactly). A `num_frames` the autoencoder cannot encode is refused before any work.
        image_sequences: read `train_data_dir` as videos even without video files (folders of frames).
        storage_options: fsspec options for the input and output URLs (e.g. `{"endpoint_url": ...}`); by
            default credentials and endpoints come from the environment (`AWS_ENDPOINT_URL`, ...).
        engine: `"local"` (this process, or each process of `accelerate launch`) or `"ray"`.
        ray_address: the Ray cluster to join (`"auto"`, `"ray://host:10001"`); default: start a local one.
        ray_num_encoders: encoder actors (default: one per GPU, else one per two CPUs).
        progress: show tqdm progress bars (main process only).

    Returns a `CacheSummary` (its `str` is the summary line printed at the end).
    """
    from accelerate.utils import broadcast_object_list

    from ..modeling import weights_fingerprint

    start_time = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    state = distributed_state()
    main = state.is_main_process
    if engine == "ray" and state.num_processes > 1:
        raise ValueError("--engine ray runs from one driver process: start it with python, not accelerate launch.")
    settings = CacheSettings(resolution, center_crop, buckets, flip, max_upscale, dtype)  # checked before work
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}.")

    # Packages the output URL and the engine need, then the source (`open_source` checks the input's): a missing
    # package or input is found by listing, before a VAE is loaded or anything is written.
    require_filesystem(output_dir)
    if engine == "ray":
        require("ray", "--engine ray")
    with state.main_process_first():  # one process downloads / prepares a hub dataset, the others reuse it
        source = open_source(
            train_data_dir,
            dataset,
            dataset_split=dataset_split,
            image_column=image_column,
            caption_column=caption_column,
            unit_size=unit_size or shard_size or DEFAULT_SHARD_SIZE["images"],
            storage_options=storage_options,
            image_sequences=image_sequences,
        )
    adapter = _resolve_vae(vae, vae_subfolder)
    vae = adapter.vae.eval()
    factor = adapter.size_multiple
    bad_sides = sorted({side for b in settings.bucket_list() for side in b if side % factor})
    if bad_sides:
        raise ValueError(
            f"resolution {resolution}: target sides {bad_sides} are not divisible by {adapter.class_name}'s "
            f"{factor}: use a multiple of {factor}."
        )
    video = source.kind == VideoFolderSource.kind
    if video:
        clip_options = clip_options or ClipOptions()
        clip_options.check(adapter.frame_multiple, adapter.class_name)
        shard_size = shard_size or DEFAULT_SHARD_SIZE["videos"]
        if unit_size is None:  # units of as many videos as a shard holds clips (the listing is read lazily)
            source.unit_size = shard_size
    shard_size = shard_size or DEFAULT_SHARD_SIZE["images"]
    settings = dataclasses.replace(settings, video=clip_options if video else None)
    fingerprint = weights_fingerprint(vae)
    provenance = build_provenance(adapter, settings, fingerprint, DTYPE_NAMES[DTYPES[settings.dtype]])
    prov_hash = provenance_hash(provenance)
    store = CacheStore(output_dir, storage_options)

    # 1. Refuse a cache built otherwise (every process reads the same file, so all raise together).
    with storage_errors(store.url, "read"):
        cached = None if overwrite else store.get_json(CACHE_FILE)
    if cached is not None and cached.get("provenance_hash") != prov_hash:
        raise CacheMismatchError(describe_mismatch(cached.get("provenance", cached), provenance, store.url))
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "building",
        "provenance": provenance,
        "provenance_hash": prov_hash,
        "source": source.describe(),
        "files": {
            "index": INDEX_FILE,
            "skipped": SKIPPED_FILE,
            "shards": SHARD_DIR + "/",
            "shard_list": SHARDS_FILE,
            "units": UNIT_DIR + "/",
        },
        "batch_size": batch_size,
        "shard_size": shard_size,
    }
    prepared: list[Any] = [None]
    if main:
        try:
            if overwrite:
                store.remove_cache()
            store.prepare()  # fails here, before any work, without write permission
            # Readers refuse a cache whose status is not "complete", so the old index cannot be read mid-update.
            with storage_errors(store.url, "write to"):
                store.put_text(CACHE_FILE, json.dumps(info, indent=2))
            prepared = [uuid.uuid4().hex]  # this run's id: marks the manifests it writes
        except Exception as err:  # every process must leave the broadcast below, then all raise
            prepared = [err]
    prepared = broadcast_object_list(prepared)  # also the barrier after the main process prepared the output
    if isinstance(prepared[0], Exception):
        raise prepared[0]
    ctx = UnitContext(
        store=store,
        settings=settings,
        provenance=provenance,
        provenance_hash=prov_hash,
        batch_size=batch_size,
        shard_size=shard_size,
        in_channels=adapter.in_channels,
        run_id=prepared[0],
        frame_multiple=adapter.frame_multiple,
    )

    # 2. The units.
    if engine == "ray":
        from .ray_engine import run_ray_engine

        run_ray_engine(source, ctx, vae, address=ray_address, num_encoders=ray_num_encoders, progress=progress)
    else:
        encoder = Encoder(vae, state.device, settings)
        run_local_engine(
            source, ctx, encoder, state.process_index, state.num_processes, num_workers, progress and main
        )
    state.wait_for_everyone()

    # 3. The main process writes the index from the manifests.
    result: list[Any] = [None]
    if main:
        try:
            summary = write_index(store, source.units(), info, prov_hash, ctx.run_id, progress)
            summary.seconds = time.perf_counter() - start_time
            result = [summary]
        except Exception as err:  # every process must leave the broadcast below, then all raise
            result = [err]
    result = broadcast_object_list(result)
    if isinstance(result[0], Exception):
        raise result[0]
    summary = result[0]
    if main:
        print(summary, flush=True)
    return summary
