"""Nothing lost when a training run is killed: real runs killed with SIGKILL at named moments of checkpoint and
final saves (frozen there by `DIFFUSERS_VAE_EXT_PAUSE_AT`, or caught by polling for the temporary folder), then
resumed with `--resume_from_checkpoint latest`, end with the uninterrupted run's weights; truncated checkpoints
are passed over or refused; a killed final save keeps the previous final folder; the recipe is in every folder.

Each run is a separate process started from a forkserver that imported torch, diffusers and the trainer once, so
a run costs its training, not its imports; `Process.kill()` is SIGKILL.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_vae_ext import losses
from diffusers_vae_ext.atomic import PAUSE_ENV
from diffusers_vae_ext.training import checkpoints, output

MAX_STEPS = 8
ARGS = [
    "--model_config", "small_rgb",
    "--resolution", "32",
    "--train_batch_size", "2",
    "--checkpointing_steps", "2",
    "--validation_steps", "1000",
    "--disc_start", "2",
    "--lr_warmup_steps", "0",
    "--report_to", "none",
    "--no_progress",
]  # fmt: skip
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _run_child(argv: list[str], pause_at: str | None, log_path: str) -> None:
    # In the forked child: its own log file, the pause point, one thread (as OMP_NUM_THREADS=1 subprocesses do).
    handle = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.environ.pop(PAUSE_ENV, None)
    if pause_at:
        os.environ[PAUSE_ENV] = pause_at
    torch.set_num_threads(1)
    from diffusers_vae_ext import training

    training.main(argv)


@pytest.fixture(scope="module")
def context():
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "diffusers", "accelerate", "diffusers_vae_ext.training", "matplotlib"])
    multiprocessing.forkserver.ensure_running()
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = previous
    return ctx


class Runs:
    """Start training runs, wait for a moment, kill them."""

    def __init__(self, ctx, logs: Path):
        self.ctx, self.logs, self.started = ctx, logs, []

    def close(self) -> None:
        # A failed test must not leave a run frozen at a pause point.
        for process in self.started:
            if process.is_alive():
                process.kill()
                process.join()

    def start(self, out: Path, *extra: str, pause_at: str | None = None):
        log = self.logs / f"run{len(self.started) + 1}.log"
        log.touch()
        argv = [*ARGS, "--output_dir", str(out), "--max_train_steps", str(MAX_STEPS), *extra]
        process = self.ctx.Process(target=_run_child, args=(argv, pause_at, str(log)))
        process.start()
        process.log = log
        self.started.append(process)
        return process

    def finish(self, out: Path, *extra: str) -> str:
        process = self.start(out, *extra)
        process.join(120)
        text = process.log.read_text()
        assert process.exitcode == 0, text[-3000:]
        return text

    @staticmethod
    def wait_for(process, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not process.is_alive():
                raise AssertionError(f"the run ended before {what}:\n{process.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.0005)

    def kill_at(self, out: Path, pause_at: str, *extra: str) -> str:
        """Run until the trainer freezes at `pause_at`, SIGKILL it; returns its log."""
        process = self.start(out, *extra, pause_at=pause_at)
        self.wait_for(process, lambda: "paused at" in process.log.read_text(), pause_at)
        process.kill()
        process.join()
        return process.log.read_text()

    def kill_when(self, out: Path, condition, what: str, *extra: str) -> str:
        process = self.start(out, *extra)
        self.wait_for(process, condition, what)
        process.kill()
        process.join()
        return process.log.read_text()


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture
def runs(context, tmp_path):
    started = Runs(context, tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def reference(context, tmp_path_factory):
    """An uninterrupted run, keeping its last two checkpoints."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    Runs(context, root).finish(out, "--checkpoints_total_limit", "2")
    return out


def newest_complete_step(out: Path) -> int:
    found = checkpoints.newest_complete_checkpoint(out)
    return int(found.name.split("-")[1]) if found else 0


def assert_nothing_lost(out: Path, newest_before: int) -> int:
    """Every visible checkpoint and a final folder that looks finished are complete; no progress was lost."""
    for folder in checkpoints.list_checkpoints(out):
        assert checkpoints.checkpoint_problem(folder, verify_hashes=True) is None, folder
    if (out / "config.json").is_file():
        assert output.final_folder_problem(out) is None
        DiffusersAutoencoderKL.from_pretrained(out)
    newest = newest_complete_step(out)
    assert newest >= newest_before, (newest, newest_before)
    return newest


def test_killed_at_every_moment_then_resumed_equals_the_uninterrupted_run(runs, reference, tmp_path):
    out = tmp_path / "run"
    resume = ("--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    moments = []
    newest = 0

    # 1. no pause: poll for the first checkpoint's temporary folder and kill as soon as it appears
    staging = out / ".checkpoint-2.tmp"
    runs.kill_when(out, staging.exists, "the temporary folder of checkpoint-2", *resume)
    moments.append(f"checkpoint-2 being written (temporary folder seen{', still there' if staging.exists() else ''})")
    newest = assert_nothing_lost(out, newest)
    # 2-5. frozen at each named moment of a checkpoint save
    for point in ("checkpoint:started@4", "checkpoint:written@4", "checkpoint:marked@4", "checkpoint:renamed@6"):
        log = runs.kill_at(out, point, *resume)
        moments.append(f"{point} (that run had started from {_resumed_from(log)})")
        newest = assert_nothing_lost(out, newest)
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-4").is_dir()  # pruned only after the save
    # 6. no pause: in the middle of step 8 or its checkpoint
    log_path = out / "train_log.jsonl"
    runs.kill_when(out, lambda: _rows(log_path) >= 7, "step 7 in the log", *resume)
    moments.append("after step 7 was logged (unhooked)")
    newest = assert_nothing_lost(out, newest)
    # 7-8. frozen while the final files are written, and in the middle of swapping them in
    for point in ("final:written@8", "final:swapping"):
        log = runs.kill_at(out, point, *resume)
        moments.append(f"{point} (that run had started from {_resumed_from(log)})")
        newest = assert_nothing_lost(out, newest)
        assert not (out / "config.json").exists()  # nothing looks finished before the swap completes
    log = runs.finish(out, *resume)
    assert "finished the interrupted swap" in log  # the killed swap was completed at start
    print(f"\n{len(moments)} kill moments, nothing lost:\n  " + "\n  ".join(moments))

    assert output.final_folder_problem(out) is None
    assert not (out / ".final.tmp").exists() and not (out / ".final.previous").exists()
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-8"]
    assert not list(out.glob(".checkpoint-*"))
    assert_equal_weights(state_dict(out / WEIGHTS), state_dict(reference / WEIGHTS))
    assert_equal_weights(
        state_dict(out / output.DISCRIMINATOR_FILE), state_dict(reference / output.DISCRIMINATOR_FILE)
    )
    expected = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [row["step"] for row in got] == list(range(1, MAX_STEPS + 1))
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    metrics = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [0, MAX_STEPS]  # the final validation once, though two final saves were killed
    ours = DiffusersAutoencoderKL.from_pretrained(out)
    assert ours.config.scaling_factor == DiffusersAutoencoderKL.from_pretrained(reference).config.scaling_factor


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _resumed_from(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("Resuming from")]
    return Path(lines[-1].split()[-1]).name if lines else "scratch"


def test_truncated_newest_checkpoint_is_passed_over_or_refused(runs, reference, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-6", "checkpoint-8"):
        shutil.copytree(reference / name, out / name)
    weights = out / "checkpoint-8" / "model.safetensors"
    with open(weights, "r+b") as handle:  # what a kill during the write, or an interrupted copy, leaves
        handle.truncate(weights.stat().st_size // 2)
    problem = checkpoints.checkpoint_problem(out / "checkpoint-8")
    assert "model.safetensors" in problem and "checkpoint.json says" in problem

    args = checkpoints.argparse.Namespace(output_dir=str(out), resume_from_checkpoint="latest")
    with caplog.at_level(logging.INFO, logger="diffusers_vae_ext.training"):
        assert checkpoints.resolve_resume_checkpoint(args) == out / "checkpoint-6"
    assert "Passing over" in caplog.text and "checkpoint-8" in caplog.text and "model.safetensors" in caplog.text
    assert "checkpoint-6 is the newest complete checkpoint" in caplog.text

    args.resume_from_checkpoint = str(out / "checkpoint-8")
    with pytest.raises(ValueError, match="incomplete checkpoint .*newest complete one is .*checkpoint-6"):
        checkpoints.resolve_resume_checkpoint(args)

    # The real run resumes from checkpoint-6 and ends with the uninterrupted weights.
    log = runs.finish(out, "--resume_from_checkpoint", "latest")
    assert "Resuming from" in log and "checkpoint-6" in log and "Passing over" in log
    assert_equal_weights(state_dict(out / WEIGHTS), state_dict(reference / WEIGHTS))

    # Alone and incomplete: a new run with a warning; an explicit path names that there is none.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copytree(reference / "checkpoint-6", alone / "checkpoint-6")
    (alone / "checkpoint-6" / "optimizer.bin").write_bytes(b"")
    caplog.clear()
    args = checkpoints.argparse.Namespace(output_dir=str(alone), resume_from_checkpoint="latest")
    with caplog.at_level(logging.INFO, logger="diffusers_vae_ext.training"):
        assert checkpoints.resolve_resume_checkpoint(args) is None
    assert "optimizer.bin is 0 bytes" in caplog.text and "starting a new run" in caplog.text
    args.resume_from_checkpoint = "checkpoint-6"  # a name under --output_dir
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoints.resolve_resume_checkpoint(args)


def test_checkpoint_without_marker_is_checked_by_its_files(reference, tmp_path):
    legacy = tmp_path / "checkpoint-6"
    shutil.copytree(reference / "checkpoint-6", legacy)
    (legacy / "checkpoint.json").unlink()  # as the previous version wrote them
    assert checkpoints.checkpoint_problem(legacy) is None
    optimizer = legacy / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    assert "optimizer.bin: not a whole torch.save archive" in checkpoints.checkpoint_problem(legacy)
    optimizer.unlink()
    assert "no optimizer state" in checkpoints.checkpoint_problem(legacy)
    shutil.copy(reference / "checkpoint-6" / "optimizer.bin", optimizer)
    weights = legacy / "model_1.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert "model_1.safetensors: " in checkpoints.checkpoint_problem(legacy)


def test_killed_final_save_keeps_the_previous_final_folder(runs, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    previous = state_dict(reference / WEIGHTS)
    # A new fine-tune of 2 steps that restarts from the previous run's discriminator (not trained before step 2).
    new_run = ("--seed", "1", "--max_train_steps", "2", "--checkpointing_steps", "100")
    new_run += ("--discriminator_weights", str(reference))

    runs.kill_at(out, "final:written@2", *new_run)
    assert (out / ".final.tmp" / WEIGHTS).is_file()  # the new weights were being written aside
    assert output.final_folder_problem(out) is None
    assert_equal_weights(state_dict(out / WEIGHTS), previous)
    assert_equal_weights(DiffusersAutoencoderKL.from_pretrained(out).state_dict(), previous)

    runs.kill_at(out, "final:swapping", *new_run)
    assert not (out / "config.json").exists()  # mid-swap: nothing looks finished
    aside = out / ".final.previous"
    assert_equal_weights(DiffusersAutoencoderKL.from_pretrained(aside).state_dict(), previous)
    assert output.final_folder_problem(out / ".final.tmp") is None  # the new files, whole
    assert output.clear_interrupted_final_save(out)  # what the next run does at start: finish the swap
    assert output.final_folder_problem(out) is None and not aside.exists()
    new = DiffusersAutoencoderKL.from_pretrained(out).state_dict()
    assert any(not torch.equal(new[key], previous[key]) for key in previous)
    assert json.loads((out / "training_recipe.json").read_text())["step"] == 2
    assert_equal_weights(
        state_dict(out / output.DISCRIMINATOR_FILE), state_dict(reference / output.DISCRIMINATOR_FILE)
    )


def test_recipe_in_every_checkpoint_and_the_final_folder(reference):
    import diffusers

    for folder, discriminator_file in ((reference / "checkpoint-8", "model_1.safetensors"), (reference, None)):
        recipe = json.loads((folder / "training_recipe.json").read_text())
        assert recipe["step"] == MAX_STEPS
        assert recipe["arguments"]["model_config"] == "small_rgb" and recipe["arguments"]["disc_start"] == 2
        assert recipe["autoencoder"]["class"] == "AutoencoderKL"
        assert recipe["autoencoder"]["config"]["block_out_channels"] == [32, 64, 128]
        assert recipe["data"]["num_train_images"] == 5 and "built-in sample photos" in recipe["data"]["source"]
        assert recipe["run"]["seed"] == 0 and recipe["run"]["num_processes"] == 1
        assert recipe["versions"]["torch"] == torch.__version__
        assert recipe["versions"]["diffusers"] == diffusers.__version__
        assert recipe["versions"]["diffusers-vae-ext"]
        expected_file = discriminator_file or output.DISCRIMINATOR_FILE
        assert recipe["discriminator"]["file"] == expected_file
        # The discriminator rebuilds from the recipe and loads its weights strictly.
        discriminator = losses.PatchGANDiscriminator(**recipe["discriminator"]["config"])
        discriminator.load_state_dict(load_file(str(folder / expected_file)))
    with pytest.raises(ValueError, match="--disc_layers 3"):
        output.load_discriminator(losses.PatchGANDiscriminator(num_layers=2), reference)
    with safe_open(str(reference / output.DISCRIMINATOR_FILE), framework="pt") as handle:
        assert json.loads(handle.metadata()["discriminator"])["class"] == "PatchGANDiscriminator"
    assert_equal_weights(
        load_file(str(reference / output.DISCRIMINATOR_FILE)),
        load_file(str(reference / "checkpoint-8" / "model_1.safetensors")),
    )
