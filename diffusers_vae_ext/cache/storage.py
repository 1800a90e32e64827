"""Crash-safe files: atomic publication, shard headers, and the clean-up of a cut-off run.

A reader never sees half a file: everything is written to a temporary name, flushed to disk and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .format import (
    CACHE_FILE,
    FORMAT_NAME,
    INDEX_FILE,
    SHARD_DIR,
    SKIPPED_FILE,
    CacheMismatchError,
    describe_mismatch,
    provenance_hash,
)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(temp: Path, path: Path) -> None:
    """Make `temp` durable, then atomically give it its final name: readers see all of it or nothing."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    temp = _temp_path(path)
    temp.write_text(text, encoding="utf-8")
    _publish(temp, path)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    temp = _temp_path(path)
    save_file(tensors, str(temp), metadata=metadata)
    _publish(temp, path)


def read_shard_headers(shard_dir: Path, provenance: dict) -> list[tuple[Path, dict[str, Any]]]:
    """(path, parsed metadata) of every complete shard, after checking it belongs to this provenance."""
    expected = provenance_hash(provenance)
    shards = []
    for path in sorted(shard_dir.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} shard; remove it from {shard_dir}.")
        if metadata.get("provenance_hash") != expected:
            raise CacheMismatchError(describe_mismatch(json.loads(metadata.get("provenance", "{}")), provenance, path))
        shards.append((path, {"samples": json.loads(metadata["samples"]), "skipped": json.loads(metadata["skipped"])}))
    return shards


def remove_cache_files(output_dir: Path) -> None:
    """Delete what a cache consists of (and nothing else the folder may hold)."""
    shard_dir = output_dir / SHARD_DIR
    if shard_dir.is_dir():
        for path in shard_dir.iterdir():
            if path.name.startswith(("shard-", ".shard-")):
                path.unlink()
    for name in (CACHE_FILE, INDEX_FILE, SKIPPED_FILE):
        (output_dir / name).unlink(missing_ok=True)


def remove_temp_files(output_dir: Path) -> None:
    """Leftovers of writes cut off by a crash: never named by the index, safe to delete before writing."""
    for folder in (output_dir, output_dir / SHARD_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
