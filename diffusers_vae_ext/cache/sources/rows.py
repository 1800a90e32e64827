"""A `datasets.Dataset`, cut into fixed-size slices of its rows; images read as raw bytes and decoded by us."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ...data import import_datasets
from .base import Source, SourceItem, Unit, slice_units


def image_bytes(value: Any) -> bytes | None:
    """Raw bytes from the shapes an image cell takes: bytes, `{"bytes", "path"}` (as HF writes it), a path, PIL."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()
        return None if data is None else bytes(data)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return Path(value).read_bytes()
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return None


class DatasetSource(Source):
    """Rows of a `datasets.Dataset`, labelled `row<N>`; units of `unit_size` rows named `rows#<k>`."""

    kind = "datasets"

    def __init__(
        self, dataset: Any, image_column: str | None, caption_column: str | None, name: str | None, unit_size: int
    ):
        datasets = import_datasets()

        columns = list(dataset.column_names)
        if image_column is None:
            image_columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
            image_column = "image" if "image" in columns else (image_columns[0] if image_columns else None)
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column of the dataset (columns: {columns}).")
        if caption_column is not None and caption_column not in columns:
            raise ValueError(
                f"--caption_column {caption_column!r} is not a column of the dataset (columns: {columns})."
            )
        if caption_column is None:
            caption_column = "text" if "text" in columns else None
        self.fingerprint = getattr(dataset, "_fingerprint", None)
        if isinstance(dataset.features[image_column], datasets.Image):
            # Raw bytes: hashing them gives the sample id, and our loader handles odd files one way everywhere.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.name = name
        self.unit_size = unit_size

    def __len__(self) -> int:
        return len(self.dataset)

    def units(self) -> Iterator[Unit]:
        for unit in slice_units("rows", len(self.dataset), self.unit_size):
            yield replace(unit, signature=f"{self.fingerprint}:{unit.start}:{unit.stop}")

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        rows = self.dataset.select_columns(columns)[unit.start : unit.stop]
        captions = rows.get(self.caption_column) if self.caption_column else None
        for offset, value in enumerate(rows[self.image_column]):
            label = f"row{unit.start + offset}"
            caption = "" if captions is None or captions[offset] is None else str(captions[offset])
            try:
                data = image_bytes(value)
            except OSError as err:
                yield SourceItem(label, None, caption, error=("unreadable", f"cannot read: {err}"))
                continue
            if data is None:
                yield SourceItem(label, None, caption, error=("no_image", f"no image in column {self.image_column!r}"))
                continue
            yield SourceItem(label, data, caption)

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_rows": len(self),
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "unit_size": self.unit_size,
        }
