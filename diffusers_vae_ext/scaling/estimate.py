"""Latent statistics from data, and where they go.

`estimate_latent_statistics` encodes pixel batches into a `LatentStatistics`; `write_latent_statistics` writes the
numbers a convention needs into a VAE folder's config.json, atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from .latent_statistics import LatentStatistics


def posterior_seed(seed: int, index: int) -> int:
    """A 64-bit seed for the posterior noise of sample `index`, independent of batching and sharding."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


@torch.no_grad()
def encode_latents(
    vae: Any,
    pixels: torch.Tensor,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Unscaled latents of `pixels` (N, C, H, W) in [-1, 1]: posterior samples or posterior means.

    With `seeds` (one per image) each image's noise comes from its own CPU generator, so a sample's latent does
    not depend on which batch or process encoded it; otherwise noise is drawn from `generator`.
    """
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    if not sample_posterior:
        return posterior.mean
    if seeds is None:
        return posterior.sample(generator=generator)
    if len(seeds) != pixels.shape[0]:
        raise ValueError(f"Got {len(seeds)} seeds for {pixels.shape[0]} images.")
    shape = posterior.mean.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return posterior.mean + posterior.std * noise.to(device=posterior.mean.device, dtype=posterior.mean.dtype)


def estimate_latent_statistics(
    vae: Any,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, Sequence[int]]],
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    accelerator: Any = None,
    show_progress: bool = True,
    total: int | None = None,
) -> LatentStatistics:
    """Encode `batches` of pixels with `vae` and accumulate the statistics of the latents.

    Args:
        vae: an `AutoencoderKL` (ours or diffusers'); it runs on its own device and dtype, in `no_grad`.
        batches: pixel tensors (N, C, H, W) in [-1, 1], or `(pixels, seeds)` pairs with one posterior-noise seed
            per image (see `encode_latents`; the script uses `posterior_seed(seed, index)` so the result does not
            depend on the number of processes).
        sample_posterior: statistics of posterior samples `mean + std * eps` (the latent-diffusion recipe, and
            what a trainer that samples the posterior sees) or of the posterior means (what a trainer that
            encodes with `.mode()` or caches means sees). Samples have the larger variance by the average
            posterior variance, so the factor differs; use the one that matches training.
        generator: noise for `sample_posterior` when `batches` yields plain tensors.
        accelerator: an `accelerate.Accelerator` or `PartialState`; when given, the statistics of all processes
            are merged (`LatentStatistics.all_reduce`) and every rank returns the same result. Each process must
            be fed a disjoint shard of the data.
        show_progress: a tqdm bar counting images (on the local main process only).
        total: number of images expected, for the progress bar.
    """
    from tqdm.auto import tqdm

    stats = LatentStatistics(num_channels=vae.config.latent_channels, sample_posterior=sample_posterior)
    is_main = accelerator is None or getattr(accelerator, "is_local_main_process", True)
    with tqdm(total=total, disable=not (show_progress and is_main), desc="Encoding", unit="img") as progress:
        for batch in batches:
            pixels, seeds = batch if isinstance(batch, (tuple, list)) else (batch, None)
            stats.update(encode_latents(vae, pixels, sample_posterior, generator=generator, seeds=seeds))
            progress.update(pixels.shape[0])
    if accelerator is not None:
        stats.all_reduce(accelerator)
    return stats


# ===================================================================================================== config


def write_latent_statistics(
    vae_folder: str | os.PathLike, stats: LatentStatistics, convention: str = "scale"
) -> dict[str, tuple[Any, Any]]:
    """Write `stats.config_updates(convention)` into `vae_folder/config.json`, atomically.

    `"scale"` writes `scaling_factor`; `"shift"` writes `shift_factor` and `scaling_factor`; `"per_channel"`
    writes `latents_mean`, `latents_std` and `scaling_factor = 1.0` (diffusers' pipelines compute
    `(z - latents_mean) * scaling_factor / latents_std`, so 1.0 gives unit variance). The keys of the other
    conventions are set to null so the pipelines apply exactly the convention written. Every other key and the
    key order are kept. The new file is written next to the old one, flushed to disk and moved over it with
    `os.replace`, so a crash leaves either the old or the new config, never a partial one.

    Returns `{key: (old, new)}` for the keys that changed.
    """
    path = Path(vae_folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --vae must be a local VAE folder to write its config.")
    config = json.loads(path.read_text(encoding="utf-8"))
    changes = {}
    for key, value in stats.config_updates(convention).items():
        if config.get(key) != value and not (value is None and key not in config):
            changes[key] = (config.get(key), value)
            config[key] = value
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")
    return changes


# Kept for callers of the old private name; the one implementation is `atomic.atomic_write_text`.
_atomic_write_text = atomic_write_text
