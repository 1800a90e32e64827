"""Image folders (local or any fsspec URL), cut into fixed-size slices of the sorted listing."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

from ...data import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, metadata_records
from ..storage import storage_errors
from .base import Source, SourceItem, Unit, file_version, is_image_name, slice_units


def metadata_captions(fs: Any, root: str, url: str, files: Iterable[str], caption_column: str) -> dict[str, str]:
    """Captions from every `metadata.jsonl` under `root` (`files`: paths relative to it), keyed by the relative
    path its `file_name` names (resolved against the metadata file's folder)."""
    captions: dict[str, str] = {}
    for name in sorted(n for n in files if posixpath.basename(n) == "metadata.jsonl"):
        base = posixpath.dirname(name)
        with storage_errors(url, "read"):
            text = fs.cat_file(f"{root}/{name}").decode("utf-8")
        for record in metadata_records(text, f"{url}/{name}"):
            key = posixpath.normpath(posixpath.join(base, record["file_name"]))
            captions[key] = str(record.get(caption_column, ""))
    return captions


class FolderSource(Source):
    """Images under a folder (recursive), labelled by their path relative to it; units of `unit_size` images.

    Args:
        fs, root, url: the file system, the folder's path in it, and the folder as the user wrote it.
        storage_options: the fsspec options (to open the file system again in another process).
        listing: `fs.find(root, detail=True)` (path -> info), already made by `open_source`.
        caption_column: the `metadata.jsonl` key holding the caption (default "text"); sidecar `name.txt` or
            `name.caption` files are used for images the metadata does not name.
        unit_size: images per unit. Adding or removing files shifts the slices after them; those units are
            rewritten, reusing the latents of the samples they held before.
    """

    kind = "image_folder"

    def __init__(
        self,
        fs: Any,
        root: str,
        url: str,
        listing: dict[str, dict],
        caption_column: str | None,
        unit_size: int,
        storage_options: dict[str, Any] | None = None,
    ):
        self._bind_fs(url, storage_options, fs)
        self.root, self.url, self.unit_size = root.rstrip("/"), url, unit_size
        prefix = self.root + "/"
        files = {path[len(prefix) :]: info for path, info in listing.items() if path.startswith(prefix)}
        self.labels = sorted(label for label in files if is_image_name(label))
        if not self.labels:
            raise ValueError(
                f"No images found in {url!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, webdataset "
                ".tar and .parquet files). Point --train_data_dir at a folder of images or shards."
            )
        self.versions = [file_version(files[label]) for label in self.labels]
        self.captions = metadata_captions(self.fs, self.root, self.url, files, caption_column or "text")
        # Sidecar captions are read with their image (one request each on an object store), not during listing.
        self.sidecars: dict[str, tuple[str, str]] = {}
        for label in self.labels:
            if label in self.captions:
                continue
            stem = posixpath.splitext(label)[0]
            for extension in CAPTION_EXTENSIONS:
                if stem + extension in files:
                    self.sidecars[label] = (stem + extension, file_version(files[stem + extension]))
                    break

    def __len__(self) -> int:
        return len(self.labels)

    def units(self) -> Iterator[Unit]:
        return slice_units("folder", len(self.labels), self.unit_size)

    def signature(self, unit: Unit) -> str:
        """Names, sizes and modification times (or ETags) of the slice's images, and their captions' sources."""
        digest = hashlib.sha256()
        for i in range(unit.start, unit.stop):
            label = self.labels[i]
            caption = self.captions.get(label, "") if label in self.captions else self.sidecars.get(label, "")
            digest.update(json.dumps([label, self.versions[i], caption]).encode())
        return digest.hexdigest()

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        for label in self.labels[unit.start : unit.stop]:
            try:
                data = self.fs.cat_file(f"{self.root}/{label}")
            except OSError as err:
                yield SourceItem(label, None, error=("unreadable", f"cannot read: {err}"))
                continue
            caption = self.captions.get(label, "")
            if label in self.sidecars:
                try:
                    caption = self.fs.cat_file(f"{self.root}/{self.sidecars[label][0]}").decode("utf-8").strip()
                except (OSError, UnicodeDecodeError):
                    caption = ""
            yield SourceItem(label, data, caption)

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "path": self.url, "num_files": len(self), "unit_size": self.unit_size}
