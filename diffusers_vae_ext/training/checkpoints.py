"""Checkpoints: where they are, which one to resume from, pruning, the EMA weights inside them, and stopping.

Checkpoints are `accelerator.save_state` folders named `checkpoint-<step>` under `--output_dir`.
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

import torch

from ..modeling import AutoencoderKL

logger = logging.getLogger(__package__)


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume_checkpoint(args: argparse.Namespace) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(Path(args.output_dir))
        if not found:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting a new run.", args.output_dir
            )
            return None
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder.")
    return path


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    # Keep limit - 1 so that the checkpoint about to be saved makes `limit`.
    if limit is None:
        return
    existing = list_checkpoints(output_dir)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def truncate_jsonl(path: Path, step: int) -> None:
    # Rows written after the checkpoint we resume from belong to a future that is being replayed.
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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

    The run's JSONL logs are cut back to the checkpoint's step; without a checkpoint the run starts at step 0 and
    a new run in an old folder starts new logs.
    """
    checkpoint = resolve_resume_checkpoint(args)
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


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, pruning old ones to keep `limit`."""
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    path = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    return path


def register_ema_checkpointing(accelerator, ema) -> None:
    """Save and load the EMA weights with every checkpoint, in its `vae_ema` subfolder."""
    from diffusers.training_utils import EMAModel

    # EMA weights live in the checkpoint as a diffusers folder (safetensors), not as a pickled custom object.
    def save_ema(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(checkpoint_dir, "vae_ema"))

    def load_ema(models, checkpoint_dir):
        loaded = EMAModel.from_pretrained(os.path.join(checkpoint_dir, "vae_ema"), model_cls=AutoencoderKL)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
