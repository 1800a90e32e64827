"""webdataset tar shards (local or any fsspec URL): one unit per tar, read with webdataset's tar iteration.

A sample is the group of consecutive members sharing a key (`000123.jpg`, `000123.txt`, `000123.json`); its
label is `<tar name>/<key>`. The image is the first member with an image extension (`jpg jpeg png webp`, then
the other formats `load_image_rgb` reads); the caption comes from `--caption_column` (a member extension such as
`txt`, or a field of the `json` member), by default from `txt`, else the json's `caption` or `text`.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

from ...data import IMAGE_EXTENSIONS
from ...optional import require
from .base import Source, SourceItem, Unit, file_version

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp") + tuple(
    e[1:] for e in IMAGE_EXTENSIONS if e[1:] not in ("jpg", "jpeg", "png", "webp")
)
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
# A broken archive is a property of the file (listed, the run goes on); network errors are raised instead.
_BROKEN = (tarfile.TarError, EOFError, ValueError, zlib.error, gzip.BadGzipFile)


class _TailReader:
    """A file wrapper that remembers the last bytes read: a complete tar ends with zero blocks."""

    def __init__(self, raw: Any, name: str) -> None:
        self.raw, self.name, self.tail = raw, name, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-1024:]
        return data

    def __repr__(self) -> str:  # webdataset adds the file object to error messages: keep them reproducible
        return self.name


def _webdataset_tariterators():
    require("webdataset", "webdataset .tar shards")
    from webdataset import tariterators

    return tariterators


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace").strip()


class TarSource(Source):
    """webdataset shards; one unit per tar, named by its path relative to the pattern's or prefix's folder.

    Args:
        fs, url: the file system and the input as the user wrote it (for messages).
        files: (path in `fs`, unit name, fsspec info or None when not listed) per tar, in order.
        caption_column: member extension or json field holding the caption (see the module docstring).
        storage_options: the fsspec options (to open the file system again in another process).
    """

    kind = "webdataset"

    def __init__(
        self,
        fs: Any,
        url: str,
        files: list[tuple[str, str, dict | None]],
        caption_column: str | None,
        storage_options: dict[str, Any] | None = None,
    ):
        _webdataset_tariterators()  # the install hint before any work starts
        self._bind_fs(url, storage_options, fs)
        self.url, self.caption_column = url, caption_column
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def units(self) -> Iterator[Unit]:
        for path, name, info in self.files:
            yield Unit(name, "tar", path=path, signature=None if info is None else file_version(info))

    def signature(self, unit: Unit) -> str:
        if unit.signature is not None:
            return unit.signature
        try:
            return file_version(self.fs.info(unit.path))
        except FileNotFoundError:
            return "missing"

    def _caption(self, sample: dict[str, Any]) -> str:
        meta = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                meta = None
        if self.caption_column is not None:
            if self.caption_column in sample:
                return _text(sample[self.caption_column])
            value = meta.get(self.caption_column) if isinstance(meta, dict) else None
            return "" if value is None else str(value)
        if "txt" in sample:
            return _text(sample["txt"])
        if isinstance(meta, dict):
            for key in ("caption", "text"):
                if meta.get(key) is not None:
                    return str(meta[key])
        return ""

    def _item(self, unit: Unit, sample: dict[str, Any]) -> SourceItem:
        label = f"{unit.name}/{sample['__key__']}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            reason = f"no image in the sample (members: {found}; looked for {list(IMAGE_KEYS)})"
            return SourceItem(label, None, self._caption(sample), error=("no_image", reason))
        return SourceItem(label, sample[image_key], self._caption(sample), {"key": sample["__key__"]})

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        tariterators = _webdataset_tariterators()
        base_plus_ext, group_by_keys, tar_file_iterator = (
            tariterators.base_plus_ext,
            tariterators.group_by_keys,
            tariterators.tar_file_iterator,
        )
        state: dict[str, Any] = {"member": None, "error": None}

        def select(name: str) -> bool:  # called before each member is read: names the one that fails
            state["member"] = name
            return True

        def handler(err: Exception) -> bool:  # a broken member ends the tar; anything else (network) is raised
            if isinstance(err, _BROKEN):
                state["error"] = err
                return False
            raise err

        # A sample is yielded once the next one has started (or the archive ended properly): the last one
        # before a break may miss members, and is reported instead of cached with a wrong caption.
        held, error, suspect, last = None, None, False, None
        try:
            with self.fs.open(unit.path, "rb") as handle:
                reader = _TailReader(handle, unit.name)
                members = tar_file_iterator(reader, handler=handler, select_files=select)
                for sample in group_by_keys({**m, "__url__": unit.name} for m in members):
                    if held is not None:
                        yield self._item(unit, held)
                        last = held["__key__"]
                    held = sample
                error = state["error"]
                if error is not None:
                    suspect = held is not None and base_plus_ext(state["member"])[0] == held["__key__"]
                else:
                    # tarfile ends quietly at a corrupt or truncated header: a complete tar has only zeros after
                    # its last member and ends with the zero blocks of the end-of-archive marker.
                    rest = reader.read()
                    if rest.strip(b"\0") or len(reader.tail) < 1024 or reader.tail.strip(b"\0"):
                        error = ValueError("corrupt or truncated tar: it does not end with the end-of-archive marker")
                        suspect = True
        except FileNotFoundError as err:
            yield SourceItem(unit.name, None, error=("unreadable", f"cannot read the tar: {err}"))
            return
        except _BROKEN as err:  # raised between members: every sample grouped so far is complete
            error = err
        lost = None
        if held is not None:
            if suspect:
                lost = held["__key__"]
            else:
                yield self._item(unit, held)
                last = held["__key__"]
        if error is not None:
            where = f"after sample {last!r}" if last is not None else "before its first complete sample"
            if lost is not None:
                where += f" (sample {lost!r} may be incomplete)"
            reason = f"tar broken {where}: {type(error).__name__}: {error}; the samples from there on are lost"
            yield SourceItem(unit.name, None, error=("unreadable", reason))

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "path": self.url, "num_shards": len(self)}
