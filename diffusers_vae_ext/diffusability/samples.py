"""Looking at what the probe learned: decode its samples with the VAE and lay them out as a PNG grid."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Raw latents (N, C, h, w) or (N, C, T, h, w) -> images in [-1, 1] (N, 3, H, W) or (N, 3, T', H, W).

    Goes through the `AutoencoderAdapter`'s `decode` (`diffusers_vae_ext.autoencoders`), so every supported class
    decodes in its own convention; image latents of a video class (Qwen-Image, Wan) decode as one-frame clips.
    """
    from ..autoencoders import as_autoencoder

    adapter = as_autoencoder(vae)
    one_frame = adapter.is_video and latents.ndim == 4
    images = []
    for start in range(0, latents.shape[0], batch_size):
        chunk = latents[start : start + batch_size]
        decoded = adapter.decode(chunk.unsqueeze(2) if one_frame else chunk)
        images.append((decoded.squeeze(2) if one_frame else decoded).float().cpu().clamp(-1, 1))
    return torch.cat(images)


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """(N, C, H, W) or (N, C, T, H, W) (middle frame shown) in [-1, 1] -> one RGB PIL image, 2 px gaps."""
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = 2
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    pixels = ((images[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, picture in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = row * (height + gap), column * (width + gap)
        canvas[top : top + height, left : left + width] = picture
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write `image_grid(images)` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns).save(path)
    return path
