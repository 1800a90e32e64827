"""The cache's on-disk contract: names, settings, provenance and `cache.json`.

Everything that decides whether two runs may share a cache lives here: `CacheSettings` (the preprocessing), the
provenance record (VAE fingerprint and config, scaling convention, storage dtype) and its hash, which every shard
and `cache.json` carry. The format itself is specified in docs/latent_cache.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..buckets import make_buckets
from ..scaling import scaling_convention

FORMAT_NAME = "diffusers_vae_ext.latent_cache"
FORMAT_VERSION = 1
CACHE_FILE = "cache.json"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SHARD_DIR = "shards"
FLIP_SUFFIX = ":flip"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def build_provenance(vae: torch.nn.Module, settings: CacheSettings, fingerprint: str, encode_dtype: str) -> dict:
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config = json.loads(canonical_json(config))  # tuples -> lists, as the JSON file will hold them
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
            "dtype": DTYPE_NAMES[DTYPES[settings.dtype]],
            "encode_dtype": encode_dtype,
        },
        "preprocessing": settings.to_dict(),
    }


def provenance_hash(provenance: dict) -> str:
    return hashlib.sha256(canonical_json(provenance).encode()).hexdigest()


def describe_mismatch(cached: dict, wanted: dict, where: Path) -> str:
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
