"""Where the images come from, as units of work: image folders, `datasets` datasets, webdataset tars, parquet.

`open_source` turns `--train_data_dir` / `--dataset_name` into a `Source`:

- a brace pattern (`s3://bucket/data/{00000..00999}.tar`), a glob, a single file, or a folder / URL prefix holding
  `.tar` files -> `TarSource` (webdataset, one unit per tar);
- the same holding `.parquet` files -> `ParquetSource` (one unit per row group);
- a folder / prefix of images -> `FolderSource` (units of `unit_size` images of the sorted listing);
- a local folder holding video files (or, with `image_sequences`, folders of frames) -> `VideoFolderSource` (units
  of `unit_size` videos; the clips are planned and decoded by `cache/clips.py`);
- a `datasets.Dataset`, a `save_to_disk` folder or a hub name -> `DatasetSource` (units of `unit_size` rows).

Every path goes through fsspec (`s3://`, `gs://`, `file://`, plain paths); credentials and endpoints come from the
standard environment or `storage_options`. Listing is the only work done up front (no file is read, except the
`metadata.jsonl` captions of a folder and the first parquet footer to check the columns); a missing or misspelled
input, missing credentials or an unreachable endpoint fail here, before any work starts.

`check_source_dependencies` says, from the arguments alone (no I/O), which optional package an input needs (URL
protocol, brace pattern, `.tar` / `.parquet` names, a dataset name) and raises the install hint; `open_source`
calls it first, and the sources that a listing reveals (tars, parquet, videos) check theirs when they are made,
still before any work starts.

`iter_source_items` is the small public way to read a source's images (label, bytes, caption), e.g. for evaluation.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import Any

from ...data import open_dataset
from ...optional import require, require_filesystem
from ...video import VIDEO_EXTENSIONS
from ..storage import storage_errors, url_to_fs
from .base import Source, SourceItem, Unit, broken_unit_items, content_hash, file_version, probe_size
from .folder import FolderSource
from .parquet import ParquetSource
from .rows import DatasetSource
from .tars import TAR_SUFFIXES, TarSource
from .videos import VideoFolderSource, video_content_hash

__all__ = [
    "DatasetSource",
    "FolderSource",
    "ParquetSource",
    "Source",
    "SourceItem",
    "TarSource",
    "Unit",
    "VideoFolderSource",
    "broken_unit_items",
    "check_source_dependencies",
    "content_hash",
    "file_version",
    "iter_source_items",
    "open_source",
    "probe_size",
    "read_unit_items",
    "video_content_hash",
]

_GLOB_CHARS = "*?["


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1 :] if root and path.startswith(root + "/") else posixpath.basename(path)


def _shard_source(
    fs: Any, url: str, files: list[tuple[str, dict | None]], root: str, image_column, caption_column, options
):
    """A tar or parquet source for `files` (all of one kind), unit names relative to `root`."""
    named = [(path, _relative(path, root), info) for path, info in sorted(files, key=lambda f: f[0])]
    odd = sorted({posixpath.basename(p) for p, _, _ in named if not p.endswith(TAR_SUFFIXES + (".parquet",))})
    if odd:
        raise ValueError(
            f"{url!r} names files that are neither webdataset .tar shards nor .parquet files (e.g. {odd[:3]}): give "
            "a folder of images, a folder / pattern / prefix of .tar shards, or .parquet files."
        )
    if all(path.endswith(TAR_SUFFIXES) for path, _, _ in named):
        return TarSource(fs, url, named, caption_column, options)
    if all(path.endswith(".parquet") for path, _, _ in named):
        return ParquetSource(fs, url, named, image_column, caption_column, options)
    raise ValueError(
        f"{url!r} names files of several kinds ({sorted({posixpath.splitext(p)[1] for p, _, _ in named})}): "
        "give webdataset .tar shards or .parquet files, not both."
    )


def check_source_dependencies(train_data_dir: str | os.PathLike | None = None, dataset: Any = None) -> None:
    """Raise `optional.MissingDependencyError` (with the pip command) for what the input's *name* says it needs.

    No file is read or listed, so commands call it before loading a model: the URL protocol (`s3://` -> s3fs,
    `gs://` -> gcsfs), a brace pattern (braceexpand), names ending in `.tar` / `.parquet` (webdataset / pyarrow),
    a dataset name (`datasets`). What only a listing shows (a folder of tars, of parquet files, of video files) is
    checked by `open_source` when it makes the source.
    """
    if dataset is not None and isinstance(dataset, (str, os.PathLike)):
        require("datasets", f"--dataset_name {str(dataset)!r}")
    if train_data_dir is None:
        return
    url = str(train_data_dir)
    require_filesystem(url)
    if "{" in url:
        require("braceexpand", f"the brace pattern {url!r}")
    name = url.rstrip("/").lower()
    if name.endswith(TAR_SUFFIXES):
        require("webdataset", f"webdataset .tar shards ({url!r})")
    elif name.endswith(".parquet"):
        require("pyarrow", f".parquet files ({url!r})")


def open_source(
    train_data_dir: str | os.PathLike | None = None,
    dataset: Any = None,
    *,
    dataset_split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    unit_size: int = 512,
    storage_options: dict[str, Any] | None = None,
    image_sequences: bool = False,
) -> Source:
    """The source behind `train_data_dir` (folder, URL, pattern) or `dataset` (see the module docstring).

    Args:
        train_data_dir: an image folder, webdataset shards (brace pattern, glob, folder or URL prefix of `.tar`
            files) or parquet files (folder, glob or URL prefix), local or any fsspec URL.
        dataset: a `datasets.Dataset`, a folder written by `save_to_disk`, or a hub name (`dataset_split`).
        image_column: the image column of a dataset or of parquet files (default `image`).
        caption_column: the caption column (dataset, parquet), `metadata.jsonl` key (folder), member extension or
            json field (webdataset).
        unit_size: images per unit of a folder, rows per unit of a dataset.
        storage_options: fsspec options for URLs (e.g. `{"endpoint_url": ..., "anon": true}`).
        image_sequences: read `train_data_dir` as videos even when it holds no video file (folders of frames are
            videos). A local folder holding video files is read as videos anyway (as `diffusers-vae stats` does).
    """
    if (train_data_dir is None) == (dataset is None):
        raise ValueError("Give exactly one input: an image folder or shards (train_data_dir) or a dataset.")
    if unit_size < 1:
        raise ValueError(f"unit_size must be at least 1, got {unit_size}.")
    check_source_dependencies(train_data_dir, dataset)
    if dataset is not None:
        name = None
        if isinstance(dataset, (str, os.PathLike)):
            name = str(dataset)
            dataset = open_dataset(name, dataset_split)
        return DatasetSource(dataset, image_column, caption_column, name, unit_size)

    url = str(train_data_dir)
    try:
        return _open_files(url, image_column, caption_column, unit_size, storage_options, image_sequences)
    except FileNotFoundError as err:
        if url in str(err):
            raise
        # e.g. s3fs's "The specified bucket does not exist": say which URL, and what to check.
        raise FileNotFoundError(f"Cannot read {url!r}: {err}. Check the bucket name and the path.") from err


def _open_files(
    url: str, image_column, caption_column, unit_size: int, storage_options, image_sequences: bool = False
) -> Source:
    with storage_errors(url, "read"):
        fs, path = url_to_fs(url, storage_options)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        shown = os.path.abspath(url) if local and "://" not in url else url
        if "{" in path:
            braceexpand = require("braceexpand", f"the brace pattern {url!r}").braceexpand
            root = path[: path.index("{")].rsplit("/", 1)[0]
            files = [(p, None) for p in braceexpand(path)]
            try:
                fs.info(files[0][0])
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"The first shard of {url!r} ({files[0][0]}) does not exist: check the pattern and the bucket."
                ) from err
            return _shard_source(fs, shown, files, root, image_column, caption_column, storage_options)
        if any(c in path for c in _GLOB_CHARS):
            matches = fs.glob(path, detail=True)
            if not matches:
                raise FileNotFoundError(f"No files match {url!r}.")
            root = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            return _shard_source(fs, shown, list(matches.items()), root, image_column, caption_column, storage_options)
        if fs.isfile(path):
            return _shard_source(
                fs,
                shown,
                [(path, fs.info(path))],
                posixpath.dirname(path),
                image_column,
                caption_column,
                storage_options,
            )
        listing = fs.find(path, detail=True)
        if not listing:
            raise FileNotFoundError(
                f"Image folder or shard prefix {url!r} does not exist or is empty: check the path or URL "
                "(a misspelled bucket or prefix looks like this too)."
            )
    root = path.rstrip("/")
    if image_sequences or any(p.lower().endswith(VIDEO_EXTENSIONS) for p in listing):
        if not local:
            raise ValueError(
                f"{url!r} holds videos: videos are read from a local folder (PyAV seeks in the file). Copy or mount "
                "them locally (e.g. s3fs / gcsfuse) and point --train_data_dir there."
            )
        return VideoFolderSource(path, unit_size, caption_column)
    tars = [(p, info) for p, info in listing.items() if p.endswith(TAR_SUFFIXES)]
    if tars:
        return _shard_source(fs, shown, tars, root, image_column, caption_column, storage_options)
    parquets = [(p, info) for p, info in listing.items() if p.endswith(".parquet")]
    if parquets:
        return _shard_source(fs, shown, parquets, root, image_column, caption_column, storage_options)
    return FolderSource(fs, root, shown, listing, caption_column, unit_size, storage_options)


def read_unit_items(source: Source, unit: Unit) -> Iterator[SourceItem]:
    """The items of one unit (a `"broken"` unit yields the one skip saying why)."""
    return broken_unit_items(unit) if unit.kind == "broken" else source.items(unit)


def iter_source_items(train_data_dir: str | os.PathLike | None = None, dataset: Any = None, **kwargs: Any):
    """Every item of a source, unit after unit: `SourceItem(label, data, caption, extra, error)`.

    Takes `open_source`'s arguments. Items with `error` set (no image, unreadable file) carry no bytes; decode the
    others with `diffusers_vae_ext.data.load_image_rgb(io.BytesIO(item.data))`. Items of a video folder carry no
    bytes either: `item.extra["path"]` is the video file or frame folder (read it with `diffusers_vae_ext.video`).
    """
    source = open_source(train_data_dir, dataset, **kwargs)
    for unit in source.units():
        yield from read_unit_items(source, unit)
