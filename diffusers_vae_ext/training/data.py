"""The trainer's data: training and held-out images, the training DataLoader, and the posterior noise per step.

Everything here is a function of (seed, epoch, step), so a resumed run sees the same batches, crops and noise.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import (
    EpochShuffleSampler,
    TrainingImageDataset,
    list_image_files,
    open_dataset,
    sample_photos,
    to_rgb,
)

logger = logging.getLogger(__package__)

# Validation photo held out of the built-in sample set: a still life the model never sees in training.
BUILTIN_VALIDATION_PHOTOS = ("coffee",)


class DatasetImages(Sequence):
    """A `datasets` image column as a lazy sequence of RGB PIL images, optionally restricted to `rows`.

    Rows are decoded when a DataLoader worker asks for them, so a large dataset is never held in memory.
    """

    def __init__(self, dataset: Any, column: str, rows: Sequence[int] | None = None):
        self.dataset, self.column = dataset, column
        self.rows = list(range(len(dataset))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Image.Image:
        return to_rgb(self.dataset[self.rows[index]][self.column])

    def subset(self, positions: Sequence[int]) -> DatasetImages:
        return DatasetImages(self.dataset, self.column, [self.rows[p] for p in positions])


def load_dataset_images(args: argparse.Namespace) -> DatasetImages:
    dataset = open_dataset(args.dataset_name, args.dataset_split)
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {args.image_column!r} is not a column of {args.dataset_name}: {dataset.column_names}"
        )
    return DatasetImages(dataset, args.image_column)


def training_images(args: argparse.Namespace) -> tuple[list, list, str]:
    """(training images, held-out validation images, description); files, or PIL images for built-in data."""
    if args.train_data_dir:
        images: Sequence = list_image_files(args.train_data_dir)
        source = f"{len(images)} images from {args.train_data_dir}"
    elif args.dataset_name:
        images = load_dataset_images(args)
        if not images:
            raise ValueError(f"The dataset {args.dataset_name!r} has no rows in split {args.dataset_split!r}.")
        source = f"{len(images)} images from {args.dataset_name}"
    else:
        photos = sample_photos()
        validation = [photos.pop(name) for name in BUILTIN_VALIDATION_PHOTOS]
        return list(photos.values()), validation, f"the {len(photos)} built-in sample photos (scikit-image)"
    if len(images) < 2:
        logger.warning("Only one training image: validation uses it too (it is not held out).")
        return images, images, source
    held_out = max(1, min(args.num_validation_images, len(images) // 5))
    # Hold out an evenly spread, deterministic subset so the same images are validated on every run.
    picks = sorted(set(np.linspace(0, len(images) - 1, held_out).round().astype(int).tolist()))
    rest = sorted(set(range(len(images))) - set(picks))
    if isinstance(images, DatasetImages):
        return images.subset(rest), images.subset(picks), f"{source} ({len(picks)} held out for validation)"
    train, validation = [images[index] for index in rest], [images[index] for index in picks]
    return train, validation, f"{source} ({len(validation)} held out for validation)"


def validation_batch(
    images: list, resolution: int, channels: int, count: int, resize_to: int | None = None
) -> torch.Tensor:
    """`count` fixed crops of the held-out images (several per image when there are fewer images than `count`)."""
    count = max(count, len(images))
    dataset = TrainingImageDataset(
        images, resolution, channels, random_crop=True, seed=2**31 - 1, min_length=count, resize_to=resize_to
    )
    return torch.stack([dataset[index]["pixel_values"] for index in range(count)])


def training_dataloader(
    images: Sequence, resolution: int, channels: int, args: argparse.Namespace, num_processes: int
) -> tuple[TrainingImageDataset, torch.utils.data.DataLoader]:
    """Random crops (and flips) of `images` in a per-epoch shuffled order: (dataset, unprepared DataLoader)."""
    dataset = TrainingImageDataset(
        images,
        resolution,
        channels,
        random_crop=True,
        random_flip=args.random_flip,
        seed=args.seed,
        min_length=args.train_batch_size * num_processes * args.gradient_accumulation_steps,
        resize_to=args.resize_to,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=args.seed),
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return dataset, dataloader


def posterior_noise(shape: tuple[int, ...], seed: int, step: int, micro_step: int, rank: int) -> torch.Tensor:
    # Posterior noise as a function of (seed, step, micro step, rank): resumed runs draw the same eps.
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1)[0])
    )
    return torch.randn(shape, generator=generator)
