"""What both halves of a unit of work share: the `UnitContext` (lives below `unit.py` and `clips.py`, which use it)."""

from __future__ import annotations

from dataclasses import dataclass

from .format import CacheSettings
from .storage import CacheStore


@dataclass(frozen=True)
class UnitContext:
    """Everything a unit's two halves need besides the unit itself (picklable).

    Args:
        store: where the cache is written.
        settings: the preprocessing.
        provenance: the provenance record (shard headers carry it) and `provenance_hash` its hash.
        batch_size: samples per encoder call (one bucket each).
        shard_size: about this many samples per output shard (whole batches).
        in_channels: the VAE's input channels (1: luminance).
        run_id: marks the manifests this run writes (to count what it encoded).
        frame_multiple: clips have `frame_multiple * k + 1` frames (`AutoencoderAdapter.frame_multiple`).
    """

    store: CacheStore
    settings: CacheSettings
    provenance: dict
    provenance_hash: str
    batch_size: int
    shard_size: int
    in_channels: int
    run_id: str
    frame_multiple: int = 1
