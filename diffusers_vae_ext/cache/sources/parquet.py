"""Parquet files (local or any fsspec URL) with an image-bytes column: one unit per row group.

Row groups are listed file by file as the plan is consumed (one footer read per file, when it is reached), so
nothing reads every footer before the first batch. A row's label is `<file>/row<N>` (N counts rows in the file),
so it does not depend on how the file is cut into row groups. The image column holds bytes or
`{"bytes": ..., "path": ...}` structs as `datasets` writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...optional import require
from .base import Source, SourceItem, Unit, file_version
from .rows import image_bytes


def _pyarrow():
    """`pyarrow.parquet` and the errors that mean "this file is broken" (not "the network is down")."""
    pa = require("pyarrow", ".parquet files")
    import pyarrow.parquet as pq

    return pq, (pa.lib.ArrowException, ValueError, EOFError)


class ParquetSource(Source):
    """Parquet files; units `<file>#rg<k>`, one per row group.

    Args:
        fs, url: the file system and the input as the user wrote it (for messages).
        files: (path in `fs`, name, fsspec info or None when not listed) per file, in order.
        image_column: the column with the image bytes (default `image`).
        caption_column: the caption column (default `text`, else `caption`, else none).
        storage_options: the fsspec options (to open the file system again in another process).

    The columns are checked against the first readable file before any work starts. A file whose footer cannot
    be read (truncated, not parquet) becomes one `"broken"` unit, listed in `skipped.jsonl`; the run goes on.
    """

    kind = "parquet"

    def __init__(
        self,
        fs: Any,
        url: str,
        files: list[tuple[str, str, dict | None]],
        image_column: str | None,
        caption_column: str | None,
        storage_options: dict[str, Any] | None = None,
    ):
        pq, broken = _pyarrow()
        self._bind_fs(url, storage_options, fs)
        self.url, self.files = url, files
        columns = None
        for path, _, _ in files:
            try:
                with fs.open(path, "rb") as handle:
                    columns = pq.ParquetFile(handle).schema_arrow.names
                break
            except broken:
                continue
        if columns is None:
            raise ValueError(f"None of the parquet files at {url!r} can be read (first: {files[0][0]}).")
        self.image_column = image_column or "image"
        if self.image_column not in columns:
            raise ValueError(
                f"--image_column {self.image_column!r} is not a column of the parquet files at {url!r} "
                f"(columns: {columns})."
            )
        if caption_column is not None and caption_column not in columns:
            raise ValueError(
                f"--caption_column {caption_column!r} is not a column of the parquet files at {url!r} "
                f"(columns: {columns})."
            )
        if caption_column is None:
            caption_column = next((c for c in ("text", "caption") if c in columns), None)
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.files)

    def _version(self, path: str, info: dict | None) -> str:
        try:
            return file_version(info if info is not None else self.fs.info(path))
        except FileNotFoundError:
            return "missing"

    def units(self) -> Iterator[Unit]:
        pq, broken = _pyarrow()
        for path, name, info in self.files:
            version = self._version(path, info)
            try:
                with self.fs.open(path, "rb") as handle:
                    metadata = pq.ParquetFile(handle).metadata
            except FileNotFoundError as err:
                yield Unit(name, "broken", path=path, signature=f"broken:{version}", error=f"cannot read: {err}")
                continue
            except broken as err:
                error = f"not a readable parquet file ({type(err).__name__}: {err})"
                yield Unit(name, "broken", path=path, signature=f"broken:{version}", error=error)
                continue
            start = 0
            for group in range(metadata.num_row_groups):
                stop = start + metadata.row_group(group).num_rows
                signature = f"{version}:{group}"
                yield Unit(
                    f"{name}#rg{group}", "parquet", path=path, start=start, stop=stop, group=group, signature=signature
                )
                start = stop

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        pq, broken = _pyarrow()
        name = unit.name.rsplit("#rg", 1)[0]
        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        row = unit.start
        try:
            with self.fs.open(unit.path, "rb") as handle:
                batches = pq.ParquetFile(handle).iter_batches(batch_size=64, row_groups=[unit.group], columns=columns)
                for batch in batches:
                    values = batch.to_pydict()
                    captions = values.get(self.caption_column) if self.caption_column else None
                    for offset, value in enumerate(values[self.image_column]):
                        label = f"{name}/row{row}"
                        caption = "" if captions is None or captions[offset] is None else str(captions[offset])
                        row += 1
                        try:  # a `path` in a struct names a file on the machine that wrote it: not readable here
                            data = image_bytes(value) if not isinstance(value, str) else None
                        except OSError:
                            data = None
                        if data is None:
                            reason = f"no image bytes in column {self.image_column!r}"
                            yield SourceItem(label, None, caption, error=("no_image", reason))
                            continue
                        yield SourceItem(label, data, caption)
        except broken as err:
            reason = f"row group {unit.group} cannot be read from row {row} on ({type(err).__name__}: {err})"
            yield SourceItem(unit.name, None, error=("unreadable", reason))

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "path": self.url,
            "num_files": len(self),
            "image_column": self.image_column,
            "caption_column": self.caption_column,
        }
