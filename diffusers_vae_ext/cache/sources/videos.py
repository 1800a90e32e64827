"""A local folder of videos (`.mp4 .webm .mov .mkv`) and image sequences, cut into slices of the sorted listing.

The listing is `video.list_videos` (the one `diffusers-vae stats` reads): video files, and folders of frames
(image sequences). A unit is a slice of `unit_size` videos; reading it yields one item per video, with no bytes:
the clips are planned and decoded from the file by the cache's clip reader (`cache/clips.py`), because PyAV seeks
in the file instead of holding it in memory. Videos are read from a local file system only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...data import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from ...optional import require
from ...video import list_videos
from .base import Source, SourceItem, Unit, slice_units
from .folder import metadata_captions


def _file_version(path: Path) -> list[Any]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def video_version(path: Path) -> list[Any]:
    """Size and modification time of a video file, or of every frame of an image sequence (changes with them)."""
    if not path.is_dir():
        return _file_version(path) if path.exists() else ["missing"]
    return [[p.name, *_file_version(p)] for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]


def video_content_hash(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a video file's bytes, or of an image sequence's frame names and bytes.

    Read in 1 MiB blocks (videos can be large); raises `OSError` for a file that cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if not path.is_dir() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\x00")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class VideoFolderSource(Source):
    """Videos and image sequences under a local folder, labelled by their path relative to it.

    Args:
        root: the folder (`video.list_videos` lists it: video files anywhere below it, and folders of frames).
        unit_size: videos per unit of work.
        caption_column: the `metadata.jsonl` key holding the caption (default "text"; its `file_name` names a video
            file or a frame folder); otherwise a sidecar `<video stem>.txt` / `.caption` next to the video (for a
            frame folder: `<folder>.txt` next to it, or `caption.txt` inside it).

    Items carry no bytes: `extra["path"]` is the video file or frame folder, read by the clip reader.
    """

    kind = "video_folder"

    def __init__(self, root: str | os.PathLike, unit_size: int, caption_column: str | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.root = Path(root).resolve()
        self._bind_fs(str(self.root), None, LocalFileSystem())
        self.unit_size = unit_size
        self.videos = list_videos(self.root)
        if any(path.is_file() for path in self.videos):  # frame folders are read with PIL, video files with PyAV
            require("av", f"the videos in {str(self.root)!r}")
        self.labels = [self._label(path) for path in self.videos]
        names = [p.relative_to(self.root).as_posix() for p in self.root.rglob("metadata.jsonl") if p.is_file()]
        self.captions = metadata_captions(
            self.fs, self.root.as_posix(), str(self.root), names, caption_column or "text"
        )

    def _label(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else self.root.name

    def __len__(self) -> int:
        return len(self.videos)

    def units(self) -> Iterator[Unit]:
        return slice_units("videos", len(self.videos), self.unit_size)

    def _sidecar(self, path: Path) -> Path | None:
        candidates = [path.with_suffix(extension) for extension in CAPTION_EXTENSIONS]
        if path.is_dir():
            candidates = [path.parent / (path.name + e) for e in CAPTION_EXTENSIONS]
            candidates += [path / ("caption" + e) for e in CAPTION_EXTENSIONS]
        return next((c for c in candidates if c.is_file()), None)

    def signature(self, unit: Unit) -> str:
        """Names, sizes and modification times of the slice's videos (every frame of a sequence) and captions."""
        digest = hashlib.sha256()
        for path, label in zip(self.videos[unit.start : unit.stop], self.labels[unit.start : unit.stop]):
            sidecar = self._sidecar(path)
            caption = self.captions.get(label) if label in self.captions else sidecar and _file_version(sidecar)
            digest.update(json.dumps([label, video_version(path), caption]).encode())
        return digest.hexdigest()

    def items(self, unit: Unit) -> Iterator[SourceItem]:
        for path, label in zip(self.videos[unit.start : unit.stop], self.labels[unit.start : unit.stop]):
            caption = self.captions.get(label, "")
            sidecar = None if label in self.captions else self._sidecar(path)
            if sidecar is not None:
                try:
                    caption = sidecar.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError):
                    caption = ""
            yield SourceItem(label, None, caption, extra={"path": str(path)})

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "path": str(self.root), "num_videos": len(self), "unit_size": self.unit_size}
