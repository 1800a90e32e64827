"""Optional dependencies: the one table that says which extra installs each, and the error that says so.

Every optional import in the package goes through `require`, so a missing package always gives the same kind of
message, naming the pip command:

    `webdataset` is needed for webdataset .tar shards but is not installed: pip install "diffusers-vae-ext[scale]"

`MissingDependencyError` is an `ImportError`, so code that already catches `ImportError` keeps working; the CLI
turns it into an argparse-style error (exit code 2, no traceback). `filesystem_dependency` maps a URL's protocol
to the package behind it (`s3://` -> s3fs, `gs://` -> gcsfs, others as fsspec knows them).

This module imports nothing from the package (every other module may import it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

DISTRIBUTION = "diffusers-vae-ext"


@dataclass(frozen=True)
class OptionalDependency:
    """A package some inputs or options need.

    Args:
        module: the import name (`av` for PyAV).
        package: the PyPI name.
        extra: the extra of this package that installs it (`pip install "diffusers-vae-ext[extra]"`); None where
            no extra does (then `pip install <package>`).
        needed_for: what needs it, as a user would name it (used when the caller does not say).
    """

    module: str
    package: str
    extra: str | None
    needed_for: str

    @property
    def install_command(self) -> str:
        if self.extra is None:
            return f"pip install {self.package}"
        return f'pip install "{DISTRIBUTION}[{self.extra}]"'


OPTIONAL_DEPENDENCIES: dict[str, OptionalDependency] = {
    dep.module: dep
    for dep in (
        OptionalDependency("braceexpand", "braceexpand", "scale", 'brace patterns such as "data/{0000..0009}.tar"'),
        OptionalDependency("webdataset", "webdataset", "scale", "webdataset .tar shards"),
        OptionalDependency("pyarrow", "pyarrow", "scale", ".parquet files"),
        OptionalDependency("fsspec", "fsspec", "scale", "URLs (s3://, gs://, ...)"),
        OptionalDependency("s3fs", "s3fs", "s3", "s3:// URLs"),
        OptionalDependency("gcsfs", "gcsfs", "gcs", "gs:// URLs"),
        OptionalDependency("ray", "ray", "ray", "--engine ray"),
        OptionalDependency("av", "av", "video", "videos (PyAV)"),
        OptionalDependency("tensorboard", "tensorboard", "tensorboard", "--report_to tensorboard"),
        OptionalDependency("wandb", "wandb", None, "--report_to wandb"),
        OptionalDependency("datasets", "datasets", "datasets", "--dataset_name (a `datasets` dataset)"),
    )
}

# URL protocols whose file system lives in a package of the table (others: as fsspec's registry says).
PROTOCOL_DEPENDENCIES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class MissingDependencyError(ImportError):
    """An optional package is missing (or cannot be imported); the message names the pip command that fixes it."""

    def __init__(self, message: str, dependency: OptionalDependency | None = None) -> None:
        super().__init__(message, name=dependency.module if dependency else None)
        self.dependency = dependency


def _missing(dep: OptionalDependency, for_what: str, err: ImportError) -> MissingDependencyError:
    top = dep.module.split(".")[0]
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == top:
        problem = "is not installed"
    else:  # installed, but broken (a missing shared library, a half-finished upgrade): say what went wrong
        problem = f"is installed but cannot be imported ({err})"
    return MissingDependencyError(
        f"`{dep.package}` is needed for {for_what} but {problem}: {dep.install_command}", dep
    )


def require(name: str, for_what: str | None = None) -> ModuleType:
    """Import and return the optional module `name` (a key of `OPTIONAL_DEPENDENCIES`).

    Raises `MissingDependencyError` naming `for_what` (default: the table's `needed_for`) and the pip command.
    """
    dep = OPTIONAL_DEPENDENCIES[name]
    try:
        return importlib.import_module(dep.module)
    except ImportError as err:
        raise _missing(dep, for_what or dep.needed_for, err) from err


def url_protocols(url: str | os.PathLike) -> list[str]:
    """The protocols of a URL (`["simplecache", "s3"]` for `simplecache::s3://b/k`); [] for a plain path."""
    protocols = []
    for part in str(url).split("::"):
        if "://" in part:
            protocols.append(part.split("://", 1)[0].lower())
    return protocols


def require_filesystem(url: str | os.PathLike) -> None:
    """Check that the packages behind `url`'s protocols are installed (no I/O; plain paths need nothing).

    `s3://` needs s3fs and `gs://` gcsfs (hints from the table); any other protocol fsspec knows is checked by
    importing its implementation, with fsspec's own hint; unknown protocols are left to fsspec's error.
    """
    protocols = url_protocols(url)
    if not protocols:
        return
    require("fsspec", f"{url!s}")
    from fsspec.registry import known_implementations

    for protocol in protocols:
        if protocol in PROTOCOL_DEPENDENCIES:
            require(PROTOCOL_DEPENDENCIES[protocol], f"{protocol}:// URLs ({url!s})")
            continue
        known = known_implementations.get(protocol)
        if known is None:
            continue
        module = known["class"].rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as err:
            hint = known.get("err") or f"install the package that provides {known['class']}"
            raise MissingDependencyError(
                f"{protocol}:// URLs ({url!s}) need `{module.split('.')[0]}`: {hint}"
            ) from err
