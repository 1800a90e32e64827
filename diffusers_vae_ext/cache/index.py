"""The end of a run: the index, the skip list and the shard list, rebuilt from the unit manifests only.

Runs once, in one process, after every unit has a manifest. It streams (memory does not grow with the number of
samples), names only objects a manifest names (never a listing, never a half-written run), then deletes the
superseded shards of the current units and marks `cache.json` complete.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .format import (
    CACHE_FILE,
    INDEX_FILE,
    SHARD_DIR,
    SHARDS_FILE,
    SKIPPED_FILE,
    UNIT_DIR,
    manifest_name,
    part_unit_key,
    unit_key,
)
from .sources import Unit
from .storage import CacheStore
from .unit import read_manifest


@dataclass
class CacheSummary:
    """What a `precompute_latents` run left in the cache.

    `new` counts samples encoded by this run, `resumed` those found complete or reused from a unit's previous
    version, `stale` the entries this run dropped (their input changed or went away) plus those of units no
    longer in the input listing (kept, not indexed; `--overwrite` removes them).
    """

    output_dir: str
    cached: int = 0
    new: int = 0
    resumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    stale: int = 0
    units: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        by_kind = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items()))
        line = (
            f"latent cache {self.output_dir}: cached {self.cached} samples ({self.new} encoded now, "
            f"{self.resumed} resumed), skipped {skipped}{f' ({by_kind})' if by_kind else ''}"
        )
        if self.stale:
            line += f"; {self.stale} entries of changed or removed inputs are no longer indexed"
        return line + f" [{self.seconds:.1f} s]"


def _ordered_prefetch(function, items: Iterable[Any], workers: int = 8, window: int = 64) -> Iterator[tuple]:
    """(item, function(item)) in order, `window` calls ahead on a thread pool (manifest GETs are latency bound)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= window:
                first, future = pending.pop(0)
                yield first, future.result()
        for item, future in pending:
            yield item, future.result()


def write_index(
    store: CacheStore, units: Iterable[Unit], info: dict[str, Any], provenance_hash: str, run_id: str, progress: bool
) -> CacheSummary:
    """Index, skip list and shard list from the manifests of `units`; then clean up and mark the cache complete.

    Raises `RuntimeError` (and publishes nothing) when a unit has no manifest: rerun the same command.
    """
    summary = CacheSummary(output_dir=store.url)
    skipped_kinds: Counter = Counter()
    current_keys: set[str] = set()
    current_manifests: set[str] = set()
    referenced: set[str] = set()
    missing: list[str] = []
    with (
        store.text_writer(INDEX_FILE) as index,
        store.text_writer(SKIPPED_FILE) as skipped,
        store.text_writer(SHARDS_FILE) as shards,
        tqdm(desc="indexing", unit="unit", disable=not progress) as bar,
    ):
        manifests = _ordered_prefetch(lambda u: read_manifest(store, u.name, provenance_hash), units)
        for unit, manifest in manifests:
            bar.update(1)
            summary.units += 1
            current_keys.add(unit_key(unit.name, provenance_hash))
            current_manifests.add(manifest_name(unit.name, provenance_hash))
            if manifest is None:
                missing.append(unit.name)
                continue
            for part in manifest["parts"]:
                referenced.add(part["file"])
                shards.write(json.dumps({"shard": part["file"], "unit": unit.name, "samples": len(part["samples"])}))
                shards.write("\n")
                for record in part["samples"]:
                    index.write(json.dumps({**record, "shard": part["file"]}, ensure_ascii=False) + "\n")
            for row in manifest["skipped"]:
                skipped.write(json.dumps(row, ensure_ascii=False) + "\n")
                skipped_kinds[row["kind"]] += 1
            counts = manifest["counts"]
            summary.cached += counts["samples"]
            if manifest.get("run") == run_id:
                summary.new += counts["encoded"]
                summary.stale += counts["dropped"]
        if missing:
            raise RuntimeError(
                f"{len(missing)} input units have no complete output (first: {missing[:3]}); rerun the same command."
            )
    summary.resumed = summary.cached - summary.new
    summary.skipped = dict(skipped_kinds)

    # Shards of a current unit that its manifest does not name are superseded versions or leftovers of a cut-off
    # write: delete them, and the temporary files of writes cut off by a crash (no writer is running any more).
    # Units no longer in the listing are left alone (an input may be offline for a while).
    superseded = [
        name
        for name in store.list(SHARD_DIR) + store.list(UNIT_DIR)
        if (part_unit_key(name) in current_keys and name not in referenced) or ".tmp-" in name
    ]
    store.delete(superseded)
    for name in store.list(UNIT_DIR):
        if name.endswith(".json") and name not in current_manifests:
            orphan = store.get_json(name) or {}
            if orphan.get("provenance_hash") == provenance_hash:
                summary.stale += orphan.get("counts", {}).get("samples", 0)

    counts = {
        "samples": summary.cached,
        "skipped": sum(skipped_kinds.values()),
        "stale_entries": summary.stale,
        "units": summary.units,
    }
    store.put_text(CACHE_FILE, json.dumps({**info, "status": "complete", "counts": counts}, indent=2))
    return summary
