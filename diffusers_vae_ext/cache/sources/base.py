"""What every source shares: units of work, the items they yield, and the cheap per-item checks.

A **unit** is one input shard: a webdataset tar, a parquet row group, or a fixed-size slice of a folder listing or
of a dataset's rows. Its `name` is derived from the input alone (`train/00042.tar`, `part-3.parquet#rg2`,
`folder#00007`), so every process, every machine and every rerun agrees on it, and its output objects are named
after it. Iterating a unit yields `SourceItem`s: a stable label (which becomes the sample id with the content
hash), the raw bytes, the caption and any extra metadata.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ...data import IMAGE_EXTENSIONS, UnreadableImageError
from ..storage import url_to_fs


@dataclass(frozen=True)
class Unit:
    """One input shard.

    Args:
        name: stable name derived from the input (names the unit's output objects).
        kind: `"folder"`, `"rows"`, `"tar"`, `"parquet"` or `"broken"` (an input that cannot be opened at all;
            reading it yields one skip saying why).
        path: the tar or parquet file, in the source's file system.
        start, stop: the slice of a folder listing or of a dataset's rows; for a parquet row group, the group's
            first and end row in its file.
        group: the parquet row group.
        signature: what identifies the unit's input version when it is known from the listing (sizes, mtimes,
            ETags); otherwise the source works it out when the unit is read (`Source.signature`).
        error: why a `"broken"` unit cannot be read.
    """

    name: str
    kind: str
    path: str = ""
    start: int = 0
    stop: int = 0
    group: int = -1
    signature: str | None = None
    error: str | None = None


@dataclass
class SourceItem:
    """One input item: `label` (stable within the source), raw `data`, `caption`, `extra` metadata.

    `error` is `(kind, reason)` when the item cannot be used at all (no image in a webdataset sample, a file that
    cannot be read, a broken tar); `data` is then None.
    """

    label: str
    data: bytes | None
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


class Source:
    """A listing of units and a way to read each one. Subclasses are picklable (DataLoader workers, Ray tasks)."""

    kind = "source"
    _fs: Any = None
    _fs_url: str = ""
    _fs_options: dict[str, Any] = {}
    _fs_pid: int = -1

    def _bind_fs(self, url: str, storage_options: dict[str, Any] | None, fs: Any) -> None:
        self._fs_url, self._fs_options, self._fs, self._fs_pid = url, dict(storage_options or {}), fs, os.getpid()

    @property
    def fs(self) -> Any:
        """The source's fsspec file system, re-created in each process (async ones such as s3fs are not
        fork-safe, and DataLoader workers are forked)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._fs_pid = url_to_fs(self._fs_url, self._fs_options)[0], os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    def units(self) -> Iterator[Unit]:
        """The units in a fixed order, lazily (a parquet file's row groups are listed when it is reached)."""
        raise NotImplementedError

    def signature(self, unit: Unit) -> str:
        """A string that changes when the unit's input changes (read from the listing where possible)."""
        if unit.signature is None:
            raise NotImplementedError
        return unit.signature

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        """The unit's items, in a fixed order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What `cache.json` records about the input (never credentials)."""
        raise NotImplementedError


def slice_units(kind: str, count: int, unit_size: int) -> Iterator[Unit]:
    """`count` listed items cut into consecutive units of `unit_size`, named `<kind>#00000`, `<kind>#00001`, ..."""
    for number, start in enumerate(range(0, count, unit_size)):
        yield Unit(f"{kind}#{number:05d}", kind, start=start, stop=min(start + unit_size, count))


def broken_unit_items(unit: Unit) -> Iterator[SourceItem]:
    yield SourceItem(label=unit.name, data=None, error=("unreadable", unit.error or "cannot be read"))


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_version(info: dict[str, Any]) -> str:
    """Size plus the ETag or modification time of an fsspec `info` record: changes when the file changes."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("md5")
    return f"{info.get('size')}:{tag}"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def probe_size(data: bytes) -> tuple[int, int]:
    """(height, width) as `load_image_rgb` will see it (after EXIF rotation), from the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                try:
                    orientation = image.getexif().get(0x0112, 1)
                except Exception:  # a broken EXIF block only loses the rotation, as in ImageOps.exif_transpose
                    orientation = 1
    except Image.UnidentifiedImageError as err:
        raise UnreadableImageError("", "not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise UnreadableImageError("", str(err) or type(err).__name__) from err
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
