"""The bfloat16 path: a bf16 model on bf16 input runs our fast path, matches fp32 on real photos, and keeps the
numerically sensitive parts (GroupNorm statistics, attention softmax, the posterior) in float32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import diffusers_twin, make_vae, photo_batch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from test_speed_path import diffusers_forwards_forbidden

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.blocks import _attention, _norm_act
from diffusers_vae_ext.metrics import psnr
from diffusers_vae_ext.posterior import LatentPosterior

BF16 = torch.bfloat16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return photo_batch(64, ("astronaut", "chelsea", "coffee"))


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    make_vae(seed=11).save_pretrained(folder)
    return folder


def test_bf16_model_from_pretrained_runs_the_fast_path_and_matches_fp32(saved_vae, photos):
    fp32 = AutoencoderKL.from_pretrained(saved_vae).eval()
    bf16 = AutoencoderKL.from_pretrained(saved_vae, torch_dtype=BF16).eval()
    assert bf16.dtype == BF16
    with torch.no_grad():
        reference = fp32(photos).sample
        with diffusers_forwards_forbidden():
            posterior = bf16.encode(photos.to(BF16)).latent_dist
            decoded = bf16.decode(posterior.mode()).sample
    # Pipelines get the model's dtype back.
    assert posterior.mean.dtype == posterior.parameters.dtype == posterior.std.dtype == BF16
    assert decoded.dtype == BF16 and decoded.is_contiguous()
    assert reference.std() > 0.1
    assert psnr(reference, decoded.float()).min() >= 40


def test_bf16_is_about_as_close_to_fp32_as_diffusers_bf16(photos):
    vae = make_vae(seed=12)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        reference = twin(photos).sample
        vae.to(BF16)
        twin.to(BF16)
        ours = vae(photos.to(BF16)).sample.float()
        theirs = twin(photos.to(BF16)).sample.float()
    # Both round every activation to bf16, in different orders: equal up to a fraction of a dB.
    assert psnr(reference, ours).mean() >= psnr(reference, theirs).mean() - 1.0


def test_posterior_of_a_bf16_model_is_computed_in_float32(photos):
    # Log-variances near -15.4, as trained VAEs have: bf16's grid there is 0.0625 wide, so a log-variance rounded
    # to bf16 is off by up to 0.03 (1.5% in std). The bias is on that grid and the weights are small, so the
    # rounding of the output is what separates a float32 posterior from a bf16 one.
    vae = make_vae(seed=13)
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] *= 0.1
        vae.quant_conv.bias[latent_channels:] = -15.375
    twin = diffusers_twin(vae)
    with torch.no_grad():
        exact = twin.encode(photos).latent_dist
        vae.to(BF16)
        twin.to(BF16)
        ours = vae.encode(photos.to(BF16)).latent_dist
        theirs = twin.encode(photos.to(BF16)).latent_dist
    assert isinstance(ours, LatentPosterior)
    assert exact.logvar.mean() < -15

    def std_error(posterior) -> float:
        return ((posterior.std.float() - exact.std) / exact.std).abs().mean().item()

    assert std_error(ours) <= 0.25 * std_error(theirs)
    # Draws: diffusers' noise (same generator, same numbers), mean + std * eps summed in float32, rounded once.
    generator = torch.Generator().manual_seed(0)
    draw = ours.sample(generator=torch.Generator().manual_seed(0))
    noise = torch.randn(ours.mean.shape, generator=generator, dtype=BF16).float()
    expected = ours._float32.mean + ours._float32.std * noise
    assert draw.dtype == BF16
    assert torch.equal(draw, expected.to(BF16))
    # KL summed in float32: close to the fp32 model's, and the same formula as diffusers'.
    kl = ours.kl()
    assert kl.dtype == BF16
    torch.testing.assert_close(kl.float(), exact.kl(), rtol=0.02, atol=0)
    assert torch.isfinite(ours.nll(draw)).all()


def test_float32_posterior_is_diffusers_class_bit_for_bit(photos):
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = LatentPosterior(moments), DiagonalGaussianDistribution(moments)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))
    draws = [p.sample(generator=torch.Generator().manual_seed(1)) for p in (ours, theirs)]
    assert torch.equal(*draws)
    assert torch.equal(ours.kl(), theirs.kl())


def test_groupnorm_statistics_stay_float32_in_bf16():
    # Activations far from zero relative to their spread: bf16 statistics (mean of squares minus squared mean)
    # would lose the variance entirely.
    vae = make_vae(seed=14)
    resnet = vae.decoder.up_blocks[0].resnets[0]
    x = 40.0 + torch.randn(1, resnet.norm1.num_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x.to(BF16).contiguous(memory_format=torch.channels_last)
    reference = F.silu(F.group_norm(x.float(), resnet.norm1.num_groups, resnet.norm1.weight, resnet.norm1.bias))
    resnet.to(BF16)
    with torch.no_grad():
        out = _norm_act(resnet.norm1, resnet.nonlinearity, x.clone())
    assert out.dtype == BF16
    assert (out.float() - reference).abs().max() <= 0.02  # a few bf16 rounding steps of values of order 1


def test_attention_logits_and_softmax_stay_float32_in_bf16():
    # Identity projections and no norm isolate the attention itself. Tokens share a large component, so every
    # logit is about 400 and they differ by about 10: rounded to bf16 (grid 2 there) the softmax would change a lot.
    vae = make_vae(seed=15)
    attn = vae.decoder.mid_block.attentions[0]
    channels = attn.to_q.in_features
    attn.group_norm = None
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            linear.weight.copy_(torch.eye(channels))
            linear.bias.zero_()
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, channels, 1, 1, generator=generator)
    shared *= (400 * math.sqrt(channels)) ** 0.5 / shared.norm()
    x = shared + torch.randn(1, channels, 8, 8, generator=generator)
    x = x.to(BF16).contiguous(memory_format=torch.channels_last)
    tokens = x.float().flatten(2).transpose(1, 2)  # exactly the bf16 values, in float32
    logits = tokens @ tokens.transpose(1, 2) / math.sqrt(channels)
    assert logits.min() > 300 and logits.std() > 5
    reference = (torch.softmax(logits, -1) @ tokens).transpose(1, 2).reshape(x.shape) + x.float()
    rounded = (torch.softmax(logits.to(BF16).float(), -1) @ tokens).transpose(1, 2).reshape(x.shape) + x.float()
    attn.to(BF16)
    with torch.no_grad():
        out = _attention(attn, x)
    assert out.dtype == BF16
    ours_error = (out.float() - reference).abs().max()
    rounded_error = (rounded - reference).abs().max()
    assert ours_error < 0.3 * rounded_error


def test_tiled_bf16_equals_untiled_bf16(photos):
    vae = make_vae(seed=16).to(BF16)
    images = photos[:1].to(BF16)
    with torch.no_grad():
        untiled = vae(images).sample
        vae.enable_tiling(tile_sample_size=32)
        tiled = vae(images).sample
    assert tiled.dtype == BF16
    assert psnr(untiled.float(), tiled.float()).item() >= 40


def test_fp32_model_under_bf16_autocast_hands_out_bf16_like_diffusers(photos):
    vae = make_vae(seed=17)
    twin = diffusers_twin(vae)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        ours = vae.encode(photos).latent_dist
        theirs = twin.encode(photos).latent_dist
        decoded = vae.decode(ours.mean).sample
    assert ours.mean.dtype == theirs.mean.dtype == BF16
    assert decoded.dtype == BF16
    assert (ours.mean.float() - theirs.mean.float()).abs().max() <= 0.05


def test_input_and_weight_dtypes_must_agree():
    vae = make_vae(seed=18).to(BF16)
    with pytest.raises(ValueError, match=r"float32 input but the VAE's weights are bfloat16: pass x.to\(vae.dtype\)"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="decode"):
        vae.decode(torch.zeros(1, 4, 8, 8))
