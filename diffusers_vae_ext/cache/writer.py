"""`precompute_latents`: scan, plan, encode and write shards, then the index; resumable and exact across processes."""

from __future__ import annotations

import copy
import io
import json
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import UnreadableImageError, load_image_rgb, pil_to_tensor, resize_and_crop, to_model_channels
from .format import (
    CACHE_FILE,
    DTYPE_NAMES,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_DIR,
    SKIPPED_FILE,
    CacheMismatchError,
    CacheSettings,
    build_provenance,
    canonical_json,
    describe_mismatch,
    provenance_hash,
)
from .plan import PlannedSample, PlannedShard, expected_samples, plan_shards
from .sources import ScanDataset, content_hash, open_source
from .storage import (
    read_shard_headers,
    remove_cache_files,
    remove_temp_files,
    write_jsonl,
    write_shard,
    write_text_atomic,
)


class _PixelDataset(Dataset):
    """Decodes, converts, (flips,) resizes and crops one planned sample in a DataLoader worker."""

    def __init__(self, source: Any, items: list[PlannedSample], center_crop: bool, in_channels: int):
        self.source, self.items, self.center_crop, self.in_channels = source, items, center_crop, in_channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        try:
            data, _ = self.source.read(item.index)
        except (OSError, UnreadableImageError) as err:
            return {"position": position, "skip": ("unreadable", f"cannot read: {getattr(err, 'reason', err)}")}
        if content_hash(data) != item.content_hash:
            return {"position": position, "skip": ("changed", "the file changed while caching; rerun to cache it")}
        try:
            image = load_image_rgb(io.BytesIO(data))
            if item.flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            original_size = (image.height, image.width)
            crop, (top, left) = resize_and_crop(image, item.bucket, center_crop=self.center_crop)
            pixels = to_model_channels(pil_to_tensor(crop), self.in_channels)
        except UnreadableImageError as err:
            return {"position": position, "skip": ("unreadable", err.reason)}
        except Exception as err:  # a decoder bug on one odd file must not stop a long run; it is reported
            return {"position": position, "skip": ("unreadable", f"{type(err).__name__}: {err}")}
        return {"position": position, "pixels": pixels, "original_size": original_size, "crop": (top, left)}


def _collate(results: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in results if "pixels" in r]
    return {
        "pixels": torch.stack([r.pop("pixels") for r in good]) if good else None,
        "good": good,
        "failed": [r for r in results if "skip" in r],
    }


@dataclass
class CacheSummary:
    """What a `precompute_latents` run left on disk."""

    output_dir: str
    cached: int = 0
    new: int = 0
    resumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    stale: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        by_kind = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items()))
        line = (
            f"latent cache {self.output_dir}: cached {self.cached} samples ({self.new} encoded now, "
            f"{self.resumed} resumed), skipped {skipped}{f' ({by_kind})' if by_kind else ''}"
        )
        if self.stale:
            line += f"; {self.stale} entries of changed or removed sources are no longer indexed"
        return line + f" [{self.seconds:.1f} s]"


def _resolve_vae(vae: Any, subfolder: str | None) -> torch.nn.Module:
    if isinstance(vae, torch.nn.Module):
        return vae
    from ..modeling import AutoencoderKL

    path = Path(vae)
    if subfolder is None and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        subfolder = "vae"  # a pipeline folder
    return AutoencoderKL.from_pretrained(vae, subfolder=subfolder or "")


class _Encoder:
    """Encodes batches to moments in the storage dtype; re-encodes non-finite samples alone in float32."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, settings: CacheSettings):
        self.storage_dtype = self.encode_dtype = DTYPES[settings.dtype]
        # The weights as loaded, kept aside before the cast, for the float32 re-encode of non-finite samples.
        self._fp32_source = copy.deepcopy(vae).cpu() if self.encode_dtype != torch.float32 else None
        self._fp32_vae: torch.nn.Module | None = None
        if next(vae.parameters()).dtype != self.encode_dtype:
            # Not `.to(dtype)`: diffusers' override warns about fp32-pinned modules even when there are none.
            vae = {torch.float16: vae.half, torch.bfloat16: vae.bfloat16, torch.float32: vae.float}[
                self.encode_dtype
            ]()
        self.vae = vae.to(device=device).eval()
        self.device = device

    @torch.no_grad()
    def _moments(self, vae: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        posterior = vae.encode(pixels.to(self.device, dtype=dtype, non_blocking=True)).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1).to(self.storage_dtype).cpu()

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Moments (N, 2C, h, w) and, per sample, None (fine), "float32" (re-encoded) or "non_finite"."""
        moments = self._moments(self.vae, pixels, self.encode_dtype)
        finite = torch.isfinite(moments).flatten(1).all(dim=1)
        status: list[str | None] = [None] * len(moments)
        for j in torch.nonzero(~finite).flatten().tolist():
            retried = self._moments(self._fallback_vae(), pixels[j : j + 1], torch.float32)
            if torch.isfinite(retried).all():
                moments[j] = retried[0]
                status[j] = "float32"
            else:
                status[j] = "non_finite"
        return moments, status

    def _fallback_vae(self) -> torch.nn.Module:
        if self._fp32_source is None:
            return self.vae  # already float32
        if self._fp32_vae is None:
            self._fp32_vae = self._fp32_source.float().to(self.device).eval()
        return self._fp32_vae


def precompute_latents(
    vae: torch.nn.Module | str | os.PathLike,
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
    shard_size: int = 512,
    overwrite: bool = False,
    progress: bool = True,
) -> CacheSummary:
    """Encode an image folder or a `datasets` dataset into a latent cache at `output_dir` (or finish one).

    Args:
        vae: an `AutoencoderKL` (ours or diffusers'), or a folder / hub id to load one from (`vae_subfolder`,
            detected automatically for a pipeline folder).
        output_dir: the cache folder. An existing cache built with the same VAE and settings is resumed: only
            samples not yet in a complete shard are encoded; one built otherwise is refused (`CacheMismatchError`)
            unless `overwrite=True`, which deletes it first.
        train_data_dir: an image folder (recursive; captions from `metadata.jsonl` or sidecar `.txt`/`.caption`).
        dataset: a `datasets.Dataset`, a folder saved with `save_to_disk`, or a name for `datasets.load_dataset`
            (`dataset_split`); `image_column` / `caption_column` default to "image" / "text" when present.
        resolution, center_crop, buckets, flip, max_upscale, dtype: see `CacheSettings`.
        batch_size: images per encoder call (all in one bucket).
        num_workers: DataLoader worker processes that read, decode and resize while the VAE encodes.
        shard_size: about this many samples per `.safetensors` shard (whole batches).
        progress: show tqdm progress bars (main process only).

    Runs unchanged under `accelerate launch`: every process scans a slice of the inputs, all agree on one plan,
    each encodes and writes the shards assigned to it, and the main process writes the index after a barrier.
    Returns a `CacheSummary` (its `str` is the summary line printed at the end).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    from ..modeling import weights_fingerprint

    start_time = time.perf_counter()
    state = PartialState()
    main = state.is_main_process
    output_dir = Path(output_dir)
    shard_dir = output_dir / SHARD_DIR
    settings = CacheSettings(resolution, center_crop, buckets, flip, max_upscale, dtype)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}.")

    vae = _resolve_vae(vae, vae_subfolder).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    bad_sides = sorted({side for b in settings.bucket_list() for side in b if side % factor})
    if bad_sides:
        raise ValueError(f"resolution {resolution}: target sides {bad_sides} are not divisible by the VAE's {factor}.")
    fingerprint = weights_fingerprint(vae)
    encoder = _Encoder(vae, state.device, settings)
    provenance = build_provenance(vae, settings, fingerprint, DTYPE_NAMES[encoder.encode_dtype])
    with state.main_process_first():  # one process downloads / prepares a hub dataset, the others reuse it
        source = open_source(train_data_dir, dataset, dataset_split, image_column, caption_column)

    # 1. Refuse a cache built otherwise (every process reads the same file, so all raise together).
    if not overwrite and (output_dir / CACHE_FILE).is_file():
        cached = json.loads((output_dir / CACHE_FILE).read_text(encoding="utf-8"))
        if cached.get("provenance_hash") != provenance_hash(provenance):
            raise CacheMismatchError(describe_mismatch(cached.get("provenance", cached), provenance, output_dir))
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "building",
        "provenance": provenance,
        "provenance_hash": provenance_hash(provenance),
        "source": source.describe(),
        "files": {"index": INDEX_FILE, "skipped": SKIPPED_FILE, "shards": SHARD_DIR + "/"},
        "batch_size": batch_size,
    }
    if main:
        if overwrite:
            remove_cache_files(output_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_files(output_dir)
        # Readers refuse a cache whose status is not "complete", so the old index cannot be read mid-update.
        write_text_atomic(output_dir / CACHE_FILE, json.dumps(info, indent=2))
    state.wait_for_everyone()

    # 2. Scan: each process hashes and probes a strided slice of the sorted inputs; all gather the records.
    mine = list(range(state.process_index, len(source), state.num_processes))
    scan = ScanDataset(source, mine, settings)
    local_records = []
    # Threads, not worker processes: reading and hashing release the GIL, and threads start instantly.
    with (
        ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool,
        tqdm(total=len(mine), desc="scanning", unit="img", disable=not (progress and main)) as bar,
    ):
        for record in pool.map(scan.__getitem__, range(len(scan))):
            local_records.append(record)
            bar.update(1)
    records = sorted(gather_object(local_records), key=lambda r: r["index"])
    expected = expected_samples(records, flip)

    # 3. What complete shards already hold (the main process reads, everyone gets the same answer).
    done_message: list[Any] = [None]
    if main:
        try:
            done = set()
            for _, header in read_shard_headers(shard_dir, provenance):
                done.update(s["id"] for s in header["samples"])
                done.update(s["id"] for s in header["skipped"])
            done_message = [{"done": done}]
        except (CacheMismatchError, ValueError) as err:
            done_message = [{"error": err}]
    done_message = broadcast_object_list(done_message)
    if "error" in done_message[0]:
        raise done_message[0]["error"]
    done_before: set[str] = done_message[0]["done"]

    # 4. One plan for everyone; whole shards go round-robin to the processes.
    shards = plan_shards(expected, done_before, batch_size, max(1, round(shard_size / batch_size)))
    my_shards = shards[state.process_index :: state.num_processes]
    loader_kwargs = {"num_workers": num_workers, "prefetch_factor": 4} if num_workers > 0 else {"num_workers": 0}
    _encode_shards(my_shards, source, settings, encoder, provenance, shard_dir, loader_kwargs, progress and main)
    state.wait_for_everyone()

    # 5. The main process writes the index from the complete shards, for the samples the inputs hold now.
    result: list[Any] = [None]
    if main:
        try:
            summary = _write_index(output_dir, info, records, expected, done_before, provenance)
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


def _encode_shards(
    shards: list[PlannedShard],
    source: Any,
    settings: CacheSettings,
    encoder: _Encoder,
    provenance: dict,
    shard_dir: Path,
    loader_kwargs: dict,
    progress: bool,
) -> None:
    items = [sample for shard in shards for batch in shard.batches for sample in batch]
    batch_positions, batch_shard, position = [], [], 0
    for shard_number, shard in enumerate(shards):
        for batch in shard.batches:
            batch_positions.append(list(range(position, position + len(batch))))
            batch_shard.append(shard_number)
            position += len(batch)
    if not items:
        return
    dataset = _PixelDataset(source, items, settings.center_crop or settings.buckets, encoder.vae.config.in_channels)
    loader = DataLoader(
        dataset,
        batch_sampler=batch_positions,
        pin_memory=encoder.device.type == "cuda",
        collate_fn=_collate,
        **loader_kwargs,
    )
    common_metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "provenance": canonical_json(provenance),
        "provenance_hash": provenance_hash(provenance),
    }
    tensors: dict[str, torch.Tensor] = {}
    samples: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    pending: Future | None = None
    with (
        ThreadPoolExecutor(max_workers=1) as writer,
        tqdm(total=len(items), desc="encoding", unit="img", disable=not progress) as bar,
    ):
        for batch_number, batch in enumerate(loader):
            for failure in batch["failed"]:
                item = items[failure["position"]]
                kind, reason = failure["skip"]
                skipped.append({"id": item.id, "source": item.source, "kind": kind, "reason": reason})
            if batch["pixels"] is not None:
                moments, status = encoder(batch["pixels"])
                for good, sample_moments, sample_status in zip(batch["good"], moments, status):
                    item = items[good["position"]]
                    if sample_status == "non_finite":
                        reason = "NaN/Inf latents, also when re-encoded in float32"
                        skipped.append({"id": item.id, "source": item.source, "kind": "non_finite", "reason": reason})
                        continue
                    tensors[item.id] = sample_moments.contiguous()
                    samples.append(
                        {
                            "id": item.id,
                            "key": item.id,
                            "source": item.source,
                            "caption": item.caption,
                            "original_size": list(good["original_size"]),
                            "crop_coords_top_left": list(good["crop"]),
                            "target_size": list(item.bucket),
                            "bucket": list(item.bucket),
                            "flip": item.flip,
                            "shape": list(sample_moments.shape),
                            "encode_dtype": sample_status or provenance["moments"]["encode_dtype"],
                        }
                    )
            bar.update(len(batch["good"]) + len(batch["failed"]))
            last_of_shard = (
                batch_number + 1 == len(batch_shard) or batch_shard[batch_number + 1] != batch_shard[batch_number]
            )
            if last_of_shard:
                shard = shards[batch_shard[batch_number]]
                metadata = {**common_metadata, "samples": json.dumps(samples), "skipped": json.dumps(skipped)}
                if pending is not None:
                    pending.result()  # one write in flight at most: bounded memory, errors surface here
                pending = writer.submit(write_shard, shard_dir / f"{shard.name}.safetensors", tensors, metadata)
                tensors, samples, skipped = {}, [], []
        if pending is not None:
            pending.result()


def _write_index(
    output_dir: Path,
    info: dict[str, Any],
    records: list[dict[str, Any]],
    expected: list[PlannedSample],
    done_before: set[str],
    provenance: dict,
) -> CacheSummary:
    cached: dict[str, dict[str, Any]] = {}
    shard_skips: dict[str, dict[str, Any]] = {}
    for path, header in read_shard_headers(output_dir / SHARD_DIR, provenance):
        shard = f"{SHARD_DIR}/{path.name}"
        for sample in header["samples"]:
            cached.setdefault(sample["id"], {**sample, "shard": shard})
        for skip in header["skipped"]:
            shard_skips.setdefault(skip["id"], skip)

    index_rows, skipped_rows, missing = [], [], []
    captions = {s.id: s.caption for s in expected}
    for sample in expected:
        if sample.id in cached:
            # Geometry comes from the shard (what was encoded), the caption from the inputs as they are now.
            index_rows.append({**cached[sample.id], "caption": captions[sample.id]})
        elif sample.id in shard_skips:
            skipped_rows.append({k: shard_skips[sample.id][k] for k in ("id", "source", "kind", "reason")})
        else:
            missing.append(sample.id)
    if missing:
        raise RuntimeError(
            f"{len(missing)} samples are in no complete shard (first: {missing[:3]}); rerun the same command."
        )
    for record in records:
        if record["skip"] is not None:
            skipped_rows.append({"id": record["id"], "source": record["source"], **record["skip"]})
    skipped_rows.sort(key=lambda row: (row["source"], row["id"] or ""))

    expected_ids = set(captions)
    summary = CacheSummary(
        output_dir=str(output_dir),
        cached=len(index_rows),
        resumed=sum(1 for row in index_rows if row["id"] in done_before),
        skipped=dict(Counter(row["kind"] for row in skipped_rows)),
        stale=sum(1 for sample_id in cached if sample_id not in expected_ids),
    )
    summary.new = summary.cached - summary.resumed
    write_jsonl(output_dir / INDEX_FILE, index_rows)
    write_jsonl(output_dir / SKIPPED_FILE, skipped_rows)
    counts = {"samples": summary.cached, "skipped": len(skipped_rows), "stale_entries": summary.stale}
    write_text_atomic(output_dir / CACHE_FILE, json.dumps({**info, "status": "complete", "counts": counts}, indent=2))
    return summary
