"""Latent cache: encode a dataset once, train a diffusion model from the stored posteriors many times.

Writer (`precompute_latents`, `diffusers-vae cache`, `scripts/precompute_latents.py`):

- stores the posterior **moments** (mean and logvar, unscaled) of every image, so training can draw a fresh
  latent each epoch instead of reusing one frozen sample;
- names every sample by a **stable id** derived from the source (relative path or row number plus a hash of the
  file's bytes; `:flip` for the mirrored copy), never by loader order, so captions cannot drift;
- writes sharded `.safetensors` files atomically; each shard's header says what it holds, so a run killed at any
  moment resumes where it stopped, and the index is rebuilt from complete shards only;
- plans the work globally (scan, aspect-ratio buckets, batches, shards) and hands whole shards round-robin to the
  processes of `accelerate launch`: each sample is encoded by exactly one process, in the same batch whatever
  the number of processes or restarts, so the stored tensors do not depend on either;
- records the VAE fingerprint, the preprocessing and the scaling convention in `cache.json` and every shard, and
  refuses to resume with different ones;
- skips bad input (unreadable, too small, non-finite latents) with a reason in `skipped.jsonl`.

Reader (`LatentCacheDataset`, `BucketBatchSampler`): memory-mapped reads, per-(seed, epoch, id) posterior draws,
the VAE config's scaling applied. The on-disk format is specified in `docs/latent_cache.md`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .buckets import BucketBatchSampler, closest_bucket, make_buckets, upscale_needed
from .data import (
    UnreadableImageError,
    import_datasets,
    list_image_files,
    load_image_rgb,
    open_dataset,
    pil_to_tensor,
    read_captions,
    resize_and_crop,
    to_model_channels,
)
from .scaling import scale_latents, scaling_convention

__all__ = [
    "BucketBatchSampler",
    "CacheMismatchError",
    "CacheSettings",
    "CacheSummary",
    "LatentCacheDataset",
    "load_cache_info",
    "precompute_latents",
]

FORMAT_NAME = "diffusers_vae_ext.latent_cache"
FORMAT_VERSION = 1
CACHE_FILE = "cache.json"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SHARD_DIR = "shards"
FLIP_SUFFIX = ":flip"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class CacheMismatchError(ValueError):
    """The cache on disk was built with another VAE, other preprocessing or another format."""


# ------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CacheSettings:
    """What decides the cached tensors (besides the VAE). Changing any of them needs a new cache.

    Args:
        resolution: square target side, or with `buckets` the side whose square sets the buckets' area.
        center_crop: crop the resized image at its centre; otherwise at its top-left corner, so
            `crop_coords_top_left` is (0, 0). (No random crops: a cache would freeze one draw of them.)
        buckets: resize each image to its closest aspect-ratio bucket (`diffusers_vae_ext.buckets`), centre crop.
        flip: also cache the horizontally mirrored image (its own sample, id suffix `:flip`).
        max_upscale: skip images that would have to be enlarged by more than this factor to cover their target
            (a 100 px image stretched to 512 px teaches blur).
        dtype: `"fp32"`, `"fp16"` or `"bf16"`: the dtype the VAE runs in and the moments are stored in. Samples
            whose latents come out NaN/Inf are re-encoded alone in float32. VAEs that overflow in fp16 (SDXL's,
            `force_upcast=True`) would re-encode most images that way: use bf16 or fp32 for them.
    """

    resolution: int = 512
    center_crop: bool = False
    buckets: bool = False
    flip: bool = False
    max_upscale: float = 2.0
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}.")
        if self.max_upscale <= 0:
            raise ValueError(f"max_upscale must be positive, got {self.max_upscale}.")

    def bucket_list(self) -> list[tuple[int, int]]:
        return make_buckets(self.resolution) if self.buckets else [(self.resolution, self.resolution)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "buckets": [list(b) for b in self.bucket_list()] if self.buckets else None,
            "crop": "center" if (self.center_crop or self.buckets) else "top_left",
            "flip": self.flip,
            "max_upscale": self.max_upscale,
            "resize": "PIL bicubic, scaled to cover the target size, then cropped",
            "pixel_range": [-1.0, 1.0],
            "color": "8-bit RGB via diffusers_vae_ext.data.load_image_rgb (alpha over white, EXIF rotation)",
        }


# ------------------------------------------------------------------------------------------------- sources
def _content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class _FolderSource:
    """Images under a folder (recursive), labelled by their path relative to it."""

    def __init__(self, root: str | os.PathLike, caption_column: str | None):
        self.root = Path(root)
        files = list_image_files(self.root)
        captions = read_captions(self.root, files, caption_column=caption_column or "text")
        self.labels = sorted(f.relative_to(self.root).as_posix() for f in files)
        self.captions = [captions.get(label, "") for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[bytes, str]:
        return (self.root / self.labels[index]).read_bytes(), self.captions[index]

    def describe(self) -> dict[str, Any]:
        return {"type": "image_folder", "path": str(self.root.resolve()), "num_files": len(self)}


class _DatasetSource:
    """Rows of a `datasets.Dataset`, labelled `row<N>`; images read as raw bytes and decoded by us."""

    def __init__(self, dataset: Any, image_column: str | None, caption_column: str | None, name: str | None):
        datasets = import_datasets()

        columns = list(dataset.column_names)
        if image_column is None:
            image_columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
            image_column = "image" if "image" in columns else (image_columns[0] if image_columns else None)
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column of the dataset (columns: {columns}).")
        if caption_column is not None and caption_column not in columns:
            raise ValueError(
                f"--caption_column {caption_column!r} is not a column of the dataset (columns: {columns})."
            )
        if caption_column is None:
            caption_column = "text" if "text" in columns else None
        self.fingerprint = getattr(dataset, "_fingerprint", None)
        if isinstance(dataset.features[image_column], datasets.Image):
            # Raw bytes: hashing them gives the sample id, and our loader handles odd files one way everywhere.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> tuple[bytes, str]:
        row = self.dataset[index]
        value = row[self.image_column]
        caption = "" if self.caption_column is None or row[self.caption_column] is None else row[self.caption_column]
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = Path(value["path"]).read_bytes()
        elif isinstance(value, str):
            data = Path(value).read_bytes()
        elif isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            data = buffer.getvalue()
        else:
            data = None
        if data is None:
            raise UnreadableImageError(f"row{index}", f"no image in column {self.image_column!r}")
        return bytes(data), str(caption)

    def label(self, index: int) -> str:
        return f"row{index}"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "datasets",
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_rows": len(self),
            "image_column": self.image_column,
            "caption_column": self.caption_column,
        }


def _label(source: Any, index: int) -> str:
    return source.labels[index] if isinstance(source, _FolderSource) else source.label(index)


def _open_source(
    train_data_dir: str | os.PathLike | None,
    dataset: Any,
    dataset_split: str,
    image_column: str | None,
    caption_column: str | None,
) -> _FolderSource | _DatasetSource:
    if (train_data_dir is None) == (dataset is None):
        raise ValueError("Give exactly one input: an image folder (train_data_dir) or a dataset (dataset_name).")
    if train_data_dir is not None:
        return _FolderSource(train_data_dir, caption_column)
    name = None
    if isinstance(dataset, (str, os.PathLike)):
        name = str(dataset)
        dataset = open_dataset(name, dataset_split)
    return _DatasetSource(dataset, image_column, caption_column, name)


# ------------------------------------------------------------------------------------------------- scanning
def _probe_size(data: bytes) -> tuple[int, int]:
    """(height, width) as `load_image_rgb` will see it (after EXIF rotation), from the header only."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                try:
                    orientation = image.getexif().get(0x0112, 1)
                except Exception:  # a broken EXIF block only loses the rotation, as in ImageOps.exif_transpose
                    orientation = 1
    except Image.UnidentifiedImageError as err:
        raise UnreadableImageError("", "not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise UnreadableImageError("", str(err) or type(err).__name__) from err
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class _ScanDataset(Dataset):
    """Per source item: the id (label + content hash), caption, size, target bucket, or why it is skipped."""

    def __init__(self, source: Any, indices: list[int], settings: CacheSettings):
        self.source, self.indices, self.settings = source, indices, settings
        self.buckets = settings.bucket_list()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        label = _label(self.source, index)
        record: dict[str, Any] = {"index": index, "source": label, "id": None, "caption": "", "skip": None}
        try:
            data, record["caption"] = self.source.read(index)
        except (OSError, UnreadableImageError) as err:
            record["skip"] = {"kind": "unreadable", "reason": f"cannot read: {getattr(err, 'reason', err)}"}
            return record
        record["hash"] = _content_hash(data)
        record["id"] = f"{label}@{record['hash']}"
        try:
            height, width = _probe_size(data)
        except UnreadableImageError as err:
            record["skip"] = {"kind": "unreadable", "reason": err.reason}
            return record
        bucket = closest_bucket(height, width, self.buckets)
        upscale = upscale_needed(height, width, bucket)
        if upscale > self.settings.max_upscale:
            record["skip"] = {
                "kind": "too_small",
                "reason": f"too small: {width}x{height} px would need {upscale:.2f}x upscaling to cover "
                f"{bucket[1]}x{bucket[0]} (limit max_upscale={self.settings.max_upscale})",
            }
            return record
        record["size"], record["bucket"] = (height, width), bucket
        return record


# ------------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Planned:
    id: str
    index: int
    source: str
    content_hash: str
    flip: bool
    bucket: tuple[int, int]
    caption: str


@dataclass
class _PlannedShard:
    name: str
    batches: list[list[_Planned]]


def _expected_samples(records: list[dict[str, Any]], flip: bool) -> list[_Planned]:
    """Every sample the cache should hold, in source order (original, then its mirrored copy)."""
    samples = []
    for record in records:
        if record["skip"] is None:
            for flipped in (False, True) if flip else (False,):
                samples.append(
                    _Planned(
                        id=record["id"] + (FLIP_SUFFIX if flipped else ""),
                        index=record["index"],
                        source=record["source"],
                        content_hash=record["hash"],
                        flip=flipped,
                        bucket=tuple(record["bucket"]),
                        caption=record["caption"],
                    )
                )
    return samples


def _plan(samples: list[_Planned], done: set[str], batch_size: int, batches_per_shard: int) -> list[_PlannedShard]:
    """Batches within buckets, then shards of whole batches, over the samples not yet done.

    Each bucket's samples (in source order) are cut into consecutive batches. Complete shards hold whole
    batches, and only a bucket's last batch can be short, so removing finished batches and cutting again gives
    the same remaining batches: a resumed run encodes every sample in the same batch as an uninterrupted one.
    """
    by_bucket: dict[tuple[int, int], list[_Planned]] = {}
    for sample in samples:
        if sample.id not in done:
            by_bucket.setdefault(sample.bucket, []).append(sample)
    batches = [
        group[start : start + batch_size]
        for _, group in sorted(by_bucket.items())
        for start in range(0, len(group), batch_size)
    ]
    shards = []
    for start in range(0, len(batches), batches_per_shard):
        shard_batches = batches[start : start + batches_per_shard]
        ids = "\n".join(s.id for batch in shard_batches for s in batch)
        shards.append(_PlannedShard(f"shard-{hashlib.sha256(ids.encode()).hexdigest()[:16]}", shard_batches))
    return shards


# ------------------------------------------------------------------------------------------------- pixels
class _PixelDataset(Dataset):
    """Decodes, converts, (flips,) resizes and crops one planned sample in a DataLoader worker."""

    def __init__(self, source: Any, items: list[_Planned], center_crop: bool, in_channels: int):
        self.source, self.items, self.center_crop, self.in_channels = source, items, center_crop, in_channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        try:
            data, _ = self.source.read(item.index)
        except (OSError, UnreadableImageError) as err:
            return {"position": position, "skip": ("unreadable", f"cannot read: {getattr(err, 'reason', err)}")}
        if _content_hash(data) != item.content_hash:
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


# ------------------------------------------------------------------------------------------------- files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(temp: Path, path: Path) -> None:
    """Make `temp` durable, then atomically give it its final name: readers see all of it or nothing."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _write_text_atomic(path: Path, text: str) -> None:
    temp = _temp_path(path)
    temp.write_text(text, encoding="utf-8")
    _publish(temp, path)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    temp = _temp_path(path)
    save_file(tensors, str(temp), metadata=metadata)
    _publish(temp, path)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def _provenance(vae: torch.nn.Module, settings: CacheSettings, fingerprint: str, encode_dtype: str) -> dict:
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config = json.loads(_canonical(config))  # tuples -> lists, as the JSON file will hold them
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vae": {"fingerprint": fingerprint, "config": config},
        "scaling": {
            "convention": scaling_convention(config),
            "scaling_factor": config.get("scaling_factor"),
            "shift_factor": config.get("shift_factor"),
            "latents_mean": config.get("latents_mean"),
            "latents_std": config.get("latents_std"),
        },
        "moments": {
            "layout": "concat([mean, logvar], dim=0): shape (2 * latent_channels, height / f, width / f)",
            "scaled": False,
            "dtype": _DTYPE_NAMES[DTYPES[settings.dtype]],
            "encode_dtype": encode_dtype,
        },
        "preprocessing": settings.to_dict(),
    }


def _provenance_hash(provenance: dict) -> str:
    return hashlib.sha256(_canonical(provenance).encode()).hexdigest()


def _describe_mismatch(cached: dict, wanted: dict, where: Path) -> str:
    lines = []
    if cached.get("format_version") != wanted["format_version"] or cached.get("format") != wanted["format"]:
        lines.append(
            f"format {cached.get('format')} v{cached.get('format_version')}, this code writes v{FORMAT_VERSION}"
        )
    old_vae, new_vae = cached.get("vae", {}), wanted["vae"]
    if old_vae.get("fingerprint") != new_vae["fingerprint"]:
        changed = sorted(k for k in new_vae["config"] if old_vae.get("config", {}).get(k) != new_vae["config"][k])
        what = f"config keys {changed}" if changed else "same config, different weights"
        lines.append(
            f"VAE: cache built with {str(old_vae.get('fingerprint'))[:12]}..., this VAE is "
            f"{new_vae['fingerprint'][:12]}... ({what})"
        )
    for section in ("moments", "preprocessing"):
        old, new = cached.get(section, {}), wanted[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: cache has {old.get(key)!r}, this run wants {new.get(key)!r}")
    detail = "\n  ".join(lines or ["provenance differs"])
    return (
        f"The latent cache at {where} was built with different settings:\n  {detail}\n"
        "Rebuild it with --overwrite (overwrite=True), or write to another --output_dir."
    )


def load_cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `cache.json` of the cache at `path` (provenance, source, counts, status)."""
    cache_file = Path(path) / CACHE_FILE
    if not cache_file.is_file():
        raise FileNotFoundError(f"{path} is not a latent cache: {CACHE_FILE} is missing.")
    info = json.loads(cache_file.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT_NAME:
        raise ValueError(f"{cache_file} is not a {FORMAT_NAME} file (format={info.get('format')!r}).")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cache_file} has format version {info.get('format_version')}; this code reads {FORMAT_VERSION}."
        )
    return info


def _read_shard_headers(shard_dir: Path, provenance: dict) -> list[tuple[Path, dict[str, Any]]]:
    """(path, parsed metadata) of every complete shard, after checking it belongs to this provenance."""
    expected = _provenance_hash(provenance)
    shards = []
    for path in sorted(shard_dir.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} shard; remove it from {shard_dir}.")
        if metadata.get("provenance_hash") != expected:
            raise CacheMismatchError(
                _describe_mismatch(json.loads(metadata.get("provenance", "{}")), provenance, path)
            )
        shards.append((path, {"samples": json.loads(metadata["samples"]), "skipped": json.loads(metadata["skipped"])}))
    return shards


def _remove_cache_files(output_dir: Path) -> None:
    """Delete what a cache consists of (and nothing else the folder may hold)."""
    shard_dir = output_dir / SHARD_DIR
    if shard_dir.is_dir():
        for path in shard_dir.iterdir():
            if path.name.startswith(("shard-", ".shard-")):
                path.unlink()
    for name in (CACHE_FILE, INDEX_FILE, SKIPPED_FILE):
        (output_dir / name).unlink(missing_ok=True)


def _remove_temp_files(output_dir: Path) -> None:
    """Leftovers of writes cut off by a crash: never named by the index, safe to delete before writing."""
    for folder in (output_dir, output_dir / SHARD_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- writer
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
    from .modeling import AutoencoderKL

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

    from .modeling import weights_fingerprint

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
    provenance = _provenance(vae, settings, fingerprint, _DTYPE_NAMES[encoder.encode_dtype])
    with state.main_process_first():  # one process downloads / prepares a hub dataset, the others reuse it
        source = _open_source(train_data_dir, dataset, dataset_split, image_column, caption_column)

    # 1. Refuse a cache built otherwise (every process reads the same file, so all raise together).
    if not overwrite and (output_dir / CACHE_FILE).is_file():
        cached = json.loads((output_dir / CACHE_FILE).read_text(encoding="utf-8"))
        if cached.get("provenance_hash") != _provenance_hash(provenance):
            raise CacheMismatchError(_describe_mismatch(cached.get("provenance", cached), provenance, output_dir))
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "status": "building",
        "provenance": provenance,
        "provenance_hash": _provenance_hash(provenance),
        "source": source.describe(),
        "files": {"index": INDEX_FILE, "skipped": SKIPPED_FILE, "shards": SHARD_DIR + "/"},
        "batch_size": batch_size,
    }
    if main:
        if overwrite:
            _remove_cache_files(output_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(output_dir)
        # Readers refuse a cache whose status is not "complete", so the old index cannot be read mid-update.
        _write_text_atomic(output_dir / CACHE_FILE, json.dumps(info, indent=2))
    state.wait_for_everyone()

    # 2. Scan: each process hashes and probes a strided slice of the sorted inputs; all gather the records.
    mine = list(range(state.process_index, len(source), state.num_processes))
    scan = _ScanDataset(source, mine, settings)
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
    expected = _expected_samples(records, flip)

    # 3. What complete shards already hold (the main process reads, everyone gets the same answer).
    done_message: list[Any] = [None]
    if main:
        try:
            done = set()
            for _, header in _read_shard_headers(shard_dir, provenance):
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
    shards = _plan(expected, done_before, batch_size, max(1, round(shard_size / batch_size)))
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
    shards: list[_PlannedShard],
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
        "provenance": _canonical(provenance),
        "provenance_hash": _provenance_hash(provenance),
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
                pending = writer.submit(_write_shard, shard_dir / f"{shard.name}.safetensors", tensors, metadata)
                tensors, samples, skipped = {}, [], []
        if pending is not None:
            pending.result()


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    _write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_index(
    output_dir: Path,
    info: dict[str, Any],
    records: list[dict[str, Any]],
    expected: list[_Planned],
    done_before: set[str],
    provenance: dict,
) -> CacheSummary:
    cached: dict[str, dict[str, Any]] = {}
    shard_skips: dict[str, dict[str, Any]] = {}
    for path, header in _read_shard_headers(output_dir / SHARD_DIR, provenance):
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
    _write_jsonl(output_dir / INDEX_FILE, index_rows)
    _write_jsonl(output_dir / SKIPPED_FILE, skipped_rows)
    counts = {"samples": summary.cached, "skipped": len(skipped_rows), "stale_entries": summary.stale}
    _write_text_atomic(output_dir / CACHE_FILE, json.dumps({**info, "status": "complete", "counts": counts}, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------- reader
def _draw_seed(seed: int, epoch: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LatentCacheDataset(Dataset):
    """A latent cache as a map-style dataset: one dict per cached sample, in index order.

    Args:
        path: the cache folder (`cache.json`, `index.jsonl`, `shards/`).
        sample_posterior (`bool`, defaults to `True`): draw `latents = mean + exp(logvar / 2) * eps` with `eps`
            from a `torch.Generator` seeded by (`seed`, epoch, sample id), so draws are reproducible, independent
            of worker count and order, and fresh each epoch (`set_epoch`); `False` returns the posterior mean.
        seed (`int`, defaults to 0): base seed of the draws.
        scale (`bool`, defaults to `True`): apply the VAE config's scaling convention
            (`diffusers_vae_ext.scaling.scale_latents`: scaling_factor, shift_factor or latents_mean/std) so the
            latents are what a diffusion model trains on; `False` returns raw VAE latents (for statistics).
        return_moments (`bool`, defaults to `False`): also return the stored `mean` and `logvar` (float32).

    Items: `latents` (float32, (C, h, w)), `caption` (str), `original_size`, `crop_coords_top_left`,
    `target_size` and `bucket` (int64 tensors (2,) as (height, width) / (top, left); batched they stack to (B, 2),
    so `torch.cat([original_size, crop_coords_top_left, target_size], 1)` are SDXL's `add_time_ids`), `flip`
    (bool), `id` (str).

    Shards are memory-mapped with `safe_open`, opened lazily in whichever process reads them, so DataLoader
    workers each open their own. With `persistent_workers=True` workers keep the epoch they started with: call
    `set_epoch` before creating the DataLoader iterator, or leave `persistent_workers` off.
    """

    _MAX_OPEN_SHARDS = 64

    def __init__(
        self,
        path: str | os.PathLike,
        sample_posterior: bool = True,
        seed: int = 0,
        scale: bool = True,
        return_moments: bool = False,
    ) -> None:
        self.path = Path(path)
        self.info = load_cache_info(self.path)
        if self.info.get("status") != "complete":
            raise ValueError(
                f"The latent cache at {self.path} is incomplete (status {self.info.get('status')!r}): a run was "
                "interrupted or is still writing. Rerun the same command to finish it."
            )
        self.vae_config = self.info["provenance"]["vae"]["config"]
        index_file = self.path / INDEX_FILE
        self.records = [json.loads(line) for line in index_file.read_text(encoding="utf-8").splitlines() if line]
        self.sample_posterior = sample_posterior
        self.seed = seed
        self.scale = scale
        self.return_moments = return_moments
        self.epoch = 0
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._handles_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sample_buckets(self) -> list[tuple[int, int]]:
        """The bucket (height, width) of every sample, for `BucketBatchSampler`."""
        return [tuple(record["bucket"]) for record in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Draw the posterior noise of `epoch` from now on."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # file handles stay in the process that opened them
        return state

    def _handle(self, shard: str) -> Any:
        if self._handles_pid != os.getpid():  # forked into a DataLoader worker: open our own
            self._handles, self._handles_pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.path / shard), framework="pt")
            self._handles[shard] = handle
            if len(self._handles) > self._MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    def moments(self, index: int) -> torch.Tensor:
        """The stored moments of sample `index` as float32 (2C, h, w): mean, then logvar."""
        record = self.records[index]
        return self._handle(record["shard"]).get_tensor(record["key"]).float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        mean, logvar = self.moments(index).chunk(2, dim=0)
        if self.sample_posterior:
            generator = torch.Generator().manual_seed(_draw_seed(self.seed, self.epoch, record["id"]))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        else:
            latents = mean.clone()
        if self.scale:
            latents = scale_latents(latents.unsqueeze(0), self.vae_config)[0]
        item = {
            "latents": latents,
            "caption": record["caption"],
            "original_size": torch.tensor(record["original_size"]),
            "crop_coords_top_left": torch.tensor(record["crop_coords_top_left"]),
            "target_size": torch.tensor(record["target_size"]),
            "bucket": torch.tensor(record["bucket"]),
            "flip": bool(record["flip"]),
            "id": record["id"],
        }
        if self.return_moments:
            item["mean"], item["logvar"] = mean, logvar
        return item
