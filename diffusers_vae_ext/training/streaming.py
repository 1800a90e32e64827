"""Training data streamed from the cache's source units: webdataset shards, parquet, URLs (s3://...), video folders.

The order of an epoch is one rule, shared with the map-style path of local folders (`EpochOrderSampler`):

1. the source's units (a tar, a parquet row group, a slice of `--unit_size` images or videos) in a seeded order per
   (seed, epoch);
2. consumer `c` of `C` (a consumer is a (process, DataLoader worker) pair, `c = rank * workers + worker`) takes the
   units `order[c::C]`, so each unit, hence each sample, is read by exactly one consumer per epoch;
3. the consumer's samples in unit order pass through a seeded shuffle buffer (`--shuffle_buffer`, per (seed, epoch,
   consumer)); each sample's crop and flip come from `data.augmentation_rng(seed, epoch, content hash)`.

Each consumer's stream is endless: when its units of epoch `e` are used up it goes on with its units of `e + 1`, so
no process ever runs out of batches before another (no uneven-end hang under DDP), and the run's length is
`--max_train_steps`. Nothing is counted up front: listing the units is the only work before the first batch.

Every sample carries (consumer, epoch, index among the buffer's outputs); `StreamedLoader` remembers the last one it
handed to the loop per consumer, checkpoints save it (`data_state.json`), and a resumed consumer replays its epoch's
unit reads and buffer without decoding up to there, then goes on with the same samples, order and crops.

Inputs that cannot be used (a broken tar member, an unreadable image, a video that gives no clip) are skipped,
logged and listed in `<output_dir>/skipped.jsonl` with the reason, never a crash mid-epoch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..cache.sources import Source, Unit, VideoFolderSource, read_unit_items
from ..cache.streaming import _shuffled as shuffle_buffer
from ..data import (
    UnreadableImageError,
    augmentation_rng,
    content_key,
    load_image_rgb,
    pil_to_tensor,
    random_crop_and_flip,
    to_model_channels,
)

logger = logging.getLogger(__package__)

SKIPPED_FILE = "skipped.jsonl"
DATA_STATE_FILE = "data_state.json"


def unit_order(num_units: int, seed: int, epoch: int, repeat: int = 0) -> list[int]:
    """The units of `epoch` in their seeded order (the same on every process and machine)."""
    order = list(range(num_units))
    random.Random(f"units:{seed}:{epoch}" + (f":{repeat}" if repeat else "")).shuffle(order)
    return order


def buffer_rng(seed: int, epoch: int, consumer: int, repeat: int = 0) -> random.Random:
    return random.Random(f"buffer:{seed}:{epoch}:{consumer}" + (f":{repeat}" if repeat else ""))


class EpochOrderSampler(torch.utils.data.Sampler[int]):
    """The map-style twin of the streamed order: what one consumer of the same units would read, as indices.

    Args:
        unit_lengths: training items per unit, in listing order (item indices run through the units in order).
        seed: the run's seed.
        shuffle_buffer: the size of the simulated shuffle buffer.
        repeats: passes per epoch (`TrainingImageDataset.repeats`); pass `r` reads indices `r * total + i` in its
            own seeded order.

    accelerate's prepared DataLoader forwards `set_epoch` to it and deals its batches out to the processes.
    """

    def __init__(self, unit_lengths: Sequence[int], seed: int = 0, shuffle_buffer: int = 1000, repeats: int = 1):
        self.unit_lengths = list(unit_lengths)
        self.starts = [sum(self.unit_lengths[:k]) for k in range(len(self.unit_lengths))]
        self.total = sum(self.unit_lengths)
        self.seed, self.shuffle_buffer, self.repeats = seed, max(1, shuffle_buffer), repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total * self.repeats

    def __iter__(self) -> Iterator[int]:
        for repeat in range(self.repeats):
            order = unit_order(len(self.unit_lengths), self.seed, self.epoch, repeat)
            indices = (self.starts[u] + i for u in order for i in range(self.unit_lengths[u]))
            rng = buffer_rng(self.seed, self.epoch, 0, repeat)
            for index in shuffle_buffer(indices, self.shuffle_buffer, rng):
                yield repeat * self.total + index


class SkipReport:
    """Appends skipped inputs to `<output_dir>/skipped.jsonl` (one short line per write: safe from many workers).

    A line already there for the same (epoch, source) is not written again (a resumed run replays reads).
    """

    def __init__(self, output_dir: str | os.PathLike | None) -> None:
        self.path = None if output_dir is None else Path(output_dir) / SKIPPED_FILE
        self._seen: set[tuple[int, str]] | None = None

    def __call__(self, source: str, kind: str, reason: str, epoch: int, consumer: int) -> None:
        if self._seen is None:
            self._seen = set()
            if self.path is not None and self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        self._seen.add((row.get("epoch", -1), row.get("source", "")))
        if (epoch, source) in self._seen:
            return
        self._seen.add((epoch, source))
        logger.warning("Skipping %s (%s): %s", source, kind, reason)
        if self.path is None:
            return
        row = {"source": source, "kind": kind, "reason": reason, "epoch": epoch, "consumer": consumer}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class StreamedImages(IterableDataset):
    """Training samples (images, or clips of a video folder) streamed from a source's units; see the module docstring.

    Args:
        source: from `cache.sources.open_source` (picklable; re-opens its file system in each worker).
        units: `list(source.units())`, listed once by the main process.
        resolution, resize_to, channels, random_flip, seed: as for `data.TrainingImageDataset`.
        held_out: labels of the validation samples, never trained on.
        rank, world_size: this process among the training processes.
        shuffle_buffer: samples held per consumer for shuffling.
        output_dir: where `skipped.jsonl` is written (None: logged only).
        clip_options, frame_multiple: for a video folder: how clips are cut (`video.ClipOptions`, as `cache` and
            `stats` cut them) and the autoencoder's frame rule.

    Items: `pixel_values` (C, H, W) or (C, T, H, W) in [-1, 1]; `key` (the source label, provenance); `consumer`,
    `epoch`, `index` (where the sample sits in its consumer's stream, for exact resume).
    """

    def __init__(
        self,
        source: Source,
        units: list[Unit],
        resolution: int,
        channels: int,
        *,
        resize_to: int | None = None,
        random_flip: bool = False,
        seed: int = 0,
        held_out: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        output_dir: str | os.PathLike | None = None,
        clip_options: Any = None,
        frame_multiple: int = 1,
    ) -> None:
        self.source, self.units = source, list(units)
        self.resolution, self.resize_to = resolution, max(resize_to or resolution, resolution)
        self.channels, self.random_flip, self.seed = channels, random_flip, seed
        self.held_out = frozenset(held_out)
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.report = SkipReport(output_dir)
        self.video = source.kind == VideoFolderSource.kind
        self.clip_options, self.frame_multiple = clip_options, frame_multiple
        # consumer -> (epoch, index of the last sample it served), and which worker serves the next batch: set from
        # a checkpoint by `StreamedLoader`.
        self.resume: dict[int, tuple[int, int]] = {}
        self.worker_offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: each consumer's stream moves on to the next epoch by itself."""

    def consumer(self) -> tuple[int, int]:
        """(index, count) of this (process, worker) among all consumers."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A DataLoader takes batches from its workers in turn, starting with worker 0: after a resume, worker 0
        # plays the reader whose turn it was, so the batches come in the uninterrupted run's order.
        worker = (worker + self.worker_offset) % workers
        return self.rank * workers + worker, self.world_size * workers

    # --------------------------------------------------------------------------------------------- reading
    def _light_items(self, units: list[Unit], epoch: int, consumer: int) -> Iterator[tuple[str, Any]]:
        """(label, payload) of the usable items of `units` in order, before decoding: bytes, or a `VideoClip`."""
        if self.video:
            from ..video import VideoError, clips_from_file  # PyAV only where videos are read
        for unit in units:
            for item in read_unit_items(self.source, unit):
                if item.error is not None:
                    self.report(item.label, *item.error, epoch, consumer)
                    continue
                if item.label in self.held_out:
                    continue
                if not self.video:
                    yield item.label, item.data
                    continue
                path = item.extra["path"]
                try:
                    clips = clips_from_file(path, self.clip_options, self.frame_multiple, item.label)
                except VideoError as err:
                    self.report(item.label, err.kind, err.reason, epoch, consumer)
                    continue
                except OSError as err:
                    self.report(item.label, "unreadable", f"cannot read: {err}", epoch, consumer)
                    continue
                for clip in clips:
                    yield f"{item.label}#clip{clip.index}", clip

    def _decode(self, label: str, payload: Any, epoch: int, consumer: int) -> torch.Tensor | None:
        """The sample's pixels with its crop and flip, or None (reported) when it cannot be decoded."""
        if self.video:
            return self._decode_clip(label, payload, epoch, consumer)
        try:
            image = load_image_rgb(io.BytesIO(payload))
        except UnreadableImageError as err:
            self.report(label, "unreadable", err.reason, epoch, consumer)
            return None
        except Exception as err:  # a decoder bug on one odd file must not stop a long run; it is reported
            self.report(label, "unreadable", f"{type(err).__name__}: {err}", epoch, consumer)
            return None
        rng = augmentation_rng(self.seed, epoch, content_key(payload))
        image = random_crop_and_flip(image, self.resolution, self.resize_to, rng, True, self.random_flip)
        return to_model_channels(pil_to_tensor(image), self.channels)

    def _decode_clip(self, label: str, clip: Any, epoch: int, consumer: int) -> torch.Tensor | None:
        from ..video import VideoError, frames_to_tensor, read_frames  # PyAV only where videos are read

        try:
            frames = read_frames(clip)
        except VideoError as err:
            self.report(label, err.kind, err.reason, epoch, consumer)
            return None
        except Exception as err:
            self.report(label, "unreadable", f"{type(err).__name__}: {err}", epoch, consumer)
            return None
        # One crop and flip for the whole clip, keyed by the clip's id (video content hash + clip index).
        rng = augmentation_rng(self.seed, epoch, clip.clip_id)
        state = rng.bit_generator.state
        cropped = []
        for frame in frames:
            rng.bit_generator.state = state  # the same draws for every frame
            image = random_crop_and_flip(
                Image.fromarray(frame), self.resolution, self.resize_to, rng, True, self.random_flip
            )
            cropped.append(image)
        video = frames_to_tensor(np.stack([np.asarray(image) for image in cropped]))
        return to_model_channels(video, self.channels)

    # ------------------------------------------------------------------------------------------- the stream
    def consumer_stream(self, consumer: int, consumers: int) -> Iterator[dict[str, Any]]:
        """Consumer `consumer`'s endless stream of samples (epoch after epoch), resumed where `resume` says."""
        start_epoch, last_index = self.resume.get(consumer, (0, -1))
        epoch = start_epoch
        while True:
            mine = [self.units[u] for u in unit_order(len(self.units), self.seed, epoch)[consumer::consumers]]
            light = self._light_items(mine, epoch, consumer)
            served = 0
            for index, (label, payload) in enumerate(
                shuffle_buffer(light, self.shuffle_buffer, buffer_rng(self.seed, epoch, consumer))
            ):
                served += 1
                if epoch == start_epoch and index <= last_index:
                    continue  # served before the checkpoint: replayed without decoding
                pixels = self._decode(label, payload, epoch, consumer)
                if pixels is not None:
                    yield {"pixel_values": pixels, "key": label, "consumer": consumer, "epoch": epoch, "index": index}
            if served == 0:
                names = [unit.name for unit in mine[:3]]
                raise RuntimeError(
                    f"Training data consumer {consumer} of {consumers} found no usable sample in epoch {epoch} "
                    f"(units {names}{'...' if len(mine) > 3 else ''}): see {SKIPPED_FILE} for what was skipped."
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self.consumer()
        if len(self.units) < consumers:
            raise ValueError(
                f"{len(self.units)} units of training data for {consumers} readers (processes x DataLoader "
                "workers): each unit is read by one reader per epoch. Lower --dataloader_num_workers, cut the "
                "data into more shards, or lower --unit_size (folders)."
            )
        yield from self.consumer_stream(consumer, consumers)


class StreamedLoader:
    """The DataLoader of a `StreamedImages`, as the loop sees it: batches on the device, and the resume state.

    Not a `DataLoader`, so `accelerator.prepare` passes it through: every process already reads its own share
    (accelerate would otherwise read the whole stream on each process, or dispatch it from the first one).
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, dataset: StreamedImages, device: torch.device):
        self.dataloader, self.dataset, self.device = dataloader, dataset, device
        self.position: dict[int, tuple[int, int]] = {}
        self.batches = 0  # handed to the loop since the run (not this process) started

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do (see `StreamedImages.set_epoch`)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Handed to the loop = trained on before the next checkpoint (the loop fetches a batch only to train on it).
        for batch in self.dataloader:
            for consumer, epoch, index in zip(
                batch["consumer"].tolist(), batch["epoch"].tolist(), batch["index"].tolist()
            ):
                self.position[consumer] = (epoch, index)
            self.batches += 1
            batch["pixel_values"] = batch["pixel_values"].to(self.device, non_blocking=True)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        info = {"workers": max(1, self.dataloader.num_workers), "processes": self.dataset.world_size}
        positions = {str(c): list(p) for c, p in sorted(self.position.items())}
        return {**info, "positions": positions, "batches": {str(self.dataset.rank): self.batches}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        here = {"workers": max(1, self.dataloader.num_workers), "processes": self.dataset.world_size}
        saved = {key: state[key] for key in here}
        if saved != here:
            raise ValueError(
                f"The checkpoint's data stream was read by {saved['processes']} processes x {saved['workers']} "
                f"DataLoader workers, this run has {here['processes']} x {here['workers']}: the samples of each "
                "reader are resumed exactly only with the same numbers. Resume with the same accelerate launch "
                "--num_processes and --dataloader_num_workers."
            )
        self.position = {int(c): (int(p[0]), int(p[1])) for c, p in state["positions"].items()}
        self.batches = int(state["batches"].get(str(self.dataset.rank), 0))
        self.dataset.resume = dict(self.position)
        self.dataset.worker_offset = self.batches % here["workers"]
