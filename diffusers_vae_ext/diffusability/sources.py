"""Where the probe's latents come from: a tensor, a `LatentCacheDataset`, or a latent cache folder / URL.

Caches are read raw (unscaled): the probe standardises every element itself, which undoes any per-channel scaling
a pipeline would apply, and raw latents are what the VAE decodes. A cache made by another VAE than the one given
for decoding is refused (the cache records its VAE's weights fingerprint in its provenance).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch


def _check_vae(provenance: dict[str, Any], vae: Any, where: str) -> None:
    if vae is None:
        return
    from ..modeling import weights_fingerprint

    cached = provenance.get("vae", {})
    fingerprint = weights_fingerprint(vae.vae if hasattr(vae, "vae") else vae)
    if cached.get("fingerprint") != fingerprint:
        raise ValueError(
            f"The latent cache at {where} was made by another VAE ({cached.get('class_name')}, fingerprint "
            f"{str(cached.get('fingerprint'))[:12]}...) than the one given to decode the samples (fingerprint "
            f"{fingerprint[:12]}...). Pass the VAE that built the cache (its cache.json names it), or leave "
            "vae=None to measure without decoded samples."
        )


def _one_shape(latents: list[torch.Tensor], where: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Stack the latents of the most common shape (aspect-ratio buckets give several); say how many were left out."""
    if not latents:
        raise ValueError(f"{where} holds no latents.")
    shapes = Counter(tuple(x.shape) for x in latents)
    shape, count = shapes.most_common(1)[0]
    kept = torch.stack([x for x in latents if tuple(x.shape) == shape])
    return kept, {"source": where, "shape": list(shape), "num_left_out_other_shapes": len(latents) - count}


def load_latents(
    source: Any, vae: Any = None, max_latents: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents (N, C, h, w) or (N, C, T, h, w) as float32 from `source`, and a description of where they came from.

    Args:
        source: a tensor; a `diffusers_vae_ext.cache.LatentCacheDataset`; or a cache folder or URL (`s3://...`,
            read with `LatentCacheIterableDataset`).
        vae: the VAE (model or adapter) that will decode samples; a cache made by another VAE is refused.
        max_latents: read at most this many samples from a cache (the first ones in index order; all by default).
        seed: the seed of the cache's posterior draws (one per sample id, as training would draw them in epoch 0).
    """
    if isinstance(source, torch.Tensor):
        return source.float(), {"source": "tensor", "shape": list(source.shape[1:]), "num_left_out_other_shapes": 0}
    from ..cache import LatentCacheDataset, LatentCacheIterableDataset

    if isinstance(source, LatentCacheDataset):
        where = str(source.path)
        _check_vae(source.info["provenance"], vae, where)
        raw = LatentCacheDataset(source.path, sample_posterior=source.sample_posterior, seed=source.seed, scale=False)
        count = len(raw) if max_latents is None else min(len(raw), max_latents)
        return _one_shape([raw[i]["latents"] for i in range(count)], where)
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        if "://" in where and not where.startswith("file://"):
            stream = LatentCacheIterableDataset(where, seed=seed, scale=False, shuffle=False, rank=0, world_size=1)
            _check_vae(stream.info["provenance"], vae, where)
            latents = []
            for item in stream:
                latents.append(item["latents"])
                if max_latents is not None and len(latents) >= max_latents:
                    break
            return _one_shape(latents, where)
        return load_latents(LatentCacheDataset(where, seed=seed), vae, max_latents, seed)
    raise TypeError(
        f"measure_diffusability takes a latent tensor, a LatentCacheDataset or a cache path/URL, got {type(source)}."
    )
