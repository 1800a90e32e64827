"""What the evaluation reads: the VAEs (`--vae PATH` or `LABEL=PATH`) and the images.

Images come through the latent cache's source layer (`cache.sources`: image folders, webdataset shards, parquet
files, local or fsspec URLs, and `datasets` datasets; same labels, same raw-byte reading, same skips) and every
image is decoded with `data.load_image_rgb`, so odd files behave as in the cache; with no input, the built-in
sample photos are used.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..autoencoders import AutoencoderAdapter, load_autoencoder
from ..data import UnreadableImageError, load_image_rgb, pil_to_tensor, resize_and_crop, to_model_channels


@dataclass
class EvalVAE:
    """A VAE under evaluation: its `label` in the report, its adapter (`diffusers_vae_ext.autoencoders`) and its
    source."""

    label: str
    adapter: AutoencoderAdapter
    source: str = ""

    @property
    def slug(self) -> str:
        """The label made safe for file names."""
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
    """Load each `--vae` spec (see `parse_vae_spec`) on `device`; labels default to the folder name, made unique.

    Any class `diffusers_vae_ext.autoencoders` supports, chosen by the folder's `_class_name` (a pipeline folder's
    `vae/` is found by itself), safetensors only. Weights are loaded in float32 whatever they are stored in: the
    metrics and the half-precision check's reference are float32.
    """
    vaes, used = [], set()
    for spec in specs:
        label, path = parse_vae_spec(spec)
        label = label or Path(path).resolve().name or path
        base, counter = label, 2
        while label in used:
            label, counter = f"{base}-{counter}", counter + 1
        used.add(label)
        adapter = load_autoencoder(path, torch_dtype=torch.float32)
        adapter.vae.to(device)
        vaes.append(EvalVAE(label=label, adapter=adapter, source=str(path)))
    return vaes


@dataclass
class ImageItem:
    """One source image: its position, its name (relative path, `row<N>` or photo name), the image or an error."""

    index: int
    name: str
    image: Image.Image | None = None
    error: str | None = None


def open_images(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    dataset_split: str = "train",
    image_column: str | None = None,
) -> tuple[int | None, Iterator[ImageItem], str]:
    """(count, items, description) of the images the latent cache would read, or the built-in sample photos.

    `train_data_dir` is anything the cache takes (an image folder, webdataset shards, parquet files; local or an
    fsspec URL), `dataset_name` a `datasets` dataset (hub name or `save_to_disk` folder). Items are read lazily,
    unit by unit in the source's order; an unreadable one comes back with `error` set (the reason). `count` is None
    where the listing does not tell it (webdataset shards).
    """
    if train_data_dir is None and dataset_name is None:
        from ..data import sample_photos

        photos = sample_photos()
        items = (ImageItem(i, f"{name}.png", image=image) for i, (name, image) in enumerate(photos.items()))
        return len(photos), items, "scikit-image's built-in sample photos"
    from ..cache.sources import open_source, read_unit_items

    source = open_source(train_data_dir, dataset_name, dataset_split=dataset_split, image_column=image_column)
    where = str(train_data_dir if train_data_dir is not None else dataset_name)
    if source.kind == "video_folder":
        raise ValueError(
            f"{where} holds videos; `diffusers-vae eval` compares VAEs on images. For videos use `diffusers-vae "
            "reconstruct` (PSNR/SSIM per clip), or point --train_data_dir at a folder of images."
        )
    units = list(source.units())
    # Folders, datasets and parquet row groups know their sizes from the listing; webdataset tars do not.
    known = all(unit.kind in ("folder", "rows", "parquet") for unit in units)
    count = sum(unit.stop - unit.start for unit in units) if known else None

    def items() -> Iterator[ImageItem]:
        index = 0
        for unit in units:
            for item in read_unit_items(source, unit):
                if item.error is not None:
                    yield ImageItem(index, item.label, error=item.error[1])
                else:
                    try:
                        yield ImageItem(index, item.label, image=load_image_rgb(io.BytesIO(item.data)))
                    except (OSError, UnreadableImageError) as err:
                        yield ImageItem(index, item.label, error=getattr(err, "reason", None) or str(err))
                index += 1

    return count, items(), where


def image_batches(
    items: Iterator[ImageItem],
    limit: float,
    resolution: int,
    channels: int,
    batch_size: int,
    skipped: list[dict[str, str]],
) -> Iterator[list[tuple[ImageItem, torch.Tensor]]]:
    """Batches of (item, pixels) for the first `limit` readable items: short side resized to `resolution`, centre
    crop, [-1, 1], `channels` channels. Unreadable items are appended to `skipped` and not counted."""
    batch, taken = [], 0
    for item in items:
        if taken >= limit:
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
