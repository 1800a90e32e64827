"""Latent cache: encode a dataset once, train a diffusion model from the stored posteriors many times.

Writer (`precompute_latents`, `diffusers-vae cache`, `scripts/precompute_latents.py`):

- stores the posterior **moments** (mean and logvar, unscaled) of every image, so training can draw a fresh
  latent each epoch instead of reusing one frozen sample;
- names every sample by a **stable id** derived from the source (relative path or row number plus a hash of the
  file's bytes; `:flip` for the mirrored copy), never by loader order, so captions cannot drift;
- writes sharded `.safetensors` files atomically; each shard's header says what it holds, so a run killed at any
  moment resumes where it stopped, and the index is rebuilt from complete shards only;
- plans the work globally (scan, aspect-ratio buckets, batches, shards) and hands whole shards round-robin to the
  processes of `accelerate launch`: each sample is encoded by exactly one process, in the same batch whatever
  the number of processes or restarts, so the stored tensors do not depend on either;
- records the VAE fingerprint, the preprocessing and the scaling convention in `cache.json` and every shard, and
  refuses to resume with different ones;
- skips bad input (unreadable, too small, non-finite latents) with a reason in `skipped.jsonl`.

Reader (`LatentCacheDataset`, `BucketBatchSampler`): memory-mapped reads, per-(seed, epoch, id) posterior draws,
the VAE config's scaling applied. The on-disk format is specified in `docs/latent_cache.md`.

Modules: `format` (settings, provenance, `cache.json`), `storage` (atomic files, shard headers), `sources` (image
folders and datasets), `plan` (batches and shards), `writer` (`precompute_latents`), `readers`
(`LatentCacheDataset`). The public names are importable from `diffusers_vae_ext.cache`.
"""

from ..buckets import BucketBatchSampler
from .format import CacheMismatchError, CacheSettings, load_cache_info
from .readers import LatentCacheDataset
from .writer import CacheSummary, precompute_latents

__all__ = [
    "BucketBatchSampler",
    "CacheMismatchError",
    "CacheSettings",
    "CacheSummary",
    "LatentCacheDataset",
    "load_cache_info",
    "precompute_latents",
]
