"""Training clips from a local folder of videos, cut exactly as `cache` and `stats` cut them (`video.ClipOptions`).

Batches follow the trainer's contract: `{"pixel_values": (N, C, T, H, W)}` in [-1, 1] (images stay (N, C, H, W)).
Clips are planned once from the files' timestamps (no pixel decoded), whole videos are held out for validation,
and every clip is decoded on demand with one resize and one random crop (and flip) for all its frames, drawn from
(seed, epoch, index), so a resumed run sees the same batches.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import EpochShuffleSampler
from ..video import (
    ClipOptions,
    VideoClip,
    VideoError,
    clips_from_file,
    frames_to_tensor,
    has_videos,
    import_av,
    list_videos,
    read_frames,
)

logger = logging.getLogger(__package__)


def clip_options(args: argparse.Namespace, frame_multiple: int, class_name: str) -> ClipOptions:
    """`--num_frames` (default: `frame_multiple + 1`, the class's shortest clip with motion), `--frame_stride` /
    `--fps`, `--clips_per_video`, checked against the class's frame rule before any file is read."""
    num_frames = args.num_frames if args.num_frames is not None else frame_multiple + 1
    options = ClipOptions(
        num_frames=num_frames, frame_stride=args.frame_stride, fps=args.fps, clips_per_video=args.clips_per_video
    )
    options.check(frame_multiple, class_name)
    return options


def training_clips(
    args: argparse.Namespace, frame_multiple: int, class_name: str
) -> tuple[list[VideoClip], list[VideoClip], str]:
    """(training clips, held-out clips, description) of the videos in `--train_data_dir`.

    One video in five (at least one when there are two or more) is held out whole, evenly spread over the sorted
    list, so validation clips are never seen in training. Videos that cannot give a clip are skipped and listed.
    """
    options = clip_options(args, frame_multiple, class_name)
    folder = args.train_data_dir
    if not folder or not Path(folder).is_dir() or not has_videos(folder):
        given = f"--train_data_dir {folder}" if folder else ("--dataset_name" if args.dataset_name else "no data")
        raise ValueError(
            f"{class_name} is a video autoencoder and trains on clips, but {given} has no video files. Pass a "
            "folder of videos (.mp4, .webm, .mov, ...) with --train_data_dir, or train an image class."
        )
    import_av()
    videos = [path for path in list_videos(folder) if Path(path).is_file()]
    per_video: list[list[VideoClip]] = []
    skipped: list[str] = []
    for path in videos:
        try:
            per_video.append(
                clips_from_file(path, options, frame_multiple, video_id=str(Path(path).relative_to(folder)))
            )
        except VideoError as err:
            skipped.append(f"{path}: {err}")
    for line in skipped:
        logger.warning("Skipped %s", line)
    if not per_video:
        raise ValueError(f"No video in {folder} gives a clip of {options.num_frames} frames: {'; '.join(skipped)}")
    if len(per_video) < 2:
        logger.warning("Only one usable video: validation uses its clips too (they are not held out).")
        train, validation = per_video, per_video
    else:
        held_out = max(1, len(per_video) // 5)
        picks = set(np.linspace(0, len(per_video) - 1, held_out).round().astype(int).tolist())
        train = [clips for index, clips in enumerate(per_video) if index not in picks]
        validation = [clips for index, clips in enumerate(per_video) if index in picks]
    train_clips = [clip for clips in train for clip in clips]
    validation_clips = [clip for clips in validation for clip in clips]
    description = (
        f"{len(train_clips)} clips of {options.num_frames} frames from {len(train)} videos in {folder} "
        f"({len(validation_clips)} clips of {len(validation)} held-out videos for validation"
        + (f", {len(skipped)} videos skipped" if skipped else "")
        + ")"
    )
    return train_clips, validation_clips, description


def crop_clip(
    frames: np.ndarray, resolution: int, resize_to: int | None = None, top_left: tuple[int, int] | None = None
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> (3, T, resolution, resolution) in [-1, 1]: the short side resized to
    `resize_to` (default `resolution`), then the same square crop of every frame at `top_left` (default: centred)."""
    short = max(resize_to or resolution, resolution)
    height, width = frames.shape[1:3]
    scale = short / min(height, width)
    size = (max(short, round(width * scale)), max(short, round(height * scale)))
    if top_left is None:
        top_left = ((size[1] - resolution) // 2, (size[0] - resolution) // 2)
    top, left = top_left
    box = (left, top, left + resolution, top + resolution)
    cropped = [np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC).crop(box)) for frame in frames]
    return frames_to_tensor(np.stack(cropped))


class ClipDataset(torch.utils.data.Dataset):
    """Clips decoded on demand as (C, T, resolution, resolution) in [-1, 1]: the short side resized to `resize_to`,
    then one random square crop (and optional flip) for all frames of a clip, drawn from (seed, epoch, index) so a
    resumed run sees the same pixels. `min_length` repeats the clips to fill a batch."""

    def __init__(
        self,
        clips: Sequence[VideoClip],
        resolution: int,
        seed: int = 0,
        random_flip: bool = False,
        min_length: int = 0,
        resize_to: int | None = None,
    ):
        if not clips:
            raise ValueError("No clips to train on.")
        self.clips, self.resolution, self.seed, self.random_flip = list(clips), resolution, seed, random_flip
        self.resize_to = resize_to
        self.length = max(len(self.clips), min_length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip = self.clips[index % len(self.clips)]
        frames = read_frames(clip)
        generator = np.random.default_rng([self.seed, self.epoch, index])
        if self.random_flip and generator.random() < 0.5:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        short = max(self.resize_to or self.resolution, self.resolution)
        height, width = frames.shape[1:3]
        scale = short / min(height, width)
        spare_h = max(short, round(height * scale)) - self.resolution
        spare_w = max(short, round(width * scale)) - self.resolution
        top_left = (int(generator.integers(0, spare_h + 1)), int(generator.integers(0, spare_w + 1)))
        return {"pixel_values": crop_clip(frames, self.resolution, self.resize_to, top_left)}


def clip_dataloader(
    clips: Sequence[VideoClip], resolution: int, args: argparse.Namespace, num_processes: int
) -> tuple[ClipDataset, torch.utils.data.DataLoader]:
    """Clips in a per-epoch shuffled order: (dataset, unprepared DataLoader), like `data.training_dataloader`."""
    dataset = ClipDataset(
        clips,
        resolution,
        seed=args.seed,
        random_flip=args.random_flip,
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


def validation_clips_batch(
    clips: Sequence[VideoClip], resolution: int, count: int, resize_to: int | None = None
) -> torch.Tensor:
    """Up to `count` held-out clips, centre-cropped as `ClipDataset` crops, stacked (N, C, T, H, W)."""
    return torch.stack([crop_clip(read_frames(clip), resolution, resize_to) for clip in list(clips)[: max(count, 1)]])
