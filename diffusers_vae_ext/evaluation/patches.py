"""The report's pictures: the worst patch of each image at 1:1 (original and reconstructions) and error heat maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import tensor_to_pil

IMAGES_DIR = "images"
# Heat maps show |error| averaged over channels on the [0, 1] pixel scale, from 0 (black) to a top value (white)
# chosen per image and shared by all VAEs: the largest 99th percentile of their errors in the patch, at least this.
MIN_HEATMAP_TOP = 0.01


def heatmap(error: torch.Tensor, top: float) -> Image.Image:
    """(H, W) |error| on the [0, 1] scale -> an RGB heat map (magma; 0 black, >= `top` white)."""
    from matplotlib import colormaps

    values = (error.clamp(0, top) / top).numpy()
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


def worst_patches(
    items: list[Any],
    pixels: torch.Tensor,
    reconstructions: dict[str, torch.Tensor],
    slugs: dict[str, str],
    patch_size: int,
) -> tuple[list[dict[str, Any]], list[tuple[str, Image.Image]]]:
    """Per image (`items[k]` has `index` and `name`): the patch where the VAEs do worst on average, so every VAE is
    shown at the same place. Returns one record per image (PNG paths relative to the report, patch position, each
    VAE's mean error there) and the (path, image) pairs to write."""
    # |error| averaged over channels, on the [0, 1] scale.
    errors = {label: (recon - pixels).abs().mean(1) / 2 for label, recon in reconstructions.items()}
    records, writes = [], []
    for k, item in enumerate(items):
        mean_error = torch.stack([error[k] for error in errors.values()]).mean(0)
        top, left = worst_patch(mean_error, patch_size)
        size = min(patch_size, *mean_error.shape)
        rows, cols = slice(top, top + size), slice(left, left + size)
        stem = f"{item.index:05d}"
        original = f"{IMAGES_DIR}/{stem}_original.png"
        writes.append((original, tensor_to_pil(pixels[k][:, rows, cols])))
        in_patch = torch.stack([error[k][rows, cols].flatten() for error in errors.values()])
        heat_top = max(float(in_patch.quantile(0.99, dim=1).max()), MIN_HEATMAP_TOP)
        record = {"image": item.name, "index": item.index, "top": top, "left": left, "size": size}
        record.update(original=original, heat_top=heat_top, vaes={})
        for label, recon in reconstructions.items():
            crop_name = f"{IMAGES_DIR}/{stem}_{slugs[label]}.png"
            heat_name = f"{IMAGES_DIR}/{stem}_{slugs[label]}_error.png"
            writes.append((crop_name, tensor_to_pil(recon[k][:, rows, cols])))
            writes.append((heat_name, heatmap(errors[label][k][rows, cols], heat_top)))
            record["vaes"][label] = {
                "crop": crop_name,
                "error": heat_name,
                "patch_error": float(errors[label][k][rows, cols].mean()),
            }
        records.append(record)
    return records, writes


def write_images(output_dir: Path, writes: list[tuple[str, Image.Image]]) -> None:
    for name, image in writes:
        image.save(output_dir / name)
