"""Where a cache lives: a folder or any fsspec URL (`s3://`, `gs://`, `file://`, `memory://`), written crash-safely.

A reader never sees half an object. On a local file system every file is written to a temporary name, flushed to
disk and renamed (`os.replace`); an object store has no rename, so every object is sent whole in one request
(`pipe_file`: one PUT, or a multipart upload that only becomes visible when it completes) and a cut-off upload
leaves nothing under the final name. Object listings are eventually consistent on some stores, so nothing here
decides completeness by listing: the per-unit manifests, fetched by name, do (see `unit.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save, save_file

from ..optional import require_filesystem
from .format import CACHE_FILE, INDEX_FILE, SHARD_DIR, SHARDS_FILE, SKIPPED_FILE, UNIT_DIR, check_cache_info


class StorageAccessError(ValueError):
    """A URL cannot be read or written (credentials, endpoint, permissions, bucket); the message says what to do."""


_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError"}
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}


def explain_storage_error(err: BaseException, url: str, action: str) -> str | None:
    """A message for errors that have a known cause and fix (None: let the original error through)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _CREDENTIAL_ERRORS:
        return (
            f"Cannot {action} {url}: no credentials found ({err}). Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS for gs://), or pass --storage_options "
            '\'{"key": ..., "secret": ...}\' (\'{"anon": true}\' for a public bucket).'
        )
    if names & _CONNECTION_ERRORS:
        return (
            f"Cannot {action} {url}: the storage endpoint cannot be reached ({err}). Check AWS_ENDPOINT_URL / "
            "--storage_options '{\"endpoint_url\": ...}' and the network."
        )
    if isinstance(err, PermissionError):
        return (
            f"Cannot {action} {url}: permission denied ({err}). Use credentials that may {action} it, or another "
            "location."
        )
    return None


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn credential, endpoint and permission errors into a `StorageAccessError` that names the URL and the fix."""
    try:
        yield
    except StorageAccessError:
        raise
    except Exception as err:
        message = explain_storage_error(err, url, action)
        if message is None:
            raise
        raise StorageAccessError(message) from err


def url_to_fs(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's (file system, path) for a folder or URL; credentials come from the environment or the options.

    A protocol whose package is missing (`s3://` without s3fs) gives the install hint (`optional.py`).
    """
    require_filesystem(url)
    return fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish(temp: str, path: str) -> None:
    """Make `temp` durable, then atomically give it its final name: readers see all of it or nothing."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(path))


def safetensors_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (its header: u64 length, then JSON)."""
    length = int.from_bytes(bytes(data[:8]), "little")
    return json.loads(bytes(data[8 : 8 + length])).get("__metadata__") or {}


class CacheStore:
    """A cache's root (folder or URL) and the few operations the writer and readers need.

    Args:
        url: a local folder or an fsspec URL.
        storage_options: passed to the fsspec file system (e.g. `{"endpoint_url": ..., "key": ..., "secret": ...}`
            for s3fs); by default credentials and endpoints come from the standard environment.

    Picklable (DataLoader workers, Ray tasks): the file system is re-created from the URL and options.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        with storage_errors(self.url, "open"):
            self._fs, root = url_to_fs(self.url, self.storage_options)
        self._pid = os.getpid()
        self.root = root.rstrip("/") or root
        self.local = isinstance(self._fs, LocalFileSystem)

    @property
    def fs(self) -> Any:
        # Async file systems (s3fs) are not fork-safe: each process (DataLoader worker, Ray worker) opens its own.
        if self._pid != os.getpid():
            self._fs, self._pid = url_to_fs(self.url, self.storage_options)[0], os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def display(self, name: str = "") -> str:
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    # --------------------------------------------------------------------------------------------- writing
    def prepare(self) -> None:
        """Create the folders (local) and prove that we may write here, before any work starts."""
        with storage_errors(self.url, "write to"):
            if self.local:
                for folder in (SHARD_DIR, UNIT_DIR):
                    os.makedirs(self.path(folder), exist_ok=True)
                # Leftovers of writes cut off by a crash: never named by a manifest, safe to delete.
                for folder in (self.root, self.path(SHARD_DIR), self.path(UNIT_DIR)):
                    for name in os.listdir(folder):
                        if name.startswith(".") and ".tmp-" in name:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(os.path.join(folder, name))
            probe = f".write-check-{uuid.uuid4().hex}"
            self.put(probe, b"")
            self.fs.rm_file(self.path(probe))

    def put(self, name: str, data: bytes) -> None:
        """Publish `data` under `name` whole (temp + fsync + rename locally; one complete upload remotely)."""
        path = self.path(name)
        if self.local:
            temp = _temp_path(path)
            with open(temp, "wb") as handle:
                handle.write(data)
            _publish(temp, path)
        else:
            self.fs.pipe_file(path, data)

    def put_text(self, name: str, text: str) -> None:
        self.put(name, text.encode("utf-8"))

    def put_shard(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if self.local:  # straight to the temporary file: no second copy of the shard in memory
            path = self.path(name)
            temp = _temp_path(path)
            save_file(tensors, temp, metadata=metadata)
            _publish(temp, path)
        else:
            self.put(name, save(tensors, metadata=metadata))

    @contextlib.contextmanager
    def text_writer(self, name: str) -> Iterator[Any]:
        """Stream a large text file (the index) to `name`; it appears only when the block ends without error.

        Remotely the text goes to a local temporary file first and is uploaded whole at the end (closing a
        half-written fsspec file would publish it).
        """
        path = self.path(name)
        temp = _temp_path(path) if self.local else tempfile.NamedTemporaryFile(delete=False, suffix=".tmp").name
        try:
            with open(temp, "w", encoding="utf-8") as handle:
                yield handle
            if self.local:
                _publish(temp, path)
            else:
                self.fs.put_file(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    # --------------------------------------------------------------------------------------------- reading
    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def get_json(self, name: str) -> Any:
        data = self.get(name)
        return None if data is None else json.loads(data)

    def list(self, folder: str) -> list[str]:
        """Names (relative to the root) of the objects directly in `folder`; [] when it does not exist."""
        full = self.path(folder)
        if self.local:
            return sorted(f"{folder}/{n}" for n in os.listdir(full)) if os.path.isdir(full) else []
        try:
            entries = self.fs.ls(full, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(f"{folder}/{e.rstrip('/').rsplit('/', 1)[-1]}" for e in entries)

    def delete(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))

    def read_info(self) -> dict[str, Any]:
        """The parsed `cache.json`, checked for format and version."""
        with storage_errors(self.url, "read"):
            info = self.get_json(CACHE_FILE)
        if info is None:
            raise FileNotFoundError(f"{self.url} is not a latent cache: {CACHE_FILE} is missing.")
        return check_cache_info(info, self.display(CACHE_FILE))

    def remove_cache(self) -> None:
        """Delete what a cache consists of (and nothing else the folder or prefix may hold)."""
        with storage_errors(self.url, "write to"):
            names = [n for n in self.list(SHARD_DIR) if n.rsplit("/", 1)[-1].startswith(("shard-", ".shard-"))]
            names += [n for n in self.list(UNIT_DIR) if n.endswith(".json") or ".tmp-" in n]
            self.delete(names + [CACHE_FILE, INDEX_FILE, SKIPPED_FILE, SHARDS_FILE])


def load_cache_info(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parsed `cache.json` of the cache at `path` (a folder or any fsspec URL): provenance, source, counts."""
    return CacheStore(path, storage_options).read_info()
