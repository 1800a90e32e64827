"""The cache's on-disk contract: names, settings, provenance and `cache.json`.

Everything that decides whether two runs may share a cache lives here: `CacheSettings` (the preprocessing), the
provenance record (VAE fingerprint and config, scaling convention, storage dtype) and its hash, which every shard,
unit manifest and `cache.json` carry, and the names of a unit's objects. The format itself is specified in
docs/latent_cache.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..buckets import make_buckets
from ..scaling import scale_latents
from ..video import ClipOptions

FORMAT_NAME = "diffusers_vae_ext.latent_cache"
# 2: one manifest per input unit (units/) is the completion mark; shards are named after their unit.
FORMAT_VERSION = 2
CACHE_FILE = "cache.json"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SHARDS_FILE = "shards.jsonl"
SHARD_DIR = "shards"
UNIT_DIR = "units"
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
        video: how clips are cut from videos (`video.ClipOptions`); None for images. Video frames are always
            centre-cropped to their bucket (as `diffusers-vae stats` does); buckets are chosen from the source size.
    """

    resolution: int = 512
    center_crop: bool = False
    buckets: bool = False
    flip: bool = False
    max_upscale: float = 2.0
    dtype: str = "fp32"
    video: ClipOptions | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}.")
        if self.max_upscale <= 0:
            raise ValueError(f"max_upscale must be positive, got {self.max_upscale}.")

    def bucket_list(self) -> list[tuple[int, int]]:
        return make_buckets(self.resolution) if self.buckets else [(self.resolution, self.resolution)]

    @property
    def center_crops(self) -> bool:
        """Whether samples are cropped at their centre (else at the top-left corner)."""
        return self.center_crop or self.buckets or self.video is not None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "resolution": self.resolution,
            "buckets": [list(b) for b in self.bucket_list()] if self.buckets else None,
            "crop": "center" if self.center_crops else "top_left",
            "flip": self.flip,
            "max_upscale": self.max_upscale,
            "resize": "PIL bicubic, scaled to cover the target size, then cropped",
            "pixel_range": [-1.0, 1.0],
            "color": "8-bit RGB via diffusers_vae_ext.data.load_image_rgb (alpha over white, EXIF rotation)",
        }
        if self.video is not None:
            record["color"] = "8-bit RGB frames decoded by PyAV (video files) or load_image_rgb (image sequences)"
            record["video"] = self.video.to_dict()
        return record


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def build_provenance(adapter: Any, settings: CacheSettings, fingerprint: str, encode_dtype: str) -> dict:
    """The record every shard, manifest and `cache.json` carry; a run with another one is refused.

    Args:
        adapter: the `autoencoders.AutoencoderAdapter` of the VAE (class, config, scaling, posterior or not).
        settings: the preprocessing.
        fingerprint: `modeling.weights_fingerprint` of its weights.
        encode_dtype: the dtype it runs in.
    """
    config = {k: v for k, v in adapter.config.items() if not k.startswith("_")}
    config = json.loads(canonical_json(config))  # tuples -> lists, as the JSON file will hold them
    # What the readers scale with: the class's pipeline convention and its numbers (config keys, or buffers in the
    # weights for LTX-Video and FLUX.2), so reading needs neither the VAE nor diffusers' pipelines.
    scaling = {"convention": adapter.convention.convention}
    scaling.update({key: _plain(value) for key, value in adapter.scaling_config().items()})
    channels = "2 * latent_channels" if adapter.has_posterior else "latent_channels"
    what = "concat([mean, logvar], dim=0)" if adapter.has_posterior else "deterministic latents"
    if adapter.is_video:
        frame_axis, frames = "temporal", f"1 + (frames - 1) / {adapter.temporal_factor}, "
    elif settings.video is not None:
        frame_axis, frames = "frames", "frames (each encoded as an image), "
    else:
        frame_axis, frames = None, ""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vae": {"class_name": adapter.class_name, "fingerprint": fingerprint, "config": config},
        "scaling": scaling,
        "moments": {
            "kind": "moments" if adapter.has_posterior else "latents",
            "frame_axis": frame_axis,
            "layout": f"{what}: shape ({channels}, {frames}height / f, width / f)",
            "scaled": False,
            "dtype": DTYPE_NAMES[DTYPES[settings.dtype]],
            "encode_dtype": encode_dtype,
        },
        "preprocessing": settings.to_dict(),
    }


@dataclass(frozen=True)
class StoredLayout:
    """How a cache's stored tensors are read back into latents (from its provenance).

    Attributes:
        posterior: the tensors are posterior moments `cat([mean, logvar])`; False: deterministic latents.
        frame_axis: None (images: (C, h, w)), `"temporal"` (a video autoencoder's latent frames: (C, T', h, w))
            or `"frames"` (video frames each encoded by an image autoencoder: (C, T, h, w)).
        scaling: the numbers and `convention` of the autoencoder class's pipelines.
    """

    posterior: bool
    frame_axis: str | None
    scaling: dict[str, Any]

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any]) -> StoredLayout:
        moments = provenance.get("moments", {})
        return cls(moments.get("kind", "moments") == "moments", moments.get("frame_axis"), provenance["scaling"])

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """One sample's raw latents (C, ...) -> what the class's pipelines feed the diffusion model."""
        convention = self.scaling.get("convention")
        if self.frame_axis == "frames":  # an image autoencoder's convention, frame by frame
            return scale_latents(latents.transpose(0, 1), self.scaling, convention).transpose(0, 1).contiguous()
        return scale_latents(latents.unsqueeze(0), self.scaling, convention)[0]


def provenance_hash(provenance: dict) -> str:
    return hashlib.sha256(canonical_json(provenance).encode()).hexdigest()


def describe_mismatch(cached: dict, wanted: dict, where: Any) -> str:
    lines = []
    if cached.get("format_version") != wanted["format_version"] or cached.get("format") != wanted["format"]:
        lines.append(
            f"format {cached.get('format')} v{cached.get('format_version')}, this code writes v{FORMAT_VERSION}"
        )
    old_vae, new_vae = cached.get("vae", {}), wanted["vae"]
    if old_vae.get("class_name", "AutoencoderKL") != new_vae["class_name"]:
        lines.append(f"VAE class: cache built with {old_vae.get('class_name')}, this VAE is {new_vae['class_name']}")
    if old_vae.get("fingerprint") != new_vae["fingerprint"]:
        changed = sorted(k for k in new_vae["config"] if old_vae.get("config", {}).get(k) != new_vae["config"][k])
        what = f"config keys {changed}" if changed else "same config, different weights"
        lines.append(
            f"VAE: cache built with {str(old_vae.get('fingerprint'))[:12]}..., this VAE is "
            f"{new_vae['fingerprint'][:12]}... ({what})"
        )
    for section in ("moments", "preprocessing", "scaling"):
        old, new = cached.get(section, {}), wanted[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: cache has {old.get(key)!r}, this run wants {new.get(key)!r}")
    detail = "\n  ".join(lines or ["provenance differs"])
    return (
        f"The latent cache at {where} was built with different settings:\n  {detail}\n"
        "Rebuild it with --overwrite (overwrite=True), or write to another --output_dir."
    )


def check_cache_info(info: dict[str, Any], where: str) -> dict[str, Any]:
    """`info` (a parsed `cache.json`) if this code can read it, else a ValueError saying what to do."""
    if info.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a {FORMAT_NAME} file (format={info.get('format')!r}).")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {info.get('format_version')}; this code reads {FORMAT_VERSION}. Rebuild the "
            "cache with the same command plus --overwrite (version 2 added per-unit manifests for resumable, "
            "multi-machine runs)."
        )
    return info


# ------------------------------------------------------------------------------------------------- names
def _slug(name: str) -> str:
    # Readable, safe in every file system and object store; the hash next to it keeps names unique.
    return re.sub(r"[^A-Za-z0-9._]+", "_", name)[-48:].lstrip("._") or "unit"


def unit_key(unit_name: str, provenance_hash_: str) -> str:
    return hashlib.sha256(f"{unit_name}\x00{provenance_hash_}".encode()).hexdigest()[:16]


def manifest_name(unit_name: str, provenance_hash_: str) -> str:
    """Where the completion mark of `unit_name` lives: found by name, never by listing."""
    return f"{UNIT_DIR}/{_slug(unit_name)}-{unit_key(unit_name, provenance_hash_)}.json"


def part_name(unit_name: str, provenance_hash_: str, signature: str, part: int) -> str:
    """Shard `part` of a unit: the same unit with the same input always writes the same objects."""
    version = hashlib.sha256(signature.encode()).hexdigest()[:8]
    return f"{SHARD_DIR}/shard-{_slug(unit_name)}-{unit_key(unit_name, provenance_hash_)}-{version}-{part:03d}.safetensors"


def part_unit_key(name: str) -> str | None:
    """The unit key in a shard file name written by `part_name` (None for anything else)."""
    fields = name.rsplit("/", 1)[-1].removesuffix(".safetensors").split("-")
    return fields[-3] if name.endswith(".safetensors") and len(fields) >= 5 and fields[0] == "shard" else None
