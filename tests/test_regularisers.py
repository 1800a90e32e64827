"""Regularisers for diffusability: constructed cases whose right answers are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from autoencoder_configs import TINY_CONFIGS, build_tiny
from torch import nn

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.losses import adaptive_weight
from diffusers_vae_ext.regularisers import (
    EQ_VAE_SCALES,
    REGULARISER_DEFAULTS,
    EquivarianceTransform,
    VisionFoundationAlignment,
    augment_latents,
    encoder_last_layer,
    equivariance_error,
    load_vision_model,
    resize_spatial,
    sample_equivariance_transform,
    sample_scale_factor,
    scale_equivariance_pair,
    vf_adaptive_weight,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_image(height: int, width: int, channels: int = 3) -> torch.Tensor:
    """a_c cos(2 pi u) cos(2 pi v) at the pixel centres of a height x width grid (flat at the borders, where a
    resize filter is renormalised)."""
    u = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    v = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    planes = [
        (1 - 0.2 * c) * torch.cos(2 * math.pi * u)[:, None] * torch.cos(2 * math.pi * v)[None, :]
        for c in range(channels)
    ]
    return torch.stack(planes)[None]


# ---------------------------------------------------------------------------------------------- EQ-VAE transforms


def test_four_quarter_turns_are_identity_and_one_turn_is_rot90():
    z = torch.randn(2, 4, 6, 8)
    turn = EquivarianceTransform(quarter_turns=1)
    once = turn.apply_latent(z)
    assert once.shape == (2, 4, 8, 6)
    assert torch.equal(once, torch.rot90(z, 1, dims=(-2, -1)))
    four = z
    for _ in range(4):
        four = turn.apply_latent(four)
    assert torch.equal(four, z)
    assert not torch.equal(turn.apply_latent(turn.apply_latent(z)), z)


def test_rescale_by_one_is_identity_for_images_latents_and_videos():
    identity = EquivarianceTransform((1.0, 1.0))
    z, x, clip = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 64, 64), torch.randn(1, 3, 5, 32, 48)
    assert torch.equal(identity.apply_latent(z), z)
    assert torch.equal(identity.apply_image(x, 8), x)
    assert torch.equal(identity.apply_image(clip, 8), clip)


def test_image_target_size_matches_the_decoded_size_of_the_transformed_latent():
    tau = EquivarianceTransform((0.75, 0.5), quarter_turns=1)
    z, x = torch.randn(1, 4, 9, 12), torch.randn(1, 3, 72, 96)
    assert tau.apply_latent(z).shape[-2:] == (6, 6)  # floor(9 * 0.75) = 6, 12 * 0.5 = 6, then rotated
    assert tau.apply_image(x, 8).shape[-2:] == (48, 48)
    wide = EquivarianceTransform((0.5, 0.75), quarter_turns=1)
    assert wide.apply_latent(z).shape[-2:] == (9, 4) and wide.apply_image(x, 8).shape[-2:] == (72, 32)
    with pytest.raises(ValueError, match="multiple of the autoencoder's spatial factor 8"):
        tau.apply_image(torch.randn(1, 3, 70, 96), 8)


def test_video_transform_acts_per_frame():
    tau = EquivarianceTransform((0.5, 0.5), quarter_turns=3)
    clip = torch.randn(2, 3, 4, 16, 24)
    out = tau.apply_image(clip, 4)
    assert out.shape == (2, 3, 4, 12, 8)
    for t in range(4):
        assert torch.allclose(out[:, :, t], tau.apply_image(clip[:, :, t], 4), atol=1e-6)


def test_half_precision_is_kept():
    tau = EquivarianceTransform((0.5, 0.75), quarter_turns=2)
    z = torch.randn(1, 4, 8, 8)
    out = tau.apply_latent(z.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), tau.apply_latent(z), atol=0.05)


def test_sampling_is_deterministic_and_follows_the_paper_ranges():
    draws = [sample_equivariance_transform(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    generator_a, generator_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sequence_a = [sample_equivariance_transform(generator_a, anisotropic=True) for _ in range(400)]
    sequence_b = [sample_equivariance_transform(generator_b, anisotropic=True) for _ in range(400)]
    assert sequence_a == sequence_b
    plain = sum(t is None for t in sequence_a)
    low_res = [t for t in sequence_a if t is not None and t.input_only]
    regularised = [t for t in sequence_a if t is not None and not t.input_only]
    # p_prior 0.5: half plain-ish steps, a quarter of those at low resolution (binomial, loose bounds).
    assert 150 < plain + len(low_res) < 250
    assert 15 < len(low_res) < 85
    assert {t.quarter_turns for t in regularised} == {1, 2, 3}
    assert all(t.scale[0] in EQ_VAE_SCALES and t.scale[1] in EQ_VAE_SCALES for t in regularised)
    assert any(t.scale[0] != t.scale[1] for t in regularised)
    assert all(t.quarter_turns == 0 and t.scale[0] == t.scale[1] for t in low_res)
    assert min(EQ_VAE_SCALES) == 0.25 and max(EQ_VAE_SCALES) == 31 / 32


def test_p_prior_means_probability_of_a_plain_step():
    generator = torch.Generator().manual_seed(1)
    assert all(sample_equivariance_transform(generator, p_prior=1.0, p_prior_low_res=0.0) is None for _ in range(50))
    never = [sample_equivariance_transform(generator, p_prior=0.0, rotate=False) for _ in range(50)]
    assert all(t is not None and not t.input_only and t.quarter_turns == 0 for t in never)
    with pytest.raises(ValueError, match="probability"):
        sample_equivariance_transform(generator, p_prior=1.5)


def test_resume_from_generator_state_draws_the_same_transforms():
    generator = torch.Generator().manual_seed(7)
    for _ in range(5):
        sample_equivariance_transform(generator)
    state = generator.get_state()
    expected = [sample_equivariance_transform(generator) for _ in range(10)]
    resumed = torch.Generator()
    resumed.set_state(state)
    assert [sample_equivariance_transform(resumed) for _ in range(10)] == expected
    # Every outcome consumes the same five uniforms, so changing p_prior does not shift later draws.
    for p_prior in (0.0, 1.0):
        drawn, reference = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        sample_equivariance_transform(drawn, p_prior=p_prior)
        torch.rand(5, generator=reference, dtype=torch.float64)
        assert torch.equal(drawn.get_state(), reference.get_state())


# --------------------------------------------------------------------------------------------- scale equivariance


def test_downsampling_a_smooth_image_by_two_samples_it_on_the_coarse_grid():
    fine, coarse = smooth_image(64, 64), smooth_image(32, 32)
    down = resize_spatial(fine, (32, 32), antialias=True)
    # The antialias filter's spread (0.75 fine px^2) bounds the error by f'' * 0.75 / 64^2 ~ 0.007 (+ borders).
    assert (down - coarse).abs().max().item() < 0.012
    # A high frequency is what antialiasing removes: a 2-pixel checkerboard averages to ~0, not to samples of it.
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1).double()[None, None]
    assert resize_spatial(checker, (32, 32)).abs().max().item() < 0.3


def test_scale_equivariance_pair_shapes_and_values():
    z, x = smooth_image(8, 12, channels=4).float(), smooth_image(64, 96).float()
    down_z, down_x = scale_equivariance_pair(z, x, 2)
    assert down_z.shape == (1, 4, 4, 6) and down_x.shape == (1, 3, 32, 48)
    assert (down_x - smooth_image(32, 48).float()).abs().max() < 0.012
    down_z, down_x = scale_equivariance_pair(z, x, 4, spatial_factor=8)
    assert down_z.shape == (1, 4, 2, 3) and down_x.shape == (1, 3, 16, 24)
    clip_z, clip_x = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 3, 9, 64, 64)
    down_z, down_x = scale_equivariance_pair(clip_z, clip_x, 2)
    assert down_z.shape == (2, 4, 3, 4, 4) and down_x.shape == (2, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="one integer spatial factor"):
        scale_equivariance_pair(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 60, 64), 2)
    generator = torch.Generator().manual_seed(0)
    factors = [sample_scale_factor(generator) for _ in range(100)]
    assert set(factors) == {2, 4}
    generator.manual_seed(0)
    assert [sample_scale_factor(generator) for _ in range(100)] == factors


def test_scale_equivariance_gradient_reaches_encoder_and_decoder():
    encoder, decoder = nn.Conv2d(3, 4, 4, stride=4), nn.ConvTranspose2d(4, 3, 4, stride=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    down_z, down_x = scale_equivariance_pair(encoder(x), x, 2)
    F.l1_loss(decoder(down_z), down_x).backward()
    assert encoder.weight.grad.abs().sum() > 0 and decoder.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ the metric


class ChannelMixer(nn.Module):
    """A 1x1 linear encoder (spatial factor 1): it commutes with every resize and rotation by construction."""

    def __init__(self, position_dependent: bool = False):
        super().__init__()
        self.mix = nn.Conv2d(3, 4, 1)
        self.position_dependent = position_dependent

    def forward(self, x):
        z = self.mix(x)
        if self.position_dependent:  # a ramp along the width breaks equivariance
            z = z * torch.linspace(0.0, 2.0, x.shape[-1], device=x.device)
        return z


def test_equivariance_error_is_zero_for_an_equivariant_encoder_and_positive_otherwise():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    equivariant = ChannelMixer()
    assert equivariance_error(equivariant, images) < 1e-5
    tau = EquivarianceTransform((0.6, 0.8), quarter_turns=3)  # anisotropic, any turn: still commutes
    assert torch.allclose(equivariant(tau.apply_image(images, 1)), tau.apply_latent(equivariant(images)), atol=1e-5)
    broken = ChannelMixer(position_dependent=True)
    broken.mix.load_state_dict(equivariant.mix.state_dict())
    errors = equivariance_error(broken, images, per_transform=True)
    assert set(errors) == {"scale_0.5", "scale_0.75", "rotate_90", "mean"}
    assert errors["rotate_90"] > 0.3 and errors["mean"] > 0.1
    assert errors["mean"] == pytest.approx(sum(errors[k] for k in ("scale_0.5", "scale_0.75", "rotate_90")) / 3)


def test_equivariance_error_on_real_image_and_video_autoencoders():
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    for name, pixels in (("AutoencoderKL", images), ("AutoencoderKLWan", torch.rand(1, 3, 5, 32, 32) * 2 - 1)):
        encode = build_tiny(name).encode
        errors = equivariance_error(lambda x, encode=encode: encode(x).latent_dist.mode(), pixels, per_transform=True)
        assert all(math.isfinite(e) and e > 0.01 for e in errors.values()), (name, errors)

    def per_frame_encoder(clip):  # (N, 3, T, H, W) -> (N, 4, T, H, W), 1x1 and equivariant
        return torch.einsum("oc,ncthw->nothw", torch.ones(4, 3), clip)

    assert equivariance_error(per_frame_encoder, torch.rand(1, 3, 3, 16, 16)) < 1e-5


# ------------------------------------------------------------------------------------------------ latent noise


def test_augment_latents_is_deterministic_per_sample_and_relative():
    z = torch.randn(64, 4, 8, 8) * 5
    z.requires_grad_(True)
    a = augment_latents(z, 0.5, torch.Generator().manual_seed(0))
    b = augment_latents(z, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    relative_noise = ((a - z) / 5).flatten(1).std(dim=1)
    # sigma_i ~ U[0, 0.5] in units of z's std (5): per-sample noise std within [0, 0.5], spread over the range.
    assert relative_noise.max() < 0.55 and relative_noise.min() < 0.1 and relative_noise.max() > 0.4
    absolute = augment_latents(z, 0.5, torch.Generator().manual_seed(0), relative=False)
    assert ((absolute - z).flatten(1).std(dim=1)).max() < 0.55
    a.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the noise is additive: identity gradient to the encoder
    assert augment_latents(z, 0.0) is z
    # Two ranks, each with the same generator state and its half of the batch, add what one process adds.
    whole = augment_latents(z.detach(), 0.3, torch.Generator().manual_seed(5))
    halves = [
        augment_latents(
            z.detach()[k * 32 : (k + 1) * 32],
            0.3,
            torch.Generator().manual_seed(5),
            global_batch_size=64,
            offset=k * 32,
        )
        for k in range(2)
    ]
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="global batch"):
        augment_latents(z, 0.3, global_batch_size=64, offset=1)
    half = augment_latents(z.detach().to(torch.bfloat16), 0.1, torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ VA-VAE alignment


def test_vf_loss_is_zero_when_projected_latents_equal_the_features():
    torch.manual_seed(0)
    align = VisionFoundationAlignment(8, 8, cos_margin=0.0, distmat_margin=0.0)
    with torch.no_grad():
        align.proj.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
    z = torch.randn(2, 8, 4, 4)
    assert align(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert align(z, 3.0 * z).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    features = torch.randn(2, 8, 4, 4)
    loss, terms = align(z, features, return_terms=True)
    assert terms["vf_cos"] > 0.5 and terms["vf_distmat"] > 0.1
    # Hand computation of both terms at margins 0.
    zn, fn = F.normalize(z.flatten(2), dim=1), F.normalize(features.flatten(2), dim=1)
    cos = (1 - (zn * fn).sum(1)).mean()
    dist = (zn.transpose(1, 2) @ zn - fn.transpose(1, 2) @ fn).abs().mean()
    assert loss.item() == pytest.approx((cos + dist).item(), rel=1e-5)
    # Within the margins (the defaults 0.5 / 0.25) a near match costs nothing, but not without them.
    near = z + 0.05 * torch.randn_like(z)
    margined = VisionFoundationAlignment(8, 8)
    margined.load_state_dict(align.state_dict())
    assert margined(z, near).item() == 0.0
    assert align(z, near).item() > 0.0


def test_vf_features_are_resized_to_the_latent_grid_and_videos_align_per_frame():
    align = VisionFoundationAlignment(4, 16)
    # Features on a coarser grid are upsampled to the latent grid (not the latents downsampled): the cosine term
    # then compares every latent position with the bilinear features there.
    z, features = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 4, 4)
    align.cos_margin = 0.0
    _, terms = align(z, features, return_terms=True)
    projected, upsampled = align.project(z), resize_spatial(features, (8, 8))
    expected = (1 - F.cosine_similarity(projected, upsampled, dim=1)).mean()
    assert terms["vf_cos"].item() == pytest.approx(expected.item(), rel=1e-5)
    # Above distmat_max_positions the distance matrix compares pooled maps: same value as pooling by hand.
    pooled = VisionFoundationAlignment(4, 16, cos_margin=0.0, distmat_margin=0.0, distmat_max_positions=16)
    pooled.load_state_dict(align.state_dict())
    _, terms = pooled(z, features, return_terms=True)
    zp = F.normalize(F.avg_pool2d(projected, 2).flatten(2), dim=1)
    fp = F.normalize(F.avg_pool2d(upsampled, 2).flatten(2), dim=1)
    expected = (zp.transpose(1, 2) @ zp - fp.transpose(1, 2) @ fp).abs().mean()
    assert terms["vf_distmat"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert align(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 6, 6)).ndim == 0
    assert align(torch.randn(1, 4, 2, 8, 8), torch.randn(1, 16, 2, 4, 4)).ndim == 0
    with pytest.raises(ValueError, match="frame"):
        align(torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 9, 4, 4))
    with pytest.raises(ValueError, match="feature_dim"):
        align(torch.randn(1, 4, 8, 8), torch.randn(1, 32, 8, 8))


def test_vf_adaptive_weight_matches_a_hand_computation():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    a, b = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    nll, vf = (weight * a).sum(), 0.5 * (weight * b).sum() ** 2
    vf_grad = (weight * b).sum().detach() * b
    expected = a.norm() / (vf_grad.norm() + 1e-4) * 0.1
    got = vf_adaptive_weight(nll, vf, weight, vf_weight=0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad
    # The clamp is 1e8 (LightningDiT), not the discriminator's 1e4: a vf flat in W gives 1e4 / 1e-4 * 1.
    flat = (weight * 0).sum()
    nll_big = (weight * torch.full_like(a, 1e5)).sum()  # ||grad|| / 1e-4 ~ 1e10
    assert vf_adaptive_weight(nll_big, flat, weight, 1.0).item() == pytest.approx(1e8, rel=1e-5)
    assert adaptive_weight(nll_big, flat, weight, 1.0).item() == pytest.approx(1e4, rel=1e-5)


WRAPPED_CONV_OUT = ("AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX")


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_encoder_last_layer_of_every_class(name):
    vae = build_tiny(name)
    if name == "AutoencoderTiny":
        expected = vae.encoder.layers[-1].weight
    elif name in WRAPPED_CONV_OUT:
        expected = vae.encoder.conv_out.conv.weight
    else:
        expected = vae.encoder.conv_out.weight
    assert encoder_last_layer(vae) is expected


# ------------------------------------------------------------------------------------------------ vision loader


def save_tiny_dinov2(folder):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_loader_loads_a_tiny_dinov2_and_alignment_gradients_skip_it(tmp_path):
    folder = save_tiny_dinov2(tmp_path / "dinov2")
    vision = load_vision_model(folder)
    assert vision.feature_dim == 32 and vision.patch_size == 14
    assert torch.allclose(vision.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    features = vision(images)
    assert features.shape == (2, 32, 4, 4)  # 64 px floor to 56 = 4 patches
    assert vision(images, grid=(8, 8)).shape == (2, 32, 8, 8)
    assert vision(torch.rand(1, 3, 2, 56, 56)).shape == (1, 32, 2, 4, 4)
    # The tokens kept are the patch tokens of last_hidden_state (CLS dropped), in row-major order.
    pixels = ((resize_spatial(images, (56, 56)) + 1) / 2 - vision.mean) / vision.std
    tokens = vision.model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(features.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)

    vision.train()
    assert not vision.model.training and not any(p.requires_grad for p in vision.parameters())
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    align = VisionFoundationAlignment(4, vision.feature_dim)
    align(z, vision(images)).backward()
    assert align.proj.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vision.parameters())

    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert torch.allclose(load_vision_model(folder).std.flatten(), torch.full((3,), 0.5))


def test_loader_refuses_missing_and_non_vision_folders(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="no such folder.*DINOv2"):
        load_vision_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vision_model(tmp_path / "empty")
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    with pytest.raises(ValueError, match="not a patch-based vision model"):
        load_vision_model(bert)
    vae_folder = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(vae_folder)
    with pytest.raises(ValueError, match="--align_to"):
        load_vision_model(vae_folder)
    dinov2 = save_tiny_dinov2(tmp_path / "pickled")
    for weights in dinov2.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_vision_model(dinov2)


def test_defaults_name_the_papers_and_are_json():
    assert set(REGULARISER_DEFAULTS) == {"equivariance", "scale_equivariance", "align", "latent_noise"}
    json.dumps(REGULARISER_DEFAULTS)
    for entry in REGULARISER_DEFAULTS.values():
        assert "arXiv:" in entry["help"] and entry["flag"].startswith("--")
    assert REGULARISER_DEFAULTS["align"]["defaults"]["cos_margin"] == 0.5
    assert REGULARISER_DEFAULTS["equivariance"]["defaults"]["p_prior"] == 0.5
