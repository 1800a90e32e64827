"""Reading a latent cache for training: `LatentCacheDataset` (memory-mapped, fresh posterior draws per epoch)."""

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

from ..scaling import scale_latents
from .format import INDEX_FILE, load_cache_info


def draw_seed(seed: int, epoch: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LatentCacheDataset(Dataset):
    """A latent cache as a map-style dataset: one dict per cached sample, in index order.

    Args:
        path: the cache folder (`cache.json`, `index.jsonl`, `shards/`).
        sample_posterior (`bool`, defaults to `True`): draw `latents = mean + exp(logvar / 2) * eps` with `eps`
            from a `torch.Generator` seeded by (`seed`, epoch, sample id), so draws are reproducible, independent
            of worker count and order, and fresh each epoch (`set_epoch`); `False` returns the posterior mean.
        seed (`int`, defaults to 0): base seed of the draws.
        scale (`bool`, defaults to `True`): apply the VAE config's scaling convention
            (`diffusers_vae_ext.scaling.scale_latents`: scaling_factor, shift_factor or latents_mean/std) so the
            latents are what a diffusion model trains on; `False` returns raw VAE latents (for statistics).
        return_moments (`bool`, defaults to `False`): also return the stored `mean` and `logvar` (float32).

    Items: `latents` (float32, (C, h, w)), `caption` (str), `original_size`, `crop_coords_top_left`,
    `target_size` and `bucket` (int64 tensors (2,) as (height, width) / (top, left); batched they stack to (B, 2),
    so `torch.cat([original_size, crop_coords_top_left, target_size], 1)` are SDXL's `add_time_ids`), `flip`
    (bool), `id` (str).

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
        self.path = Path(path)
        self.info = load_cache_info(self.path)
        if self.info.get("status") != "complete":
            raise ValueError(
                f"The latent cache at {self.path} is incomplete (status {self.info.get('status')!r}): a run was "
                "interrupted or is still writing. Rerun the same command to finish it."
            )
        self.vae_config = self.info["provenance"]["vae"]["config"]
        index_file = self.path / INDEX_FILE
        self.records = [json.loads(line) for line in index_file.read_text(encoding="utf-8").splitlines() if line]
        self.sample_posterior = sample_posterior
        self.seed = seed
        self.scale = scale
        self.return_moments = return_moments
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
        record = self.records[index]
        mean, logvar = self.moments(index).chunk(2, dim=0)
        if self.sample_posterior:
            generator = torch.Generator().manual_seed(draw_seed(self.seed, self.epoch, record["id"]))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        else:
            latents = mean.clone()
        if self.scale:
            latents = scale_latents(latents.unsqueeze(0), self.vae_config)[0]
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
        if self.return_moments:
            item["mean"], item["logvar"] = mean, logvar
        return item
