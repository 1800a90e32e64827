"""Checkpoints: atomic saving, which one to resume from, pruning, the EMA weights inside them, and stopping.

A checkpoint is an `accelerator.save_state` folder `checkpoint-<step>` under `--output_dir`, and it becomes visible
only when complete:

1. every process writes what accelerate has it write into the same temporary sibling `.checkpoint-<step>.tmp`
   (the main process first adds `training_recipe.json`) and flushes it (`fsync` of files and folders);
2. after a barrier the main process writes the marker `checkpoint.json` LAST: the step and every file with its
   size and sha256;
3. it renames the folder to `checkpoint-<step>` (an older folder of that name is moved aside first and deleted
   after) and flushes `--output_dir`; only then are checkpoints beyond `--checkpoints_total_limit` pruned (each
   renamed to `.checkpoint-<step>.deleting` before it is deleted, so a half-deleted one is never mistaken for a
   checkpoint).

A kill at any moment therefore leaves every `checkpoint-<step>` complete. At the start of a run the main process
clears what an interrupted save left (`clear_interrupted_saves`): a temporary folder whose marker is complete is
renamed into place (it was killed between marker and rename; it replaces an earlier run's folder of the same
step), any other is deleted, as are `.deleting` folders.

Which checkpoint is complete (`checkpoint_problem`): one with a marker must hold every file it lists at the listed
size, with whole safetensors headers; the one chosen for resuming is also checked against the sha256s (so a
folder copied back from elsewhere is checked too). A checkpoint without a marker (written before markers existed)
is accepted when it holds `model.safetensors`, `optimizer.bin` and `random_states_0.pkl`, every `.safetensors` header parses and its
tensors cover the file exactly, and every `torch.save` archive (`.bin`, `.pkl`) has its zip directory: what an
interrupted write or a truncated copy breaks.

`--resume_from_checkpoint latest` takes the newest complete checkpoint and logs why it passed over any newer one;
with none complete it starts a new run with a warning. An explicit path to an incomplete checkpoint is refused with
a message naming the newest complete one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import (
    atomic_write_text,
    folder_files,
    fsync_dir,
    marker_problem,
    pause_point,
    read_marker,
    safetensors_problem,
    sync_tree,
    torch_zip_problem,
    write_marker,
)
from .recipe import RECIPE_NAME, recipe_json

logger = logging.getLogger(__package__)

MARKER = "checkpoint.json"


def _step_of(path: Path) -> int | None:
    # checkpoint-<step>, .checkpoint-<step>.tmp, .checkpoint-<step>.deleting
    tail = path.name.split("-")[-1].split(".")[0]
    return int(tail) if tail.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` folder, oldest first (complete or not: see `checkpoint_problem`)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _legacy_problem(path: Path) -> str | None:
    # A checkpoint written before markers existed: whole weights, optimizer and RNG files (module docstring).
    files = [p for p in path.rglob("*") if p.is_file()]
    # The first model and optimizer, and the RNG state, which accelerate writes last.
    for name, what in (
        ("model.safetensors", "model weights"),
        ("optimizer.bin", "optimizer state"),
        ("random_states_0.pkl", "RNG state"),
    ):
        if not (path / name).is_file():
            return f"no {MARKER} and no {what} ({name}): not a finished checkpoint"
    for file in files:
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        elif file.suffix in (".bin", ".pkl"):
            problem = torch_zip_problem(file)
        else:
            continue
        if problem:
            return f"no {MARKER}, and {problem}"
    return None


def checkpoint_problem(path: Path, verify_hashes: bool = False) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is (rules in the module docstring)."""
    if not path.is_dir():
        return "not a folder"
    if not (path / MARKER).is_file():
        return _legacy_problem(path)
    record = read_marker(path, MARKER)
    if record is not None and record.get("step") != _step_of(path):
        return f"{MARKER} is for step {record.get('step')}, the folder is named for step {_step_of(path)}"
    return marker_problem(path, MARKER, verify_hashes=verify_hashes)


def newest_complete_checkpoint(output_dir: Path, log: bool = False) -> Path | None:
    """The newest complete checkpoint under `output_dir` (sha256s verified); with `log`, say why any newer one
    was passed over."""
    for candidate in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(candidate, verify_hashes=True)
        if problem is None:
            return candidate
        if log:
            logger.warning("Passing over %s: %s.", candidate, problem)
    return None


def resolve_resume_checkpoint(args: argparse.Namespace, log: bool = True) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: `latest` (the newest complete one), a folder, or a
    `checkpoint-<step>` name under `--output_dir`. An incomplete folder raises `ValueError`."""
    if not args.resume_from_checkpoint:
        return None
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        found = newest_complete_checkpoint(output_dir, log=log)
        if found is None:
            if log:
                logger.warning(
                    "--resume_from_checkpoint latest: no complete checkpoint in %s, starting a new run.", output_dir
                )
            return None
        if log:
            logger.info("--resume_from_checkpoint latest: %s is the newest complete checkpoint.", found)
        return found
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir() and (output_dir / path).is_dir():
        path = output_dir / path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder.")
    problem = checkpoint_problem(path, verify_hashes=True)
    if problem:
        newest = newest_complete_checkpoint(path.parent)
        instead = (
            f"the newest complete one is {newest}: pass it, or --resume_from_checkpoint latest"
            if newest
            else f"there is no complete checkpoint in {path.parent}"
        )
        raise ValueError(f"--resume_from_checkpoint {path} is an incomplete checkpoint ({problem}); {instead}.")
    return path


def _delete(folder: Path) -> None:
    # Rename first: a half-deleted folder must not keep a checkpoint's name.
    doomed = folder.with_name(f".{folder.name}.deleting")
    os.replace(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed)


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints so that `limit` remain, never `keep` (the one just saved)."""
    if limit is None:
        return
    existing = [p for p in list_checkpoints(output_dir) if p != keep]
    room = max(0, limit - (1 if keep is not None else 0))
    for old in existing[: max(0, len(existing) - room)]:
        _delete(old)


def clear_interrupted_saves(output_dir: Path) -> list[str]:
    """Finish or remove what a killed checkpoint save left in `output_dir` (main process, before resuming);
    returns one line per action."""
    actions = []
    for leftover in sorted(output_dir.glob(".checkpoint-*.tmp")):
        target = output_dir / leftover.name[1:].removesuffix(".tmp")
        complete = _step_of(leftover) is not None and marker_problem(leftover, MARKER, verify_hashes=True) is None
        if complete:
            if target.exists():  # an earlier run's checkpoint of the same step
                _delete(target)
            os.replace(leftover, target)
            fsync_dir(output_dir)
            actions.append(f"completed the interrupted save of {target.name} (killed after its marker)")
        else:
            shutil.rmtree(leftover)
            actions.append(f"removed {leftover.name}, an interrupted checkpoint save")
    for leftover in sorted(output_dir.glob(".checkpoint-*.deleting")):
        shutil.rmtree(leftover)
        actions.append(f"removed {leftover.name}, an interrupted deletion")
    return actions


def logged_steps(path: Path) -> set[int]:
    """The steps of a JSONL log's rows (empty when there is no log)."""
    if not path.is_file():
        return set()
    return {json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def truncate_jsonl(path: Path, step: int) -> None:
    # Rows written after the checkpoint we resume from belong to a future that is being replayed.
    if path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash (power loss) is dropped
                pass
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Stop requested: saving a checkpoint after this step (Ctrl-C again to stop at once).")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested_on_any_process(self, accelerator) -> bool:
        """Whether any process was asked to stop, so that all of them save and stop at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.gather(flag).max() > 0)


def resume_state(
    accelerator, args: argparse.Namespace, updates_per_epoch: int, jsonl_logs: Sequence[Path]
) -> tuple[int, int, int]:
    """Load `--resume_from_checkpoint` into `accelerator`: (global step, first epoch, batches to skip in it).

    First the main process clears what interrupted saves left (`clear_interrupted_saves`, and the final folder's
    `output.clear_interrupted_final_save`). The run's JSONL logs are cut back to the checkpoint's step; without a
    checkpoint the run starts at step 0 and a new run in an old folder starts new logs.
    """
    from .output import clear_interrupted_final_save

    output_dir = Path(args.output_dir)
    if accelerator.is_main_process and output_dir.is_dir():
        for line in clear_interrupted_saves(output_dir) + clear_interrupted_final_save(output_dir):
            logger.warning("%s: %s.", output_dir, line)
    accelerator.wait_for_everyone()
    checkpoint = _resolve_on_main(accelerator, args)
    if checkpoint is None:
        if accelerator.is_main_process:
            for stale in jsonl_logs:
                stale.unlink(missing_ok=True)
        return 0, 0, 0
    accelerator.print(f"Resuming from {checkpoint}")
    accelerator.load_state(str(checkpoint))
    global_step = int(checkpoint.name.split("-")[-1])
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        for path in jsonl_logs:
            truncate_jsonl(path, global_step)
    return global_step, first_epoch, skip_batches


def _resolve_on_main(accelerator, args: argparse.Namespace) -> Path | None:
    # The main process checks (and hashes) the checkpoints once; the others get its answer, or its error.
    if accelerator.num_processes == 1:
        return resolve_resume_checkpoint(args)
    from accelerate.utils import broadcast_object_list

    answer: list = [None, None]
    if accelerator.is_main_process:
        try:
            answer[0] = resolve_resume_checkpoint(args)
        except (ValueError, FileNotFoundError) as err:
            answer[1] = err
    broadcast_object_list(answer)
    if answer[1] is not None:
        raise answer[1]
    return answer[0]


def save_checkpoint(
    accelerator, output_dir: Path, step: int, limit: int | None, recipe: dict[str, Any] | None = None
) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, atomically (module docstring), with the run's
    `recipe` as `training_recipe.json`; then prune to keep `limit`. Call on every process."""
    path = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        if recipe is not None:
            has_discriminator = recipe.get("discriminator") is not None
            text = recipe_json(recipe, step, "model_1.safetensors" if has_discriminator else None)
            (staging / RECIPE_NAME).write_text(text, encoding="utf-8")
        pause_point("checkpoint:started", step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    sync_tree(staging)  # every process flushes what it wrote (on a shared filesystem only it can)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pause_point("checkpoint:written", step)
        write_marker(staging, MARKER, folder_files(staging, exclude=(MARKER,)), step=step)
        pause_point("checkpoint:marked", step)
        if path.exists():  # a checkpoint of an earlier run in this folder
            _delete(path)
        os.replace(staging, path)
        fsync_dir(output_dir)
        pause_point("checkpoint:renamed", step)
        prune_checkpoints(output_dir, limit, keep=path)
    accelerator.wait_for_everyone()
    return path


def register_ema_checkpointing(accelerator, ema) -> None:
    """Save and load the EMA weights with every checkpoint, in its `vae_ema` subfolder."""
    from diffusers.training_utils import EMAModel

    # EMA weights live in the checkpoint as a diffusers folder (safetensors), not as a pickled custom object.
    def save_ema(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(checkpoint_dir, "vae_ema"))

    def load_ema(models, checkpoint_dir):
        # the trained class (EMAModel records it): AutoencoderKL or any other class the adapter trains
        loaded = EMAModel.from_pretrained(os.path.join(checkpoint_dir, "vae_ema"), model_cls=ema.model_cls)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
