"""The unit of work: one input shard -> its output shards and its manifest. Both engines run exactly this.

A unit is processed in two halves that may run in different processes (a DataLoader worker and the main process,
a Ray task and an encoder actor), connected by a stream of small picklable messages:

- `read_unit` (reader side): checks the unit's manifest (a complete unit with the same input is skipped), reads
  the items, hashes them (ids), probes their size (bucket, too small), expands each into samples
  (`plan_image`; a video into its clips with `clips.plan_video`), reuses the latents of samples the unit's
  previous version already held, forms batches within buckets (`plan.BucketBatcher`) and decodes them to pixels
  (images (B, C, H, W), clips (B, C, T, H, W));
- `encode_messages` (writer side): encodes the batches (`Encoder`, any autoencoder class through its adapter),
  fills shards of about `shard_size` samples,
  publishes each whole (`CacheStore.put_shard`), and publishes the unit's manifest last. The manifest is the
  unit's completion mark and the source of truth for resume and for the index: a unit without one is redone from
  scratch, and since its objects are named from the unit name, the provenance and the input's signature, a
  retried or duplicated unit overwrites the same objects with the same bytes.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from ..autoencoders import AutoencoderAdapter, as_autoencoder
from ..data import UnreadableImageError, load_image_rgb, pil_to_tensor, resize_and_crop, to_model_channels
from .clips import decode_clips, plan_video
from .context import UnitContext
from .format import DTYPES, FORMAT_NAME, FORMAT_VERSION, CacheSettings, manifest_name, part_name
from .plan import BucketBatcher, PlannedSample, choose_bucket, expand_image, skip_entry
from .sources import Source, SourceItem, Unit, VideoFolderSource, content_hash, probe_size, read_unit_items
from .storage import CacheStore


@dataclass
class UnitResult:
    """What happened to one unit (the engines sum these for the progress bar; the index counts from manifests)."""

    unit: str
    resumed: bool
    samples: int = 0
    encoded: int = 0
    reused: int = 0
    skipped: int = 0
    dropped: int = 0


_skip = skip_entry


def _record(sample: PlannedSample, original_size, crop, shape, encode_dtype: str) -> dict[str, Any]:
    return {
        "id": sample.id,
        "key": sample.id,
        "source": sample.source,
        "caption": sample.caption,
        "original_size": list(original_size),
        "crop_coords_top_left": list(crop),
        "target_size": list(sample.bucket[-2:]),
        "bucket": list(sample.bucket),
        "flip": sample.flip,
        "shape": list(shape),
        "encode_dtype": encode_dtype,
    }


# ============================================================================================== reader side
def _decode(data: bytes, sample: PlannedSample, center_crop: bool, in_channels: int):
    image = load_image_rgb(io.BytesIO(data))
    if sample.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    original_size = (image.height, image.width)
    crop, top_left = resize_and_crop(image, sample.bucket, center_crop=center_crop)
    return to_model_channels(pil_to_tensor(crop), in_channels), original_size, top_left


def decode_batch(unit: str, batch: list[tuple[PlannedSample, bytes]], ctx: UnitContext) -> dict[str, Any]:
    """Decode, convert, (flip,) resize and crop a batch; samples that fail are returned as skips."""
    center_crop = ctx.settings.center_crops
    pixels, samples, geometry, failed = [], [], [], []
    for sample, data in batch:
        try:
            tensor, original_size, top_left = _decode(data, sample, center_crop, ctx.in_channels)
        except UnreadableImageError as err:
            failed.append(_skip(sample.id, sample.source, "unreadable", err.reason, sample.position))
            continue
        except Exception as err:  # a decoder bug on one odd file must not stop a long run; it is reported
            reason = f"{type(err).__name__}: {err}"
            failed.append(_skip(sample.id, sample.source, "unreadable", reason, sample.position))
            continue
        pixels.append(tensor)
        samples.append(sample)
        geometry.append((original_size, top_left))
    return {
        "type": "batch",
        "unit": unit,
        "samples": samples,
        "geometry": geometry,
        "pixels": torch.stack(pixels) if pixels else None,
        "failed": failed,
    }


def load_part_tensors(store: CacheStore, name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Some tensors of a published shard (memory-mapped locally, one download remotely)."""
    if store.local:
        with safe_open(store.path(name), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    data = store.get(name)
    if data is None:
        raise FileNotFoundError(f"{store.display(name)} is missing")
    tensors = load_safetensors(data)
    return {key: tensors[key] for key in keys}


def read_manifest(store: CacheStore, unit: str, provenance_hash: str) -> dict[str, Any] | None:
    manifest = store.get_json(manifest_name(unit, provenance_hash))
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


def plan_image(
    item: SourceItem, position: int, ctx: UnitContext
) -> tuple[list[tuple[PlannedSample, bytes]], list[dict[str, Any]]]:
    """The samples of one image as (sample, bytes) pairs, or the skip saying why it gives none."""
    base_id = f"{item.label}@{content_hash(item.data)}"
    try:
        height, width = probe_size(item.data)
    except UnreadableImageError as err:
        return [], [_skip(base_id, item.label, "unreadable", err.reason, position)]
    bucket, too_small = choose_bucket(height, width, ctx.settings)
    if too_small:
        return [], [_skip(base_id, item.label, "too_small", too_small, position)]
    samples = expand_image(base_id, item.label, item.caption, position, bucket, ctx.settings.flip)
    return [(sample, item.data) for sample in samples], []


def read_unit(source: Source, unit: Unit, ctx: UnitContext) -> Iterator[dict[str, Any]]:
    """The reader half of a unit: messages `complete` | `start`, then `batch`/`reused`..., then `end`."""
    signature = unit.signature if unit.kind == "broken" else source.signature(unit)
    previous = read_manifest(ctx.store, unit.name, ctx.provenance_hash)
    if previous is not None and previous.get("signature") == signature:
        yield {"type": "complete", "unit": unit.name, "samples": previous["counts"]["samples"]}
        return
    # The unit's input changed (or a run was cut off while rewriting it): samples it already held are reused.
    reusable: dict[str, tuple[str, dict]] = {}
    for part in (previous or {}).get("parts", []):
        for record in part["samples"]:
            reusable[record["id"]] = (part["file"], record)
    yield {"type": "start", "unit": unit.name, "signature": signature, "previous": len(reusable)}

    video = source.kind == VideoFolderSource.kind
    plan, decode = (plan_video, decode_clips) if video else (plan_image, decode_batch)
    batcher = BucketBatcher(ctx.batch_size)
    skipped: list[dict[str, Any]] = []
    seen: set[str] = set()
    reused: list[tuple[PlannedSample, str, dict]] = []
    position = -1
    for position, item in enumerate(read_unit_items(source, unit)):
        if item.error is not None:
            skipped.append(_skip(None, item.label, *item.error, position))
            continue
        planned, skips = plan(item, position, ctx)
        skipped.extend(skips)
        for sample, payload in planned:
            if sample.id in seen:
                skipped.append(_skip(sample.id, sample.source, "duplicate", "same label and bytes twice", position))
                continue
            seen.add(sample.id)
            if sample.id in reusable:
                reused.append((sample, *reusable[sample.id]))
                continue
            batch = batcher.add(sample, payload)
            if batch is not None:
                yield decode(unit.name, batch, ctx)
    for batch in batcher.flush():
        yield decode(unit.name, batch, ctx)

    # Reused samples keep their stored moments and geometry; the caption is the input's current one.
    for start in range(0, len(reused), ctx.batch_size):
        chunk = reused[start : start + ctx.batch_size]
        tensors: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(part for _, part, _ in chunk):
            tensors.update(load_part_tensors(ctx.store, file, [r["key"] for _, p, r in chunk if p == file]))
        records = [{**record, "caption": sample.caption} for sample, _, record in chunk]
        moments = [tensors[record["key"]] for _, _, record in chunk]
        yield {"type": "reused", "unit": unit.name, "records": records, "moments": moments}
    yield {"type": "end", "unit": unit.name, "skipped": skipped, "items": position + 1}


# ============================================================================================== writer side
def encode_pixels(adapter: AutoencoderAdapter, pixels: torch.Tensor) -> torch.Tensor:
    """Raw moments (or deterministic latents) of a batch of images (B, C, H, W) or clips (B, C, T, H, W).

    Video autoencoders see images as one-frame videos (B, 2C, 1, h, w); image autoencoders see a clip's frames as
    images, and their moments are put back in clip layout (B, 2C, T, h, w), as `diffusers-vae stats` does.
    """
    if pixels.ndim == 5 and not adapter.is_video:
        batch, frames = pixels.shape[0], pixels.shape[2]
        moments = adapter.encode_moments(pixels.transpose(1, 2).flatten(0, 1))
        return moments.unflatten(0, (batch, frames)).transpose(1, 2)
    if pixels.ndim == 4 and adapter.is_video:
        return adapter.encode_moments(pixels.unsqueeze(2))
    return adapter.encode_moments(pixels)


class Encoder:
    """Encodes batches to moments in the storage dtype; re-encodes non-finite samples alone in float32.

    Any supported autoencoder class (`autoencoders.as_autoencoder`): posterior classes give moments
    `cat([mean, logvar])`, deterministic ones (AutoencoderDC, AutoencoderTiny) their latents.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device, settings: CacheSettings):
        self.storage_dtype = self.encode_dtype = DTYPES[settings.dtype]
        as_autoencoder(vae)  # an unsupported class fails here, before the copy below
        # The weights as loaded, kept aside before the cast, for the float32 re-encode of non-finite samples.
        self._fp32_source = copy.deepcopy(vae).cpu() if self.encode_dtype != torch.float32 else None
        self._fp32_vae: AutoencoderAdapter | None = None
        if next(vae.parameters()).dtype != self.encode_dtype:
            # Not `.to(dtype)`: diffusers' override warns about fp32-pinned modules even when there are none.
            vae = {torch.float16: vae.half, torch.bfloat16: vae.bfloat16, torch.float32: vae.float}[
                self.encode_dtype
            ]()
        self.vae = vae.to(device=device).eval()
        self.adapter = as_autoencoder(self.vae)
        self.device = device

    @torch.no_grad()
    def _moments(self, adapter: AutoencoderAdapter, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        moments = encode_pixels(adapter, pixels.to(self.device, dtype=dtype, non_blocking=True))
        return moments.to(self.storage_dtype).cpu()

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """Moments (N, 2C, ...) and, per sample, None (fine), "float32" (re-encoded) or "non_finite"."""
        moments = self._moments(self.adapter, pixels, self.encode_dtype)
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

    def _fallback_vae(self) -> AutoencoderAdapter:
        if self._fp32_source is None:
            return self.adapter  # already float32
        if self._fp32_vae is None:
            self._fp32_vae = as_autoencoder(self._fp32_source.float().to(self.device).eval())
        return self._fp32_vae


class ObjectWriter:
    """Publishes objects from one background thread, in order, with one write in flight (bounded memory)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(function, *args)

    def wait(self) -> None:
        """Wait for the write in flight; its error, if any, is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class UnitWriter:
    """The writer half of one unit: encode its batches, fill and publish its shards, publish its manifest last."""

    def __init__(self, unit: str, signature: str, previous: int, ctx: UnitContext, encoder: Encoder, writer):
        self.unit, self.signature, self.previous, self.ctx = unit, signature, previous, ctx
        self.encoder, self.writer = encoder, writer
        self.tensors: dict[str, torch.Tensor] = {}
        self.records: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.encoded = self.reused = 0
        self.common_metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "provenance": json.dumps(ctx.provenance, sort_keys=True, separators=(",", ":")),
            "provenance_hash": ctx.provenance_hash,
            "unit": unit,
        }

    def add_batch(self, message: dict[str, Any]) -> int:
        self.skipped.extend(message["failed"])
        if message["pixels"] is None:
            return len(message["failed"])
        moments, status = self.encoder(message["pixels"])
        run_dtype = self.ctx.provenance["moments"]["encode_dtype"]
        extras = message.get("extras") or [{}] * len(message["samples"])
        for sample, (original_size, crop), extra, sample_moments, sample_status in zip(
            message["samples"], message["geometry"], extras, moments, status
        ):
            if sample_status == "non_finite":
                reason = "NaN/Inf latents, also when re-encoded in float32"
                self.skipped.append(_skip(sample.id, sample.source, "non_finite", reason, sample.position))
                continue
            self.tensors[sample.id] = sample_moments.contiguous()
            record = _record(sample, original_size, crop, sample_moments.shape, sample_status or run_dtype)
            self.records.append({**record, **extra})
            self.encoded += 1
        self._maybe_flush()
        return len(message["samples"]) + len(message["failed"])

    def add_reused(self, message: dict[str, Any]) -> int:
        for record, moments in zip(message["records"], message["moments"]):
            self.tensors[record["key"]] = moments.contiguous()
            self.records.append(record)
        self.reused += len(message["records"])
        self._maybe_flush()
        return len(message["records"])

    def _maybe_flush(self, last: bool = False) -> None:
        if len(self.records) >= self.ctx.shard_size or (last and self.records):
            name = part_name(self.unit, self.ctx.provenance_hash, self.signature, len(self.parts))
            metadata = {**self.common_metadata, "samples": json.dumps(self.records)}
            self.writer.submit(self.ctx.store.put_shard, name, self.tensors, metadata)
            self.parts.append({"file": name, "samples": self.records})
            self.tensors, self.records = {}, []

    def finish(self, message: dict[str, Any]) -> UnitResult:
        self._maybe_flush(last=True)
        skipped = sorted(self.skipped + message["skipped"], key=lambda s: s["_order"])
        skipped = [{k: v for k, v in s.items() if k != "_order"} for s in skipped]
        samples = sum(len(p["samples"]) for p in self.parts)
        result = UnitResult(
            self.unit,
            resumed=False,
            samples=samples,
            encoded=self.encoded,
            reused=self.reused,
            skipped=len(skipped),
            dropped=max(0, self.previous - self.reused),
        )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "unit": self.unit,
            "signature": self.signature,
            "provenance_hash": self.ctx.provenance_hash,
            "run": self.ctx.run_id,
            "items": message["items"],
            "counts": {
                "samples": samples,
                "encoded": result.encoded,
                "reused": result.reused,
                "skipped": result.skipped,
                "dropped": result.dropped,
            },
            "parts": self.parts,
            "skipped": skipped,
        }
        # The same single writer thread publishes the shards first, so the manifest never names a missing shard.
        self.writer.submit(
            self.ctx.store.put_text, manifest_name(self.unit, self.ctx.provenance_hash), json.dumps(manifest)
        )
        return result


def encode_messages(
    messages: Iterable[dict[str, Any]],
    ctx: UnitContext,
    encoder: Encoder,
    writer: ObjectWriter,
    on_samples: Callable[[int], None] | None = None,
) -> Iterator[UnitResult]:
    """The writer half of any number of units whose messages may interleave; yields each unit's result.

    The results of units written here are final once `writer.wait()` returns (their manifests are published in
    order after their shards).
    """
    open_units: dict[str, UnitWriter] = {}
    for message in messages:
        kind, unit = message["type"], message["unit"]
        if kind == "complete":
            yield UnitResult(unit, resumed=True, samples=message["samples"])
        elif kind == "start":
            open_units[unit] = UnitWriter(unit, message["signature"], message["previous"], ctx, encoder, writer)
        elif kind == "batch":
            count = open_units[unit].add_batch(message)
            if on_samples is not None:
                on_samples(count)
        elif kind == "reused":
            count = open_units[unit].add_reused(message)
            if on_samples is not None:
                on_samples(count)
        elif kind == "end":
            yield open_units.pop(unit).finish(message)
        else:  # pragma: no cover - a reader/writer version mismatch
            raise ValueError(f"unknown unit message {kind!r}")


def encode_unit(source: Source, unit: Unit, ctx: UnitContext, encoder: Encoder, writer: ObjectWriter) -> UnitResult:
    """One unit, both halves in this process (the Ray actor feeds `encode_messages` from a Ray task instead)."""
    (result,) = encode_messages(read_unit(source, unit, ctx), ctx, encoder, writer)
    writer.wait()
    return result
