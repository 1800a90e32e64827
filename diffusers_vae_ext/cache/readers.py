"""Reading a latent cache for training: `LatentCacheDataset` (memory-mapped, fresh posterior draws per epoch).

`make_item` turns a stored record and its moments into a training item; every reader (also the streaming
`LatentCacheIterableDataset` in `streaming.py`) builds its items there, so they agree item for item.
`CacheItemReader` holds what both datasets share: the completeness check, the layout and `make_item`'s settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .format import INDEX_FILE, StoredLayout
from .storage import load_cache_info


def draw_seed(seed: int, epoch: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_item(
    record: dict[str, Any],
    moments: torch.Tensor,
    layout: StoredLayout,
    *,
    seed: int,
    epoch: int,
    sample_posterior: bool,
    scale: bool,
    return_moments: bool,
) -> dict[str, Any]:
    """One training item from an index record and its stored tensor; every reader builds its items here.

    The posterior draw depends on (seed, epoch, sample id) only, so it is the same whichever reader, worker,
    process or position serves the sample. Deterministic latents (`layout.posterior` False) are returned as stored.
    """
    stored = moments.float()
    if not layout.posterior:
        mean, logvar = stored, None
        latents = stored.clone()
    else:
        mean, logvar = stored.chunk(2, dim=0)
        if sample_posterior:
            generator = torch.Generator().manual_seed(draw_seed(seed, epoch, record["id"]))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        else:
            latents = mean.clone()
    if scale:
        latents = layout.scale(latents)
    item = {
        "latents": latents,
        "caption": record["caption"],
        "original_size": torch.tensor(record["original_size"]),
        "crop_coords_top_left": torch.tensor(record["crop_coords_top_left"]),
        "target_size": torch.tensor(record["target_size"]),
        "bucket": torch.tensor(record["bucket"]),
        "flip": bool(record["flip"]),
        "id": record["id"],
    }
    if "num_frames" in record:  # a video clip
        item["num_frames"] = record["num_frames"]
        item["fps"] = torch.tensor(record["fps"], dtype=torch.float64)
        item["frame_indices"] = torch.tensor(record["frame_indices"])
        item["clip"] = record["clip"]
    if return_moments:
        item["mean"] = mean
        if logvar is not None:
            item["logvar"] = logvar
    return item


class CacheItemReader:
    """What both cache datasets share: the check that the cache is complete, its layout, and the `make_item`
    settings every item is built with (`sample_posterior`, `seed`, `scale`, `return_moments`; each dataset keeps
    its own `epoch` and `set_epoch`)."""

    def _read_cache_info(
        self, info: dict[str, Any], where: Any, sample_posterior: bool, seed: int, scale: bool, return_moments: bool
    ) -> None:
        if info.get("status") != "complete":
            raise ValueError(
                f"The latent cache at {where} is incomplete (status {info.get('status')!r}): a run was "
                "interrupted or is still writing. Rerun the same command to finish it."
            )
        self.info = info
        self.vae_config = info["provenance"]["vae"]["config"]
        self.layout = StoredLayout.from_provenance(info["provenance"])
        self.sample_posterior, self.seed = sample_posterior, seed
        self.scale, self.return_moments = scale, return_moments

    def _item(self, record: dict[str, Any], moments: torch.Tensor) -> dict[str, Any]:
        return make_item(
            record,
            moments,
            self.layout,
            seed=self.seed,
            epoch=self.epoch,
            sample_posterior=self.sample_posterior,
            scale=self.scale,
            return_moments=self.return_moments,
        )


class LatentCacheDataset(CacheItemReader, Dataset):
    """A latent cache as a map-style dataset: one dict per cached sample, in index order.

    Args:
        path: the cache folder (`cache.json`, `index.jsonl`, `shards/`).
        sample_posterior (`bool`, defaults to `True`): draw `latents = mean + exp(logvar / 2) * eps` with `eps`
            from a `torch.Generator` seeded by (`seed`, epoch, sample id), so draws are reproducible, independent
            of worker count and order, and fresh each epoch (`set_epoch`); `False` returns the posterior mean.
            Has no effect on caches of deterministic autoencoders (AutoencoderDC, AutoencoderTiny: provenance
            `moments.kind == "latents"`): their stored latents are returned as they are, every epoch.
        seed (`int`, defaults to 0): base seed of the draws.
        scale (`bool`, defaults to `True`): apply the scaling its autoencoder class's pipelines apply (recorded
            in the provenance: `scaling_factor`, `shift_factor`, or per-channel `latents_mean`/`latents_std` from
            the config or, for LTX-Video and FLUX.2, from the weights; see `conventions.pipeline_convention`) so
            the latents are what a diffusion model trains on; `False` returns raw VAE latents (for statistics).
        return_moments (`bool`, defaults to `False`): also return the stored `mean` and `logvar` (float32); for
            deterministic autoencoders `mean` is the stored latents and there is no `logvar`.

    Items: `latents` (float32, (C, h, w)), `caption` (str), `original_size`, `crop_coords_top_left`,
    `target_size` and `bucket` (int64 tensors (2,) as (height, width) / (top, left); batched they stack to (B, 2),
    so `torch.cat([original_size, crop_coords_top_left, target_size], 1)` are SDXL's `add_time_ids`), `flip`
    (bool), `id` (str).

    Video clips (`<video>#clip<k>@<hash>` ids) give 5-D-ready latents (C, T', h, w) for video autoencoders
    (T' = 1 + (frames - 1) / temporal factor) or (C, T, h, w) for image autoencoders (one latent per frame);
    `bucket` is (frames, height, width), `original_size` the source's (height, width), and they add
    `num_frames` (int), `fps` (float64 tensor, the clip's frame rate), `frame_indices` (int64 (T,), source
    frame numbers) and `clip` (int). Images cached with a video autoencoder keep its frame axis: (C, 1, h, w).

    The index is held in memory as Python objects (about 2.5 KB per sample, and DataLoader workers end up with
    their own copies as reference counts touch the pages): fine for a million samples, not for ten million (25 GB
    per process). For those, and for caches in object storage, use `LatentCacheIterableDataset`, which never reads
    the index.

    Shards are memory-mapped with `safe_open`, opened lazily in whichever process reads them, so DataLoader
    workers each open their own. With `persistent_workers=True` workers keep the epoch they started with: call
    `set_epoch` before creating the DataLoader iterator, or leave `persistent_workers` off.
    """

    _MAX_OPEN_SHARDS = 64

    def __init__(
        self,
        path: str | os.PathLike,
        sample_posterior: bool = True,
        seed: int = 0,
        scale: bool = True,
        return_moments: bool = False,
    ) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            raise ValueError(
                f"LatentCacheDataset memory-maps local caches; read {path} with "
                "diffusers_vae_ext.cache.LatentCacheIterableDataset (streams shards from the URL)."
            )
        self.path = Path(str(path).removeprefix("file://"))
        self._read_cache_info(load_cache_info(self.path), self.path, sample_posterior, seed, scale, return_moments)
        index_file = self.path / INDEX_FILE
        self.records = [json.loads(line) for line in index_file.read_text(encoding="utf-8").splitlines() if line]
        self.epoch = 0
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._handles_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sample_buckets(self) -> list[tuple[int, int]]:
        """The bucket (height, width) of every sample, for `BucketBatchSampler`."""
        return [tuple(record["bucket"]) for record in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Draw the posterior noise of `epoch` from now on."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # file handles stay in the process that opened them
        return state

    def _handle(self, shard: str) -> Any:
        if self._handles_pid != os.getpid():  # forked into a DataLoader worker: open our own
            self._handles, self._handles_pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.path / shard), framework="pt")
            self._handles[shard] = handle
            if len(self._handles) > self._MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    def moments(self, index: int) -> torch.Tensor:
        """The stored moments of sample `index` as float32 (2C, h, w): mean, then logvar."""
        record = self.records[index]
        return self._handle(record["shard"]).get_tensor(record["key"]).float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(self.records[index], self.moments(index))
