"""The trainer on every kind of autoencoder class: KL image classes with their posterior, deterministic classes
without KL, video classes on real mp4 clips, decoder-only freezing, TAESD-style distillation, and the bad inputs
that must stop a run before it trains. Tiny configs (tests/autoencoder_configs.py), 32 px, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from autoencoder_configs import TINY_CONFIGS, build_tiny
from conftest import read_jsonl
from safetensors.torch import load_file

from diffusers_vae_ext import training

av = pytest.importorskip("av", reason="video training needs PyAV (the [video] extra)")
from diffusers_vae_ext.video import write_pan_zoom_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def video_dir(workdir) -> Path:
    """Five real clips: a camera panning and zooming over five photos; one is held out for validation."""
    folder = workdir / "videos"
    for photo in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        write_pan_zoom_video(folder / f"{photo}.mp4", photo, num_frames=12, size=(64, 64))
    return folder


def config_file(workdir: Path, name: str, **overrides) -> Path:
    path = workdir / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"_class_name": name, **TINY_CONFIGS[name], **overrides}))
    return path


def pretrained_folder(workdir: Path, name: str) -> Path:
    folder = workdir / "pretrained" / name
    if not (folder / "config.json").is_file():
        build_tiny(name).save_pretrained(folder, safe_serialization=True)
    return folder


def run(output_dir: Path, *args: str) -> Path:
    argv = [
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "4",
        "--report_to", "none",
        "--no_progress",
        "--lr_warmup_steps", "0",
        "--mixed_precision", "no",
        "--no-recompute_scaling_factor",
    ]  # fmt: skip
    return training.main(argv + list(args))


def assert_loss_falls(out: Path) -> None:
    """Training loss falls: the mean reconstruction error of the last 4 steps is below 0.9 x that of the first 4."""
    log = read_jsonl(out / "train_log.jsonl")
    first, last = [row["rec_per_pixel"] for row in log[:4]], [row["rec_per_pixel"] for row in log[-4:]]
    assert sum(last) < 0.9 * sum(first), (first, last)


def assert_learned(out: Path, min_gain_db: float = 0.5) -> list[dict]:
    """Training loss falls and held-out PSNR rises by at least `min_gain_db` from before training to the end."""
    assert_loss_falls(out)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["psnr"] > metrics[0]["psnr"] + min_gain_db, [m["psnr"] for m in metrics]
    return metrics


def assert_loads_in_diffusers_class(out: Path, name: str, trained: dict[str, torch.Tensor]) -> None:
    model, info = getattr(diffusers, name).from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert info["mismatched_keys"] == [], info
    state = model.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ image classes


# Qwen-Image and Wan share one architecture (Qwen-Image's is Wan 2.1's, on one-frame clips). Their tiny random init
# passes almost no signal from input to output: the latent mean varies 0.02 across clips (0.16-0.21 for the other
# video classes' tiny configs) and the decoder's output moves 0.07 for a new latent (0.38-0.48), with 2-channel
# bottlenecks after every upsampling (base_dim 4, halved there). The decoder learns the data's mean first and the
# encoder then learns to ignore its input (KL stays ~1.5 nats); the same happens with the posterior mode instead of
# a draw, without the output clamp, at lr 5e-4 to 1e-2, base_dim 8 or 16, dim_mult (1, 2, 4, 4), Wan 2.2's residual
# layout, batch 4, and up to 96 steps. So their loss falls (the data's mean) but held-out PSNR does not rise in a
# short run; `learns` says which classes must raise it. See docs/training.md ("Which classes learn in a short run").
@pytest.mark.parametrize(
    "name, kl, learns",
    [("AutoencoderKLFlux2", True, True), ("AutoencoderDC", False, True), ("AutoencoderTiny", False, True),
     ("AutoencoderKLQwenImage", True, False)],  # Qwen-Image's 5-D VAE on images (one-frame clips)
)  # fmt: skip
def test_image_class_trains_from_its_config_and_loads_in_its_diffusers_class(workdir, photo_dir, name, kl, learns):
    steps = 16
    out = run(
        workdir / f"run-{name}",
        "--model_config", str(config_file(workdir, name)),
        "--train_data_dir", str(photo_dir),
        "--max_train_steps", str(steps),
        "--learning_rate", "2e-3",
        "--validation_steps", str(steps),
    )  # fmt: skip
    if learns:
        assert_learned(out)
    else:
        assert_loss_falls(out)
    log = read_jsonl(out / "train_log.jsonl")
    assert ("kl" in log[-1]) is kl  # KL only where the class has a posterior
    assert_loads_in_diffusers_class(out, name, load_file(out / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("name", ["AutoencoderDC", "AutoencoderKLWan"])
def test_decoder_only_keeps_what_produces_the_latent_bit_identical(workdir, photo_dir, video_dir, name):
    start = pretrained_folder(workdir, name)
    before = load_file(start / "diffusion_pytorch_model.safetensors")
    data = video_dir if name == "AutoencoderKLWan" else photo_dir
    out = run(
        workdir / f"decoder-only-{name}",
        "--pretrained_model_name_or_path", str(start),
        "--train_data_dir", str(data),
        "--train_decoder_only",
        "--max_train_steps", "3",
        "--learning_rate", "1e-3",
        "--validation_steps", "100",
    )  # fmt: skip
    after = load_file(out / "diffusion_pytorch_model.safetensors")
    assert after.keys() == before.keys()
    frozen = [key for key in before if key.split(".")[0] in ("encoder", "quant_conv")]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen)
    decoder = [key for key in before if key.startswith("decoder.")]
    assert any(not torch.equal(before[key], after[key]) for key in decoder)


# ------------------------------------------------------------------------------------------ distillation


def test_distilled_student_decodes_the_teachers_latents_like_the_teacher(workdir, photo_dir):
    teacher = pretrained_folder(workdir, "AutoencoderKL")  # factor 4, 4 latent channels, shift convention
    out = run(
        workdir / "distilled",
        "--model_config", str(config_file(workdir, "AutoencoderTiny", scaling_factor=1.0)),
        "--teacher_vae", str(teacher),
        "--distill_target", "teacher",
        "--train_data_dir", str(photo_dir),
        "--max_train_steps", "30",
        "--learning_rate", "3e-3",
        "--validation_steps", "30",
    )  # fmt: skip
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["psnr_teacher_decode"] >= metrics[0]["psnr_teacher_decode"] + 3.0, metrics
    log = read_jsonl(out / "train_log.jsonl")
    assert sum(r["latent_mse"] for r in log[-3:]) < 0.5 * sum(r["latent_mse"] for r in log[:3])
    assert_loads_in_diffusers_class(out, "AutoencoderTiny", load_file(out / "diffusion_pytorch_model.safetensors"))

    # In the teacher's pipeline convention: the student's encoder gives what the teacher's pipelines feed the
    # diffusion model (teacher.scale), so the student decodes pipeline latents as AutoencoderTiny does in a pipeline.
    from diffusers_vae_ext.autoencoders import load_autoencoder

    student, reference = load_autoencoder(out), load_autoencoder(teacher)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        target = reference.scale(reference.latents_from_moments(reference.encode_moments(pixels), sample=False))
        got = student.encode_moments(pixels)
        untrained = load_autoencoder(pretrained_folder(workdir, "AutoencoderTiny")).encode_moments(pixels)
    assert (got - target).square().mean() < 0.5 * (untrained - target).square().mean()


# ------------------------------------------------------------------------------------------ video classes


@pytest.mark.parametrize(
    "name, frames, batch, lr, learns",
    # Every video class trains end to end, its loss falls and its folder loads in its class; all but Wan raise
    # held-out PSNR in 40 steps. Wan's tiny init cannot pass a signal through (see the image test above: it learns
    # the clips' mean colour, the same output for every clip). LTX-Video's decoder is 16-64 channels wide (1.1M
    # parameters, 17x CogVideoX's): at lr 2e-3 it stays at the mean (9.62 -> 9.62 dB; 9.03 after 48 steps), at
    # 5e-4 it learns (+0.9 dB; 3e-4: +0.6). It needs batch 4 (all four training clips each step): at batch 2 its
    # first and last steps see different clips and the held-out gain does not show (5e-4: -0.1 dB). HunyuanVideo
    # likewise: batch 2 gave +0.47 dB at 24 steps, -0.2 at 40, +0.13 at 60; batch 4 +0.87 at 40 (lr 1e-3: +0.73).
    # CogVideoX at 40 steps, batch 2: lr 1e-3 +0.22 dB, 2e-3 +0.34, 3e-3 +0.48 (one held-out clip: a noisy gain).
    [("AutoencoderKLCogVideoX", 9, 2, "3e-3", True), ("AutoencoderKLHunyuanVideo", 5, 4, "2e-3", True),
     ("AutoencoderKLWan", 5, 2, "2e-3", False), ("AutoencoderKLLTXVideo", 9, 4, "5e-4", True)],
)  # fmt: skip
def test_video_class_trains_on_mp4_clips(workdir, video_dir, name, frames, batch, lr, learns):
    out = run(
        workdir / f"video-{name}",
        "--model_config", str(config_file(workdir, name)),
        "--train_data_dir", str(video_dir),
        "--resize_to", "64",
        "--num_frames", str(frames),
        "--train_batch_size", str(batch),
        "--max_train_steps", "40",
        "--learning_rate", lr,
        "--validation_steps", "40",
    )  # fmt: skip
    assert_loss_falls(out)
    metrics = read_jsonl(out / "metrics.jsonl")
    if learns:
        assert metrics[-1]["psnr"] > metrics[0]["psnr"] + 0.3, [m["psnr"] for m in metrics]
    assert len(metrics[-1]["psnr_per_clip"]) == 1  # one held-out video, one clip
    assert metrics[-1]["psnr"] == pytest.approx(metrics[-1]["psnr_per_clip"][0], abs=1e-3)
    with av.open(str(out / "validation" / "step_000040.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.height, stream.width) == (64, 32)  # original over reconstruction
        assert sum(1 for _ in container.decode(stream)) == frames
    assert_loads_in_diffusers_class(out, name, load_file(out / "diffusion_pytorch_model.safetensors"))


def test_video_resume_is_exact(workdir, video_dir):
    # The clips are streamed from the video folder's units (as the cache reads them): 4 training videos x 2 clips,
    # batch 2, so the stop after step 2 is mid-epoch, in the middle of the reader's shuffle buffer.
    common = (
        "--model_config", str(config_file(workdir, "AutoencoderKLWan")),
        "--train_data_dir", str(video_dir),
        "--resize_to", "48",
        "--num_frames", "5",
        "--clips_per_video", "2",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--validation_steps", "100",
        "--checkpointing_steps", "2",
        "--random_flip",
        "--disc_start", "1",
        "--disc_3d",
    )  # fmt: skip
    whole = run(workdir / "wan-whole", *common, "--max_train_steps", "4")
    part = run(workdir / "wan-part", *common, "--max_train_steps", "2")
    state = json.loads((part / "checkpoint-2" / "data_state.json").read_text())
    assert state["positions"] == {"0": [0, 3]}  # epoch 0, 4 of its 8 clips served: the stream's position
    resumed = run(part, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    expected, got = read_jsonl(whole / "train_log.jsonl"), read_jsonl(resumed / "train_log.jsonl")
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    assert "d_loss" in expected[-1]
    assert len({row["rec_per_pixel"] for row in expected}) == 4  # distinct batches: a wrong replay would show
    for a, b in zip(expected, got):  # the same kernels in the same process: bit-identical
        for key in ("loss", "rec_per_pixel", "kl", "d_loss"):
            if key in a:
                assert b[key] == a[key], (a["step"], key)
    final_whole = load_file(whole / "diffusion_pytorch_model.safetensors")
    final_resumed = load_file(resumed / "diffusion_pytorch_model.safetensors")
    for key, value in final_whole.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize(
    "name, frames",
    [("AutoencoderKLFlux2", None), ("AutoencoderTiny", None), ("AutoencoderKLCogVideoX", 9),
     ("AutoencoderKLHunyuanVideo", 5), ("AutoencoderKLLTXVideo", 9)],
)  # fmt: skip
def test_gradient_checkpointing_trains_the_same_steps(workdir, photo_dir, video_dir, monkeypatch, name, frames):
    """Every class diffusers checkpoints: the checkpointed run really recomputes (torch's checkpoint is called) and
    gives the same losses and weights as a run without it, since checkpointing does not change the math. Two steps,
    so the second loss and the weights check the checkpointed gradients. AutoencoderTiny: its decoder only (diffusers'
    EncoderTiny skips its [-1, 1] -> [0, 1] input scaling on the checkpointed path: checkpointed, the first loss
    differed, 3531.3 against 3531.0)."""
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    data = ["--train_data_dir", str(photo_dir)]
    if frames:
        data = ["--train_data_dir", str(video_dir), "--resize_to", "48", "--num_frames", str(frames)]
    common = (
        "--model_config", str(config_file(workdir, name)),
        *data,
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--learning_rate", "1e-3",
        "--validation_steps", "100",
    )  # fmt: skip
    plain = run(workdir / f"no-checkpointing-{name}", *common)
    assert not calls
    checkpointed = run(workdir / f"checkpointing-{name}", *common, "--gradient_checkpointing")
    assert calls, "--gradient_checkpointing recomputed nothing"
    expected, got = read_jsonl(plain / "train_log.jsonl"), read_jsonl(checkpointed / "train_log.jsonl")
    for a, b in zip(expected, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    before = load_file(plain / "diffusion_pytorch_model.safetensors")
    after = load_file(checkpointed / "diffusion_pytorch_model.safetensors")
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------ bad input


def refused(tmp_path: Path, match: str, *args: str) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
        run(out, "--max_train_steps", "2", *args)
    assert not (out / "train_log.jsonl").exists()  # stopped before training


def test_a_video_class_given_images_only_is_refused(workdir, photo_dir, tmp_path):
    config = str(config_file(workdir, "AutoencoderKLWan"))
    refused(
        tmp_path, "video autoencoder.*no video files", "--model_config", config, "--train_data_dir", str(photo_dir)
    )


def test_a_clip_length_the_class_cannot_encode_is_refused(workdir, video_dir, tmp_path):
    config = str(config_file(workdir, "AutoencoderKLCogVideoX"))
    args = ("--model_config", config, "--train_data_dir", str(video_dir), "--num_frames", "5")
    refused(tmp_path, r"--num_frames 5 .*8k \+ 1.*--num_frames 1 or 9", *args)


def test_an_unknown_class_is_refused(workdir, tmp_path):
    path = workdir / "configs" / "unknown.json"
    path.write_text(json.dumps({"_class_name": "AutoencoderOops", "latent_channels": 4}))
    refused(tmp_path, "AutoencoderOops.*not supported.*AutoencoderKLWan", "--model_config", str(path))


def test_a_teacher_whose_latents_do_not_fit_the_student_is_refused(workdir, photo_dir, tmp_path):
    teacher = pretrained_folder(workdir, "AutoencoderDC")  # factor 2: the tiny student has factor 4
    config = str(config_file(workdir, "AutoencoderTiny"))
    args = ("--model_config", config, "--teacher_vae", str(teacher), "--train_data_dir", str(photo_dir))
    refused(tmp_path, "different latent shapes.*spatial factor: teacher 2, student 4", *args)


@pytest.mark.parametrize("name", ["AutoencoderDC", "AutoencoderKLQwenImage", "AutoencoderKLWan"])
def test_gradient_checkpointing_where_diffusers_has_none_is_refused(workdir, photo_dir, video_dir, tmp_path, name):
    data = video_dir if name == "AutoencoderKLWan" else photo_dir
    config = str(config_file(workdir, name))
    args = ("--model_config", config, "--train_data_dir", str(data), "--gradient_checkpointing")
    refused(tmp_path, f"does not implement gradient checkpointing for {name}", *args)
