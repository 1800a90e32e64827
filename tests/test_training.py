"""The training loop end to end on a tiny config and real photos: loss goes down, resume is exact, 2 processes run,
decoder-only training freezes the encoder, non-finite losses are skipped then abort, bad data fails early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, cpu_launch, read_jsonl
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from diffusers_vae_ext import AutoencoderKL, losses, training

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def run(output_dir: Path, config: Path, *extra: str, data: Path | None = None) -> Path:
    argv = [
        "--model_config", str(config),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "4",
        "--report_to", "none",
        "--no_progress",
        "--lr_warmup_steps", "0",
    ]  # fmt: skip
    if data is not None:
        argv += ["--train_data_dir", str(data)]
    return training.main(argv + list(extra))


def test_short_run_lowers_loss_and_writes_everything(tmp_path, tiny_config, photo_dir):
    out = run(
        tmp_path / "run",
        tiny_config,
        "--max_train_steps", "24",
        "--learning_rate", "2e-3",
        "--validation_steps", "12",
        "--checkpointing_steps", "12",
        "--recompute_scaling_factor",
        data=photo_dir,
    )  # fmt: skip
    log = read_jsonl(out / "train_log.jsonl")
    assert [row["step"] for row in log] == list(range(1, 25))
    first, last = [row["rec_per_pixel"] for row in log[:4]], [row["rec_per_pixel"] for row in log[-4:]]
    assert sum(last) / 4 < 0.8 * sum(first) / 4, (first, last)

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 12, 24]
    assert metrics[-1]["psnr"] > metrics[0]["psnr"] + 1.0
    assert all(0 < m["ssim"] <= 1 for m in metrics)
    assert (out / "validation" / "step_000024.png").is_file()
    grid = Image.open(out / "validation" / "step_000024.png")
    assert grid.height > 2 * 32  # originals over reconstructions
    assert (out / "loss_curve.png").is_file()
    assert (out / "checkpoint-12" / "model.safetensors").is_file()
    assert (out / "checkpoint-24").is_dir()

    # A plain diffusers VAE folder: loads strictly in both classes with the same weights.
    ours = AutoencoderKL.from_pretrained(out)
    theirs = DiffusersAutoencoderKL.from_pretrained(out)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[key], value, rtol=0, atol=0)
    # The measured scaling factor replaced the config's placeholder 1.0.
    assert ours.config.scaling_factor != 1.0 and 0.01 < ours.config.scaling_factor < 100


def test_resume_continues_with_identical_losses(tmp_path, tiny_config, photo_dir):
    common = (
        "--learning_rate", "1e-3",
        "--validation_steps", "100",
        "--checkpointing_steps", "3",
        "--disc_start", "2",
        "--use_ema",
        "--random_flip",
        "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    whole = run(tmp_path / "whole", tiny_config, *common, "--max_train_steps", "6", data=photo_dir)
    part = run(tmp_path / "part", tiny_config, *common, "--max_train_steps", "3", data=photo_dir)
    resumed = run(
        part, tiny_config, *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", data=photo_dir
    )

    expected, got = read_jsonl(whole / "train_log.jsonl"), read_jsonl(resumed / "train_log.jsonl")
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        for key in ("loss", "rec_per_pixel", "kl", "d_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert "d_loss" in expected[-1]  # the discriminator really trained after --disc_start
    final_whole = load_file(str(whole / "diffusion_pytorch_model.safetensors"))
    final_resumed = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    for key, value in final_whole.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)
    assert (part / "checkpoint-3" / "vae_ema" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_decoder_only_freezes_encoder_bit_for_bit(tmp_path, tiny_config, photo_dir):
    start = tmp_path / "start"
    AutoencoderKL.from_config(TINY_CONFIG).save_pretrained(start)
    out = tmp_path / "decoder_only"
    training.main(
        [
            "--pretrained_model_name_or_path", str(start),
            "--train_data_dir", str(photo_dir),
            "--output_dir", str(out),
            "--resolution", "32",
            "--train_batch_size", "4",
            "--max_train_steps", "3",
            "--learning_rate", "1e-3",
            "--train_decoder_only",
            "--report_to", "none",
            "--no_progress",
        ]
    )  # fmt: skip
    before = load_file(str(start / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == 1.0  # fine-tuning keeps the factor


@pytest.mark.parametrize("mode", ["plain", "H", "B"])
def test_logged_loss_is_the_kl_mode_formula(tmp_path, tiny_config, photo_dir, mode):
    kl_weight, beta, gamma, c_max, c_stop = 1e-3, 3.0, 7.0, 50.0, 4
    out = run(
        tmp_path / mode,
        tiny_config,
        "--max_train_steps", "3",
        "--kl_mode", mode,
        "--kl_weight", str(kl_weight),
        "--kl_beta", str(beta),
        "--kl_gamma", str(gamma),
        "--capacity_max", str(c_max),
        "--capacity_stop_steps", str(c_stop),
        "--disc_weight", "0",
        data=photo_dir,
    )  # fmt: skip
    for row in read_jsonl(out / "train_log.jsonl"):
        step = row["step"] - 1  # the step index the loss was computed at
        rec = row["rec_per_pixel"] * 3 * 32 * 32
        kl = row["kl"]
        term = {
            "plain": kl_weight * kl,
            "H": beta * kl_weight * kl,
            "B": gamma * kl_weight * abs(kl - min(c_max, c_max / c_stop * step)),
        }[mode]
        assert row["loss"] == pytest.approx(rec + term, rel=1e-5)


def test_one_channel_digits_config_trains(tmp_path, photo_dir):
    out = training.main(
        ["--model_config", "digits", "--train_data_dir", str(photo_dir), "--output_dir", str(tmp_path / "digits"),
         "--resolution", "28", "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none",
         "--no_progress", "--no-recompute_scaling_factor"]
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.in_channels == 1
    assert Image.open(out / "validation" / "step_000002.png").size[1] == 2 * 28 * 4 + 3 * 2  # enlarged 4x


def test_lpips_weights_are_required_and_used(tmp_path, tiny_config, photo_dir, monkeypatch):
    monkeypatch.delenv(losses.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached weights in the default place
    with pytest.raises(FileNotFoundError, match="convert-lpips"):
        run(
            tmp_path / "no_weights",
            tiny_config,
            "--perceptual_weight",
            "1.0",
            "--max_train_steps",
            "1",
            data=photo_dir,
        )
    assert not (tmp_path / "no_weights" / "train_log.jsonl").exists()  # failed before training

    from safetensors.torch import save_file

    torch.manual_seed(0)
    lpips = losses.LPIPS()
    for head in lpips.heads:
        torch.nn.init.uniform_(head.model[1].weight, 0.0, 0.1)
    weights = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(weights))
    out = run(
        tmp_path / "lpips",
        tiny_config,
        "--perceptual_weight", "0.1",
        "--lpips_weights", str(weights),
        "--max_train_steps", "2",
        data=photo_dir,
    )  # fmt: skip
    log = read_jsonl(out / "train_log.jsonl")
    assert all(row["lpips"] > 0 for row in log)


def test_nonfinite_losses_are_skipped_then_abort(tmp_path, tiny_config, photo_dir, monkeypatch):
    real = losses.reconstruction_loss
    calls = {"n": 0}

    def flaky(inputs, reconstructions, kind="l1"):
        calls["n"] += 1
        value = real(inputs, reconstructions, kind)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(losses, "reconstruction_loss", flaky)
    out = run(tmp_path / "skip", tiny_config, "--max_train_steps", "4", "--disc_weight", "0", data=photo_dir)
    log = read_jsonl(out / "train_log.jsonl")
    assert [row["finite"] for row in log] == [True, False, True, True]
    weights = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    monkeypatch.setattr(losses, "reconstruction_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        run(tmp_path / "abort", tiny_config, "--max_train_steps", "10", "--max_nonfinite_steps", "3", data=photo_dir)


def test_missing_or_empty_data_folder_fails_clearly(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path / "a", tiny_config, data=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="No images found"):
        run(tmp_path / "b", tiny_config, data=empty)


def test_unknown_model_config_and_bad_resolution_fail_clearly(tmp_path, tiny_config, photo_dir):
    with pytest.raises(FileNotFoundError, match="built-in config"):
        run(tmp_path / "a", Path("no_such_config"), data=photo_dir)
    with pytest.raises(ValueError, match="divisible"):
        training.main(
            ["--model_config", str(tiny_config), "--resolution", "31", "--output_dir", str(tmp_path / "b"),
             "--train_data_dir", str(photo_dir), "--report_to", "none"]
        )  # fmt: skip


@pytest.mark.slow
def test_two_process_accelerate_launch_runs_end_to_end(tmp_path, tiny_config, photo_dir):
    out = tmp_path / "ddp"
    launch, launch_env = cpu_launch(2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **launch_env}
    result = subprocess.run(
        [*launch, str(REPO / "scripts" / "finetune_vae.py"),
         "--model_config", str(tiny_config), "--train_data_dir", str(photo_dir), "--output_dir", str(out),
         "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
         "--disc_start", "1", "--use_ema", "--report_to", "none", "--no_progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 processes" in result.stdout  # really two
    assert [row["step"] for row in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "model_1.safetensors").is_file()  # the discriminator
    AutoencoderKL.from_pretrained(out)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_config, photo_dir):
    import signal
    import time

    out = tmp_path / "interrupted"
    argv = [sys.executable, str(REPO / "scripts" / "finetune_vae.py"), "--model_config", str(tiny_config),
            "--train_data_dir", str(photo_dir), "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "4", "--max_train_steps", "100000", "--checkpointing_steps", "100000",
            "--report_to", "none", "--no_progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(read_jsonl(log)) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    steps = [row["step"] for row in read_jsonl(log)]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{steps[-1]}"], output[-2000:]
    assert "Resume with --resume_from_checkpoint latest" in output

    resumed = run(out, tiny_config, "--max_train_steps", str(steps[-1] + 2), "--resume_from_checkpoint", "latest",
                  data=photo_dir)  # fmt: skip
    assert [row["step"] for row in read_jsonl(resumed / "train_log.jsonl")] == list(range(1, steps[-1] + 3))


def test_cli_train_subcommand_runs_the_trainer(tmp_path, tiny_config, photo_dir):
    from diffusers_vae_ext.cli import main as cli_main

    out = tmp_path / "cli"
    argv = ["train", "--model_config", str(tiny_config), "--train_data_dir", str(photo_dir), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none",
            "--no_progress"]  # fmt: skip
    assert cli_main(argv) == 0
    assert [row["step"] for row in read_jsonl(out / "train_log.jsonl")] == [1, 2]
    AutoencoderKL.from_pretrained(out)


def test_datasets_dataset_trains_lazily(tmp_path, tiny_config):
    datasets = pytest.importorskip("datasets")
    from diffusers_vae_ext.data import sample_photos

    photos = list(sample_photos().values())
    features = datasets.Features({"picture": datasets.Image()})
    datasets.Dataset.from_dict({"picture": photos}, features=features).save_to_disk(str(tmp_path / "ds"))
    args = training.parse_args(["--dataset_name", str(tmp_path / "ds"), "--image_column", "picture"])
    train, validation, _ = training.training_images(args)
    assert isinstance(train, training.DatasetImages) and (len(train), len(validation)) == (5, 1)
    assert train[0].mode == "RGB" and train[0].size == photos[1].size  # row 0 is held out

    out = run(tmp_path / "run", tiny_config, "--dataset_name", str(tmp_path / "ds"), "--image_column", "picture",
              "--max_train_steps", "2", "--dataloader_num_workers", "1")  # fmt: skip
    assert [row["step"] for row in read_jsonl(out / "train_log.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match="not a column"):
        run(tmp_path / "bad", tiny_config, "--dataset_name", str(tmp_path / "ds"), "--max_train_steps", "1")
