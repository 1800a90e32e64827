"""What is written at the end besides the weights: the latent statistics measured on the training images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import TrainingImageDataset
from ..modeling import AutoencoderKL


@torch.no_grad()
def recompute_scaling_factor(
    vae: AutoencoderKL,
    images: Sequence,
    resolution: int,
    channels: int,
    args: argparse.Namespace,
    output_dir: Path,
) -> None:
    """Measure the trained VAE's latent statistics on centre crops of `images`; write them into its config."""
    from ..scaling import estimate_latent_statistics, scaling_convention, write_latent_statistics

    vae.eval()
    dataset = TrainingImageDataset(images, resolution, channels, random_crop=False, resize_to=args.resize_to)
    pixels = [dataset[index]["pixel_values"] for index in range(len(dataset))]
    batches = (
        torch.stack(pixels[i : i + args.train_batch_size]) for i in range(0, len(pixels), args.train_batch_size)
    )
    stats = estimate_latent_statistics(
        vae, batches, generator=torch.Generator().manual_seed(args.seed), show_progress=False, total=len(pixels)
    )
    convention = scaling_convention(vae.config)
    changes = write_latent_statistics(output_dir, stats, convention=convention)
    summary = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items() if not isinstance(new, list))
    print(f"Latent statistics of {len(pixels)} training images written to the config ({convention}): {summary}")
