"""Half-precision check and fp16-safe fine-tuning: a VAE whose float32 output is normal but whose float16 decode
overflows is found, located, and fixed by a short `--fp16_safe` run that keeps the teacher's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import photo_batch

from diffusers_vae_ext import AutoencoderKL, training
from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.data import write_sample_photos
from diffusers_vae_ext.evaluation.fp16 import ActivationMonitor, block_name, check_half_precision
from diffusers_vae_ext.fp16_safe import activation_penalty, rescale_activations
from diffusers_vae_ext.metrics import psnr

TINY = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=1.0,
)
CONV1 = "decoder.up_blocks.1.resnets.0.conv1"


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return vae


@torch.no_grad()
def make_overflowing(vae: AutoencoderKL, factor: float = 1e5) -> AutoencoderKL:
    """Float32 output unchanged, float16 overflows in two places: a ResNet conv1 scaled up (its GroupNorm removes
    the scale) and post_quant_conv scaled up with decoder.conv_in's weight scaled down by the same factor."""
    conv1 = vae.get_submodule(CONV1)
    conv1.weight.mul_(factor)
    conv1.bias.mul_(factor)
    vae.post_quant_conv.weight.mul_(factor)
    vae.post_quant_conv.bias.mul_(factor)
    vae.decoder.conv_in.weight.div_(factor)
    return vae


@torch.no_grad()
def reconstruct(vae, pixels, latents=None):
    latents = vae.encode(pixels).latent_dist.mode() if latents is None else latents
    return vae.decode(latents).sample


def half_copy(vae: AutoencoderKL) -> AutoencoderKL:
    half = torch.nn.Module.to(copy.deepcopy(vae), dtype=torch.float16)
    return half.to(memory_format=torch.channels_last)  # fast float16 convolutions on CPU


def test_block_names():
    assert block_name("decoder.up_blocks.2.resnets.0.conv1") == "decoder.up_blocks.2"
    assert block_name("decoder.mid_block.attentions.0.to_q") == "decoder.mid_block"
    assert block_name("decoder.conv_in") == "decoder.conv_in"
    assert block_name("post_quant_conv") == "post_quant_conv"
    assert block_name("decoder.layers.3.conv.0") == "decoder.layers.3"


def test_check_finds_and_locates_a_float16_overflow_that_float32_hides():
    pixels = photo_batch(32, ("astronaut", "coffee"))
    vae = tiny_vae()
    reference = reconstruct(vae, pixels)
    report = check_half_precision(as_autoencoder(vae), pixels)
    assert [r.verdict for r in report] == ["safe", "safe"]
    assert report[0].decode_psnr > 40 and report[1].decode_psnr > 30

    make_overflowing(vae)
    # float32 cannot tell: the output is the same to float rounding.
    assert psnr(reference, reconstruct(vae, pixels)).min() > 80
    float16, bfloat16 = check_half_precision(as_autoencoder(vae), pixels)
    # decode() of the float32 latents overflows first at post_quant_conv.
    assert float16.verdict == "overflows in float16 at post_quant_conv"
    assert not float16.safe and float16.overflow_block == "post_quant_conv"
    over_range = {b.block for b in float16.blocks if b.fraction_of_range >= 1}
    assert over_range == {"post_quant_conv", "decoder.up_blocks.1"}
    assert all(b.nonfinite for b in float16.blocks if b.block in over_range)
    assert not any(b.nonfinite for b in float16.blocks if b.block.startswith("encoder."))
    # bfloat16 has float32's range: no overflow, only its coarser precision.
    assert bfloat16.verdict == "safe" and bfloat16.decode_psnr > 30


def test_rescaling_is_exact_in_float32_and_removes_the_overflow():
    pixels = photo_batch(32, ("astronaut", "coffee"))
    vae = make_overflowing(tiny_vae())
    reference_moments = vae.encode(pixels).latent_dist.parameters.detach()
    reference = reconstruct(vae, pixels)
    changes = rescale_activations(vae, pixels, max_activation=4096)
    joined = "\n".join(changes)
    assert "post_quant_conv" in joined and CONV1 in joined, changes
    torch.testing.assert_close(vae.encode(pixels).latent_dist.parameters, reference_moments, rtol=0, atol=1e-5)
    assert psnr(reference, reconstruct(vae, pixels)).min() > 80
    with ActivationMonitor(vae) as monitor, torch.no_grad():
        reconstruct(vae, pixels)
    assert max(monitor.max_abs.values()) <= 4096
    assert check_half_precision(as_autoencoder(vae), pixels, ("float16",))[0].safe
    # Nothing to do on a VAE that is already safe.
    assert rescale_activations(tiny_vae(), pixels) == []


def test_activation_penalty_is_zero_below_the_limit_and_pulls_offenders_down():
    small = torch.full((2, 3), 10.0, requires_grad=True)
    assert activation_penalty([("a", small)], 100.0).item() == 0.0
    big = torch.tensor([50.0, 300.0], requires_grad=True)
    penalty = activation_penalty([("a", big)], 100.0)
    assert penalty.item() == pytest.approx(((300 - 100) / 100) ** 2 / 2)
    penalty.backward()
    assert big.grad[0] == 0 and big.grad[1] > 0  # gradient descent shrinks only the offender


def test_fp16_safe_finetuning_fixes_an_overflowing_vae(tmp_path):
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    teacher = make_overflowing(tiny_vae())
    start = tmp_path / "start"
    teacher.save_pretrained(start)
    out = tmp_path / "fp16_safe"
    training.main(
        ["--pretrained_model_name_or_path", str(start), "--train_data_dir", str(photos), "--output_dir", str(out),
         "--fp16_safe", "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "3",
         "--learning_rate", "1e-5", "--lr_warmup_steps", "0", "--validation_steps", "100",
         "--checkpointing_steps", "100", "--report_to", "none", "--no_progress"]
    )  # fmt: skip
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(row["finite"] for row in log)
    assert all(row["max_activation"] <= 4096 for row in log)
    assert all(row["teacher_rec_per_pixel"] < 1e-2 for row in log)

    student = AutoencoderKL.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["force_upcast"] is False
    assert json.loads((out / "fp16_check.json").read_text())[0]["verdict"] == "safe"

    pixels = photo_batch(64, ("astronaut", "chelsea", "rocket"))  # real photos, larger than the training crops
    with torch.no_grad():
        teacher_latents = teacher.encode(pixels).latent_dist.mode()
        target = teacher.decode(teacher_latents).sample
        assert not torch.isfinite(half_copy(teacher).decode(teacher_latents.half()).sample).all()
        half = half_copy(student)
        # The teacher's latents decode in float16 (the latent space is untouched) ...
        decoded = half.decode(teacher_latents.half()).sample.float()
        # ... and so does the whole float16 round trip.
        roundtrip = half.decode(half.encode(pixels.half()).latent_dist.mode()).sample.float()
    for output in (decoded, roundtrip):
        assert torch.isfinite(output).all()
        assert psnr(target, output).min() >= 30
    assert check_half_precision(as_autoencoder(student), pixels, ("float16",))[0].verdict == "safe"
