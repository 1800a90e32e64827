"""Where the images come from: an image folder or a `datasets` dataset, read as raw bytes.

A source lists its items in a fixed order, labels each one stably (relative path or row number) and returns the
raw bytes plus caption; the scan turns each item into an id (label + content hash), a size and a bucket, or the
reason it is skipped.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ..buckets import closest_bucket, upscale_needed
from ..data import UnreadableImageError, import_datasets, list_image_files, open_dataset, read_captions
from .format import CacheSettings


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class FolderSource:
    """Images under a folder (recursive), labelled by their path relative to it."""

    def __init__(self, root: str | os.PathLike, caption_column: str | None):
        self.root = Path(root)
        files = list_image_files(self.root)
        captions = read_captions(self.root, files, caption_column=caption_column or "text")
        self.labels = sorted(f.relative_to(self.root).as_posix() for f in files)
        self.captions = [captions.get(label, "") for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[bytes, str]:
        return (self.root / self.labels[index]).read_bytes(), self.captions[index]

    def describe(self) -> dict[str, Any]:
        return {"type": "image_folder", "path": str(self.root.resolve()), "num_files": len(self)}


class DatasetSource:
    """Rows of a `datasets.Dataset`, labelled `row<N>`; images read as raw bytes and decoded by us."""

    def __init__(self, dataset: Any, image_column: str | None, caption_column: str | None, name: str | None):
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

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> tuple[bytes, str]:
        row = self.dataset[index]
        value = row[self.image_column]
        caption = "" if self.caption_column is None or row[self.caption_column] is None else row[self.caption_column]
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = Path(value["path"]).read_bytes()
        elif isinstance(value, str):
            data = Path(value).read_bytes()
        elif isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            data = buffer.getvalue()
        else:
            data = None
        if data is None:
            raise UnreadableImageError(f"row{index}", f"no image in column {self.image_column!r}")
        return bytes(data), str(caption)

    def label(self, index: int) -> str:
        return f"row{index}"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "datasets",
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_rows": len(self),
            "image_column": self.image_column,
            "caption_column": self.caption_column,
        }


def source_label(source: Any, index: int) -> str:
    return source.labels[index] if isinstance(source, FolderSource) else source.label(index)


def open_source(
    train_data_dir: str | os.PathLike | None,
    dataset: Any,
    dataset_split: str,
    image_column: str | None,
    caption_column: str | None,
) -> FolderSource | DatasetSource:
    if (train_data_dir is None) == (dataset is None):
        raise ValueError("Give exactly one input: an image folder (train_data_dir) or a dataset (dataset_name).")
    if train_data_dir is not None:
        return FolderSource(train_data_dir, caption_column)
    name = None
    if isinstance(dataset, (str, os.PathLike)):
        name = str(dataset)
        dataset = open_dataset(name, dataset_split)
    return DatasetSource(dataset, image_column, caption_column, name)


# ------------------------------------------------------------------------------------------------- scanning
def _probe_size(data: bytes) -> tuple[int, int]:
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


class ScanDataset(Dataset):
    """Per source item: the id (label + content hash), caption, size, target bucket, or why it is skipped."""

    def __init__(self, source: Any, indices: list[int], settings: CacheSettings):
        self.source, self.indices, self.settings = source, indices, settings
        self.buckets = settings.bucket_list()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        label = source_label(self.source, index)
        record: dict[str, Any] = {"index": index, "source": label, "id": None, "caption": "", "skip": None}
        try:
            data, record["caption"] = self.source.read(index)
        except (OSError, UnreadableImageError) as err:
            record["skip"] = {"kind": "unreadable", "reason": f"cannot read: {getattr(err, 'reason', err)}"}
            return record
        record["hash"] = content_hash(data)
        record["id"] = f"{label}@{record['hash']}"
        try:
            height, width = _probe_size(data)
        except UnreadableImageError as err:
            record["skip"] = {"kind": "unreadable", "reason": err.reason}
            return record
        bucket = closest_bucket(height, width, self.buckets)
        upscale = upscale_needed(height, width, bucket)
        if upscale > self.settings.max_upscale:
            record["skip"] = {
                "kind": "too_small",
                "reason": f"too small: {width}x{height} px would need {upscale:.2f}x upscaling to cover "
                f"{bucket[1]}x{bucket[0]} (limit max_upscale={self.settings.max_upscale})",
            }
            return record
        record["size"], record["bucket"] = (height, width), bucket
        return record
