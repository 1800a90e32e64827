"""`LatentCacheIterableDataset`: stream a latent cache from a folder or URL, each sample once per epoch.

For trainers at scale: it reads the small shard list (`shards.jsonl`), never the index, and fetches only the
shards its consumer needs (the next one while the current one is served). Consumers are the (rank, DataLoader
worker) pairs; the shards, in a seeded order per epoch, are laid end to end and every consumer takes one
contiguous range of samples of that sequence, so each sample is served exactly once per epoch across all of them,
also when there are fewer shards than consumers, and consumers differ by at most one sample.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .format import SHARDS_FILE
from .readers import CacheItemReader
from .storage import CacheStore, safetensors_metadata


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    # accelerate launch / torchrun set these before the process group exists.
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class LatentCacheIterableDataset(CacheItemReader, IterableDataset):
    """A latent cache (local folder or any fsspec URL) as a stream of training items, split across ranks and workers.

    Args:
        url: the cache: a folder or a URL such as `s3://bucket/cache`.
        sample_posterior, seed, scale, return_moments: as in `LatentCacheDataset`; items are identical to its
            items for the same (seed, epoch, sample id).
        epoch (`int`, defaults to 0): the epoch (posterior draws and shuffling); see `set_epoch`.
        shuffle (`bool`, defaults to `True`): visit the shards in a seeded order per epoch and pass the samples
            through a seeded shuffle buffer.
        shuffle_buffer (`int`, defaults to 1000): samples held for shuffling (per consumer).
        batch_size (`int`, *optional*): yield batches (collated dicts) in which all samples share one bucket,
            instead of single items; use `DataLoader(dataset, batch_size=None)` then.
        drop_last (`bool`, defaults to `False`): with `batch_size`, drop each bucket's last, incomplete batch.
        storage_options (`dict`, *optional*): fsspec options for the URL (credentials, endpoint).
        rank, world_size (`int`, *optional*): this process's place among the training processes; default:
            `torch.distributed` when initialised, else the `RANK` / `WORLD_SIZE` environment, else 0 of 1.

    Every sample is served once per epoch across all ranks and workers. Under DDP ranks may get a few more or
    fewer batches than each other (at most one sample each before bucketing); end epochs with `join` or count
    steps. With `persistent_workers=True` call `set_epoch` before creating the DataLoader iterator.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        sample_posterior: bool = True,
        seed: int = 0,
        scale: bool = True,
        return_moments: bool = False,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        batch_size: int | None = None,
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.store = CacheStore(url, storage_options)
        self._read_cache_info(self.store.read_info(), url, sample_posterior, seed, scale, return_moments)
        listing = self.store.get(SHARDS_FILE)
        if listing is None:
            raise FileNotFoundError(
                f"{self.store.display(SHARDS_FILE)} is missing: rebuild the cache with --overwrite."
            )
        self.shards = [json.loads(line) for line in listing.decode("utf-8").splitlines() if line]
        self.num_samples = sum(shard["samples"] for shard in self.shards)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.epoch, self.shuffle, self.shuffle_buffer = epoch, shuffle, max(1, shuffle_buffer)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Use the posterior draws and the shuffling of `epoch` from the next iteration on."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        """(index, count) of this (rank, worker) among all consumers."""
        rank, world = _distributed_rank_and_size()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def ranges(self, consumer: int, consumers: int) -> list[tuple[str, int, int]]:
        """(shard, first, end) sample ranges of `consumer` this epoch: its contiguous share of all samples."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)
        low = consumer * self.num_samples // consumers
        high = (consumer + 1) * self.num_samples // consumers
        ranges, position = [], 0
        for i in order:
            count = self.shards[i]["samples"]
            first, end = max(low, position), min(high, position + count)
            if first < end:
                ranges.append((self.shards[i]["shard"], first - position, end - position))
            position += count
        return ranges

    def _read_shard(self, name: str) -> tuple[list[dict[str, Any]], Any]:
        """(records, tensor getter) of one shard: memory-mapped locally, one download remotely."""
        if self.store.local:
            handle = safe_open(self.store.path(name), framework="pt")
            return json.loads(handle.metadata()["samples"]), handle.get_tensor
        data = self.store.get(name)
        if data is None:
            raise FileNotFoundError(f"{self.store.display(name)} is missing: the cache is damaged, rebuild it.")
        tensors = load_safetensors(data)
        return json.loads(safetensors_metadata(data)["samples"]), tensors.__getitem__

    def _samples(self, ranges: list[tuple[str, int, int]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=1) as pool:  # the next shard downloads while this one is served
            pending: Future | None = pool.submit(self._read_shard, ranges[0][0]) if ranges else None
            for i, (_, first, end) in enumerate(ranges):
                records, get = pending.result()
                pending = pool.submit(self._read_shard, ranges[i + 1][0]) if i + 1 < len(ranges) else None
                for record in records[first:end]:
                    yield record, get(record["key"])

    def _items(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        samples = self._samples(self.ranges(consumer, consumers))
        if self.shuffle:
            rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{consumer}")
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for record, moments in samples:
            yield self._item(record, moments)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size is None:
            yield from self._items()
        else:
            yield from bucket_batches(self._items(), self.batch_size, self.drop_last)


def _shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer: hold `size` samples, serve a random one as each new one arrives."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def bucket_batches(items: Iterator[dict[str, Any]], batch_size: int, drop_last: bool = False) -> Iterator[dict]:
    """Collated batches of `batch_size` items that share one bucket, in the order the buckets fill up.

    The remainders come last, one per bucket (dropped with `drop_last`). Works on any iterable of cache items,
    e.g. `bucket_batches(iter(LatentCacheIterableDataset(url)), 16)`.
    """
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        group = pending.setdefault(tuple(item["bucket"].tolist()), [])
        group.append(item)
        if len(group) == batch_size:
            yield default_collate(pending.pop(tuple(item["bucket"].tolist())))
    if not drop_last:
        for bucket in sorted(pending):
            yield default_collate(pending[bucket])
