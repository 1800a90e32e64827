"""The `diffusers-vae` command: one subcommand per job, each a thin wrapper over the package.

Modules: `parser` (`build_parser`: the subcommands and their arguments), `commands` (one `_cmd_*` function per
subcommand, and the checks they share). `main` (the `diffusers-vae` console script) is here;
`python -m diffusers_vae_ext.cli` runs it too (`__main__.py`).
"""

from __future__ import annotations

import sys

from ..optional import MissingDependencyError
from .commands import _check_dependencies
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # The trainer owns its (long, diffusers-style) argument list; `diffusers-vae train --help` shows it.
        from ..training import main as train_main

        try:
            train_main(argv[1:], prog="diffusers-vae train")
        except MissingDependencyError as err:
            print(f"diffusers-vae train: error: {err}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        _check_dependencies(args)  # before any model is loaded or any input read
        return args.func(args)
    except MissingDependencyError as err:  # also one found later, e.g. by listing a folder of tars
        args.command_parser.error(str(err))  # usage, "error: ...", exit code 2; no traceback
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    # What `accelerator.end_training()` does for the trainer: a process of `accelerate launch` that exits with its
    # process group alive can abort at exit ("terminate called without an active exception", seen once in CI on
    # `cache` with 2 CPU processes) while gloo's threads are torn down.
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
