"""The trainer's data: training and held-out images or clips, the training DataLoader, the posterior noise per step.

Every input the latent cache reads comes through `training_images` (see there, and `streaming.py` for the order
and the split across processes and workers), video folders for video classes included. Everything is a function
of (seed, epoch, step, sample), so a resumed run sees the same batches, crops and noise.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..cache.sources import FolderSource, VideoFolderSource, open_source, read_unit_items
from ..data import (
    EpochShuffleSampler,
    TrainingImageDataset,
    UnreadableImageError,
    load_image_rgb,
    open_dataset,
    sample_photos,
    to_rgb,
)
from .streaming import DATA_STATE_FILE, SKIPPED_FILE, EpochOrderSampler, StreamedImages, StreamedLoader

logger = logging.getLogger(__package__)

_NUM_FRAMES_NEEDED = (
    "Training on videos needs --num_frames (every clip of a batch has the same length), e.g. --num_frames 17 for "
    "Wan / HunyuanVideo (4k+1), 17 for LTX-Video / CogVideoX (8k+1)."
)

# Validation photo held out of the built-in sample set: a still life the model never sees in training.
BUILTIN_VALIDATION_PHOTOS = ("coffee",)

# Default --unit_size: images per unit, and videos per unit (a video gives clips that are each decoded, so units of
# videos are smaller, as `diffusers-vae cache` cuts them: enough units for several processes x workers).
IMAGE_UNIT_SIZE = 512
VIDEO_UNIT_SIZE = 32


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


class UnitImages(list):
    """A list of training images (files or PIL images) that knows how many of them each unit of the listing holds."""

    unit_lengths: list[int]


class StreamedSource(Sequence):
    """A source read as a stream (shards, parquet, URLs, videos): its units and the held-out labels.

    As a sequence it is a small sample of decoded-ready training images (up to `sample_size` encoded images, or the
    first frame of clips, read from the first units on first use): what the fp16-safe calibration and
    `--recompute_scaling_factor` measure on, since a stream has no random access.
    """

    def __init__(
        self,
        source: Any,
        units: list,
        held_out: Sequence[str],
        sample_size: int = 256,
        clip_options=None,
        frame_multiple: int = 1,
    ):
        self.source, self.units, self.held_out = source, units, list(held_out)
        self.sample_size, self.clip_options, self.frame_multiple = sample_size, clip_options, frame_multiple
        self._sample: list | None = None

    @property
    def video(self) -> bool:
        return self.source.kind == VideoFolderSource.kind

    def _images(self) -> list:
        if self._sample is None:
            self._sample = [payload for _, payload in _usable(self, self.sample_size, skip=set(self.held_out))]
        return self._sample

    def __len__(self) -> int:
        return len(self._images())

    def __getitem__(self, index):
        return self._images()[index]


def _usable(stream: StreamedSource, count: int, skip: set[str] = frozenset()) -> list[tuple[str, Any]]:
    """The first `count` readable images of the source in listing order: (label, bytes); for videos (label, the
    first frame of the first clip as a PIL image)."""
    from ..video import VideoError, clips_from_file, read_frames

    found: list[tuple[str, Any]] = []
    for unit in stream.units:
        for item in read_unit_items(stream.source, unit):
            if item.error is not None or item.label in skip:
                continue
            if stream.video:
                try:
                    path, options = item.extra["path"], stream.clip_options
                    clip = clips_from_file(path, options, stream.frame_multiple, item.label)[0]
                    found.append((item.label, Image.fromarray(read_frames(clip)[0])))
                except (VideoError, OSError):
                    continue
            else:
                try:
                    load_image_rgb(io.BytesIO(item.data))
                except UnreadableImageError:
                    continue
                found.append((item.label, item.data))
            if len(found) >= count:
                return found
    return found


def clip_options(
    args: argparse.Namespace,
    frame_multiple: int = 1,
    class_name: str = "this autoencoder",
    default_frames: bool = False,
):
    """`video.ClipOptions` from the video arguments (clips cut as `diffusers-vae cache` / `stats` cut them),
    checked against the class's frame rule (`frame_multiple * k + 1` frames) before any file is read.

    `--num_frames` unset: with `default_frames` (a video class) `frame_multiple + 1`, the class's shortest clip with
    motion; otherwise an error (every clip of a batch has the same length).
    """
    from ..video import ClipOptions

    num_frames = args.num_frames
    if num_frames is None:
        if not default_frames:
            raise ValueError(_NUM_FRAMES_NEEDED)
        num_frames = frame_multiple + 1
    options = ClipOptions(
        num_frames=num_frames,
        frame_stride=args.frame_stride,
        fps=args.fps,
        clips_per_video=args.clips_per_video,
        sequence_fps=args.sequence_fps,
    )
    options.check(frame_multiple, class_name)
    return options


def open_training_source(args: argparse.Namespace):
    """The cache's `Source` behind `--train_data_dir` (any folder, shards, parquet, URL), or None without one."""
    if not args.train_data_dir:
        return None
    source = open_source(
        args.train_data_dir,
        image_column=args.image_column if args.image_column != "image" else None,
        unit_size=args.unit_size or IMAGE_UNIT_SIZE,
        storage_options=args.storage_options,
        image_sequences=args.image_sequence,
    )
    if args.unit_size is None and source.kind == VideoFolderSource.kind:
        source.unit_size = VIDEO_UNIT_SIZE  # known only once the folder is seen to hold videos
    return source


def _no_videos_error(args: argparse.Namespace, class_name: str) -> ValueError:
    folder = args.train_data_dir
    given = f"--train_data_dir {folder}" if folder else ("--dataset_name" if args.dataset_name else "no data")
    return ValueError(
        f"{class_name} is a video autoencoder and trains on clips, but {given} has no video files. Pass a "
        "folder of videos (.mp4, .webm, .mov, ...) with --train_data_dir, or train an image class."
    )


def _held_out_videos(
    source: Any, options: Any, frame_multiple: int, count: int
) -> tuple[list[str], list[Any], list[str]]:
    """(labels, clips, reasons) of the held-out videos of a video folder: `count` videos evenly spread over the
    sorted listing (for each, the first video from there on that gives a clip), held out whole; `reasons` say why
    the videos passed over give none. Only these few videos are probed: the stream plans the others as it reads."""
    from ..video import VideoError, clips_from_file

    labels: list[str] = []
    clips: list[Any] = []
    reasons: list[str] = []
    picks = sorted(set(np.linspace(0, len(source) - 1, count).round().astype(int).tolist()))
    position = 0
    for pick in picks:
        for index in range(max(pick, position), len(source)):
            position = index + 1
            try:
                found = clips_from_file(source.videos[index], options, frame_multiple, source.labels[index])
            except (VideoError, OSError) as err:
                reasons.append(f"{source.labels[index]}: {err}")
                continue
            labels.append(source.labels[index])
            clips.extend(found)
            break
    return labels, clips, reasons


def _streamed_videos(
    args: argparse.Namespace, source: Any, options: Any, frame_multiple: int
) -> tuple[StreamedSource, list, str]:
    """A video folder as a stream of clips, with whole videos held out for validation (as many as images would be:
    one in five, at most `--num_validation_images`), their first `--num_validation_images` clips the held-out set."""
    units = list(source.units())
    count = max(1, min(args.num_validation_images, len(source) // 5))
    labels, clips, reasons = _held_out_videos(source, options, frame_multiple, count)
    if not labels:
        raise ValueError(
            f"No video in {args.train_data_dir} gives a clip of {options.num_frames} frames: {'; '.join(reasons)}"
        )
    if len(source) < 2:
        logger.warning("Only one video: validation uses its clips too (they are not held out).")
        labels = []
    stream = StreamedSource(source, units, labels, clip_options=options, frame_multiple=frame_multiple)
    validation = clips[: max(1, args.num_validation_images)]
    description = (
        f"{len(source)} videos in {source.root} ({len(units)} units of {source.unit_size}), streamed as clips of "
        f"{options.num_frames} frames ({len(labels)} held-out videos, {len(validation)} clips for validation)"
    )
    return stream, validation, description


def _is_local_image_folder(source: Any) -> bool:
    if not isinstance(source, FolderSource):
        return False
    protocols = source.fs.protocol if isinstance(source.fs.protocol, tuple) else (source.fs.protocol,)
    return "file" in protocols or "local" in protocols


def _hold_out(count: int, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """(training positions, held-out positions): an evenly spread, deterministic subset, the same on every run."""
    if count < 2:
        logger.warning("Only one training image: validation uses it too (it is not held out).")
        return list(range(count)), list(range(count))
    held_out = max(1, min(args.num_validation_images, count // 5))
    picks = sorted(set(np.linspace(0, count - 1, held_out).round().astype(int).tolist()))
    return sorted(set(range(count)) - set(picks)), picks


def _unit_lengths(count: int, unit_size: int, training: Sequence[int]) -> list[int]:
    lengths = [0] * max(1, -(-count // unit_size))
    for position in training:
        lengths[position // unit_size] += 1
    return [n for n in lengths if n]


def training_images(
    args: argparse.Namespace,
    trains_on_clips: bool = False,
    frame_multiple: int = 1,
    class_name: str = "this autoencoder",
) -> tuple[Sequence, Sequence, str]:
    """(training images or clips, held-out validation images or clips, description), one door for every input:

    - a local image folder and a `--dataset_name` dataset are read map-style (random access, today's speed) in the
      streamed order's map-style twin (`streaming.EpochOrderSampler` over units of `--unit_size` images): a
      `UnitImages` list of files, or `DatasetImages`; the built-in photos too, in their own per-epoch
      permutation (`data.EpochShuffleSampler`, so the README's first run is what it always was);
    - anything else the latent cache reads (webdataset shards, parquet, any fsspec URL) is streamed: a
      `StreamedSource`, held-out images being the first readable ones of the first units;
    - a video folder is streamed as clips (`video.ClipOptions` from the video arguments, `clip_options`) over its
      units of `--unit_size` videos, whole videos held out (`_streamed_videos`); the held-out set is a list of
      `video.VideoClip`. `trains_on_clips` (a video class, whose `frame_multiple` and `class_name` give the frame
      rule): `--num_frames` defaults to the class's shortest clip and is checked before any file is read, and the
      data must be a video folder.

    The same images as a folder and as shards (cut into units the same way) give the same samples in the same
    order with the same crops. Missing folders, empty ones and unreachable URLs fail here, before any model work.
    """
    if trains_on_clips:
        options = clip_options(args, frame_multiple, class_name, default_frames=True)
        if not args.train_data_dir or not Path(args.train_data_dir).is_dir():  # videos are read from a local folder
            raise _no_videos_error(args, class_name)
    source = open_training_source(args)
    if source is not None and source.kind == VideoFolderSource.kind:
        if not trains_on_clips:  # an image class given videos: clips of --num_frames frames
            options = clip_options(args)
        return _streamed_videos(args, source, options, frame_multiple)
    if trains_on_clips:
        raise _no_videos_error(args, class_name)
    if source is not None and not _is_local_image_folder(source):
        units = list(source.units())
        validation = _usable(StreamedSource(source, units, []), max(1, args.num_validation_images))
        if not validation:
            raise ValueError(f"No readable image in the first units of {args.train_data_dir!r}.")
        held_labels = [label for label, _ in validation]
        stream = StreamedSource(source, units, held_labels)
        what = {"webdataset": "webdataset shards", "parquet": "parquet files", "image_folder": "image folder"}
        description = (
            f"{what.get(source.kind, source.kind)} at {source.describe().get('path', args.train_data_dir)}, "
            f"{len(units)} units, streamed ({len(held_labels)} held out for validation)"
        )
        return stream, [payload for _, payload in validation], description
    if source is not None:
        files = [Path(source.root) / label for label in source.labels]
        description = f"{len(files)} images from {args.train_data_dir}"
        rest, picks = _hold_out(len(files), args)
        train = UnitImages(files[i] for i in rest)
        train.unit_lengths = _unit_lengths(len(files), args.unit_size or IMAGE_UNIT_SIZE, rest)
        return train, [files[i] for i in picks], f"{description} ({len(picks)} held out for validation)"
    if args.dataset_name:
        images = load_dataset_images(args)
        if not images:
            raise ValueError(f"The dataset {args.dataset_name!r} has no rows in split {args.dataset_split!r}.")
        rest, picks = _hold_out(len(images), args)
        train, validation = images.subset(rest), images.subset(picks)
        train.unit_lengths = _unit_lengths(len(images), args.unit_size or IMAGE_UNIT_SIZE, rest)
        return (
            train,
            validation,
            f"{len(images)} images from {args.dataset_name} ({len(picks)} held out for validation)",
        )
    photos = sample_photos()
    validation = [photos.pop(name) for name in BUILTIN_VALIDATION_PHOTOS]
    train = UnitImages(photos.values())
    train.unit_lengths = []  # no units: the README's first command keeps its order (`EpochShuffleSampler`)
    return train, validation, f"the {len(train)} built-in sample photos (scikit-image)"


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def redacted_storage_options(options: dict | None) -> dict | None:
    """`--storage_options` fit for a recipe or a log: values of credential-like keys replaced by "<redacted>"."""
    if options is None:
        return None

    def clean(value: Any, name: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if any(word in name.lower() for word in _SECRET_WORDS):
            return "<redacted>"
        return value

    return clean(options)


def describe_training_data(args: argparse.Namespace, images: Sequence) -> dict[str, Any]:
    """What a run's recipe records about its data (JSON-ready, never credentials): the input, how it is read,
    the order's settings and the held-out samples."""
    unit_size = getattr(getattr(images, "source", None), "unit_size", None) or args.unit_size or IMAGE_UNIT_SIZE
    order = {"seed": args.seed, "unit_size": unit_size, "shuffle_buffer": args.shuffle_buffer}
    if isinstance(images, StreamedSource):
        record = {**images.source.describe(), "read": "streamed", "num_units": len(images.units)}
        record["held_out"] = list(images.held_out)
        record["storage_options"] = redacted_storage_options(args.storage_options)
        if images.video:
            record["clips"] = images.clip_options.to_dict()
        return {**record, **order}
    if args.train_data_dir:
        record = {"type": "image_folder", "path": str(args.train_data_dir)}
    elif args.dataset_name:
        record = {"type": "datasets", "name": args.dataset_name, "split": args.dataset_split}
    else:
        record = {"type": "builtin_photos", "held_out": list(BUILTIN_VALIDATION_PHOTOS)}
    return {**record, "read": "map-style", "num_train_images": len(images), **order}


def validation_batch(
    images: list, resolution: int, channels: int, count: int, resize_to: int | None = None
) -> torch.Tensor:
    """`count` fixed crops of the held-out images (several per image when there are fewer images than `count`),
    (count, C, H, W); for held-out video clips (`video.VideoClip`), each clip centre-cropped, (N, C, T, H, W)."""
    from ..video import VideoClip

    if images and isinstance(images[0], VideoClip):
        from ..video import read_frames

        return torch.stack(
            [centre_cropped_clip(read_frames(clip), resolution, channels, resize_to) for clip in images]
        )
    count = max(count, len(images))
    dataset = TrainingImageDataset(
        images, resolution, channels, random_crop=True, seed=2**31 - 1, min_length=count, resize_to=resize_to
    )
    return torch.stack([dataset[index]["pixel_values"] for index in range(count)])


def centre_cropped_clip(
    frames: np.ndarray, resolution: int, channels: int = 3, resize_to: int | None = None
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> (channels, T, resolution, resolution) in [-1, 1]: each frame's short side
    resized to `resize_to` (default `resolution`), then the same centred square crop (the training crop's
    validation twin, `streaming.StreamedImages`)."""
    from ..data import random_crop_and_flip, to_model_channels
    from ..video import frames_to_tensor

    side = max(resize_to or resolution, resolution)
    cropped = [
        np.asarray(random_crop_and_flip(Image.fromarray(f), resolution, side, None, random_crop=False)) for f in frames
    ]
    return to_model_channels(frames_to_tensor(np.stack(cropped)), channels)


def training_dataloader(
    images: Sequence, resolution: int, channels: int, args: argparse.Namespace, accelerator: Any
) -> tuple[Any, Any]:
    """The training batches of `images` (from `training_images`): (dataset, DataLoader to pass to `prepare`).

    Map-style images: random crops (and flips) in the per-epoch order of `EpochOrderSampler`; accelerate deals
    the batches out to the processes. A `StreamedSource`: a `StreamedImages` split over processes and DataLoader
    workers, behind a `StreamedLoader` (which `prepare` passes through) whose position is saved in every
    checkpoint (`data_state.json`) so that a resumed run goes on with the same samples; a video folder's clips
    come cut as `images.clip_options` says, (N, C, T, H, W).
    """
    if isinstance(images, StreamedSource):
        dataset = StreamedImages(
            images.source,
            images.units,
            resolution,
            channels,
            resize_to=args.resize_to,
            random_flip=args.random_flip,
            seed=args.seed,
            held_out=images.held_out,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            shuffle_buffer=args.shuffle_buffer,
            output_dir=args.output_dir,
            clip_options=images.clip_options,
            frame_multiple=images.frame_multiple,
        )
        consumers = accelerator.num_processes * max(1, args.dataloader_num_workers)
        if len(images.units) < consumers:
            raise ValueError(
                f"{len(images.units)} units of training data for {consumers} readers ({accelerator.num_processes} "
                f"processes x {max(1, args.dataloader_num_workers)} DataLoader workers): each unit is read by one "
                "reader per epoch. Lower --dataloader_num_workers, cut the data into more shards, or lower "
                "--unit_size (folders)."
            )
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.train_batch_size,
            num_workers=args.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        loader = StreamedLoader(dataloader, dataset, accelerator.device)
        register_stream_checkpointing(accelerator, loader)
        return dataset, loader
    dataset = TrainingImageDataset(
        images,
        resolution,
        channels,
        random_crop=True,
        random_flip=args.random_flip,
        seed=args.seed,
        min_length=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        resize_to=args.resize_to,
    )
    unit_lengths = getattr(images, "unit_lengths", None)
    if unit_lengths:
        sampler = EpochOrderSampler(unit_lengths, args.seed, args.shuffle_buffer, dataset.repeats)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return dataset, dataloader


def skipped_summary(output_dir: str | Path) -> str | None:
    """One line on the inputs the stream skipped (`skipped.jsonl`), or None when it skipped none."""
    path = Path(output_dir) / SKIPPED_FILE
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return f"Skipped {len(rows)} inputs ({counts}), listed with the reasons in {path}."


def updates_per_epoch(dataloader: Any, args: argparse.Namespace) -> int:
    """Optimisation steps per epoch; a stream has no epoch the loop can count: the whole run is one pass of it
    (`--max_train_steps`), and each reader moves through the data's epochs by itself."""
    if isinstance(dataloader, StreamedLoader):
        return args.max_train_steps
    return math.ceil(len(dataloader) / args.gradient_accumulation_steps)


def epoch_batches(accelerator: Any, dataloader: Any, skip_batches: int) -> Any:
    """The batches of an epoch, without the first `skip_batches` when resuming mid-epoch.

    A stream resumes from the position saved in the checkpoint instead (replayed without decoding).
    """
    if skip_batches and not isinstance(dataloader, StreamedLoader):
        return accelerator.skip_first_batches(dataloader, skip_batches)
    return dataloader


def register_stream_checkpointing(accelerator: Any, loader: StreamedLoader) -> None:
    """Save every process's stream position into each checkpoint (`data_state.json`) and load it on resume."""
    from accelerate.utils import gather_object

    def save(models, weights, checkpoint_dir):
        states = gather_object([loader.state_dict()])
        if accelerator.is_main_process:
            merged = {**states[0], "positions": {}, "batches": {}}
            for state in states:
                merged["positions"].update(state["positions"])
                merged["batches"].update(state["batches"])
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_dir) / DATA_STATE_FILE).write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")

    def load(models, checkpoint_dir):
        path = Path(checkpoint_dir) / DATA_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not saved by a run reading streamed data, so the position "
                "in the stream is unknown. Resume with the data the checkpoint was trained on."
            )
        loader.load_state_dict(json.loads(path.read_text(encoding="utf-8")))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def posterior_noise(
    shape: tuple[int, ...], seed: int, step: int, micro_step: int, rank: int, num_processes: int = 1
) -> torch.Tensor:
    """Posterior noise of (seed, step, slot), slot = micro step x processes + rank: a resumed run draws the same
    eps, and 1 process with n accumulation steps draws what n processes draw (the same samples meet the same eps)."""
    slot = micro_step * num_processes + rank
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, slot, 0]).generate_state(1)[0]))
    return torch.randn(shape, generator=generator)
