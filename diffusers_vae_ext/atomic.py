"""Writing files and folders so that a kill at any moment leaves the old state or the new one, never a mix.

The rule everywhere in the package: write next to the destination (a temporary sibling file or folder), flush
it to disk (`fsync` of every file, then of the folders), write a completeness marker LAST when the result is a
folder, then `os.replace`/`os.rename` onto the final name and `fsync` the parent folder. A rename within one
filesystem is atomic, so readers see the old name's content or the new one's.

- `atomic_write_text`: one file.
- `sync_tree`: fsync every file and folder under a path (what `accelerator.save_state` left unflushed).
- `write_marker` / `marker_problem`: the marker file `{"files": {relative path: {"size", "sha256"}}, ...}` that
  makes a folder checkable, also after it was copied elsewhere; `marker_problem` says why a folder is incomplete.
- `safetensors_problem` / `torch_zip_problem`: cheap checks that a weights file is whole (for folders written
  before markers existed).
- `pause_point`: named moments where tests freeze the process (`DIFFUSERS_VAE_EXT_PAUSE_AT=name[@step]`) to
  kill it there; a no-op otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

PAUSE_ENV = "DIFFUSERS_VAE_EXT_PAUSE_AT"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def sync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every folder bottom-up, then `root` itself.

    Files that vanish between the listing and the fsync are passed over: in a folder several processes write
    (a checkpoint), they are another process's temporary files, renamed since by that process, which flushes them.
    """
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            try:
                fsync_file(os.path.join(folder, name))
            except FileNotFoundError:
                continue
        fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a flushed temporary sibling and `os.replace`; keeps an existing file's mode."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates 0600: keep an existing file's mode, give a new one what open() would.
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> None:
    """Remove `.name.*.tmp` files that `atomic_write_text` or a weights rewrite left when killed mid-write."""
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every file under `folder` as a sorted POSIX relative path, leaving out the top-level names in `exclude`."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in exclude:
            found.append(relative)
    return sorted(found)


def write_marker(folder: str | os.PathLike, marker: str, files: list[str], **fields: Any) -> dict[str, Any]:
    """Write `folder/marker` listing `files` (relative paths) with size and sha256, plus `fields`, atomically.

    Call it LAST, after the files are flushed (`sync_tree`): its presence is what says the folder is complete.
    """
    folder = Path(folder)
    listing = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in files}
    record = {**fields, "files": listing, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(folder / marker, json.dumps(record, indent=2) + "\n")
    return record


def read_marker(folder: str | os.PathLike, marker: str) -> dict[str, Any] | None:
    """The marker's record, or None when it is missing or unreadable."""
    try:
        record = json.loads((Path(folder) / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def marker_problem(folder: str | os.PathLike, marker: str, verify_hashes: bool = False) -> str | None:
    """Why `folder` is not complete by its marker (None when it is): marker missing or unreadable, a listed
    file missing, of another size, with a broken safetensors header, or (with `verify_hashes`) another sha256."""
    folder = Path(folder)
    if not (folder / marker).is_file():
        return f"no {marker} (the save did not finish)"
    record = read_marker(folder, marker)
    if record is None:
        return f"{marker} is unreadable"
    for name, expected in record["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} is {size} bytes, {marker} says {expected.get('size')}"
        if name.endswith(".safetensors") and (problem := safetensors_problem(path)):
            return problem
        if verify_hashes and expected.get("sha256") and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in {marker}"
    return None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is not whole (None when it is): its header must parse and its tensors must end
    exactly at the end of the file, which is what a truncated copy or an interrupted write breaks."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
        return f"{path.name}: unreadable safetensors header ({err})"
    if 8 + header_size + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + header_size + end} (truncated or padded)"
    return None


def torch_zip_problem(path: str | os.PathLike) -> str | None:
    """Why a `torch.save` file (a zip archive) is not whole: a truncated one has lost its central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{Path(path).name}: not a whole torch.save archive ({err})"
    return None


def pause_point(name: str, step: int | None = None) -> None:
    """Freeze here when `$DIFFUSERS_VAE_EXT_PAUSE_AT` names this point (`name` or `name@step`), for tests that
    kill the process at a known moment; prints `paused at name@step` to stderr first."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    here = f"{name}@{step}" if step is not None else name
    if wanted in (name, here):
        print(f"paused at {here}", file=sys.stderr, flush=True)
        time.sleep(3600)
