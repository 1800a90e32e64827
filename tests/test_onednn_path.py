"""The CPU fast path's oneDNN convolutions (`blocks.conv2d`): weights packed once and kept per weights version,
the residual add fused into the second convolution; never stale after the weights change."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import diffusers_twin, make_vae, photo_batch

from diffusers_vae_ext import blocks

TOL = 1e-5
pytestmark = [
    pytest.mark.skipif(not blocks._onednn_dtypes(), reason="this torch build has no oneDNN (mkldnn) convolutions"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return photo_batch(32, ("astronaut", "coffee"))


@pytest.fixture
def pack_counter(monkeypatch):
    """Counts how often weights are packed for oneDNN."""
    calls = []
    pack = blocks._onednn_pack

    def counting_pack(weight, conv_args):
        calls.append(tuple(weight.shape))
        return pack(weight, conv_args)

    monkeypatch.setattr(blocks, "_onednn_pack", counting_pack)
    return calls


def round_trip(vae, photos):
    with torch.no_grad():
        return vae.decode(vae.encode(photos).latent_dist.mean).sample


def test_weights_are_packed_once_and_repacked_after_an_update(photos, pack_counter):
    vae = make_vae(seed=4)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in vae.modules())
    first = round_trip(vae, photos)
    packed = len(pack_counter)
    # Every convolution but quant_conv/post_quant_conv (run on NCHW moments/latents) is packed, once.
    assert convs - 2 <= packed <= convs
    assert torch.equal(round_trip(vae, photos), first) and len(pack_counter) == packed

    # An optimizer-style in-place update: the next call sees the new weights (as diffusers does), not stale packs.
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    updated = round_trip(vae, photos)
    assert len(pack_counter) == 2 * packed
    assert (updated - first).abs().max() > 1e-3
    assert (updated - round_trip(diffusers_twin(vae), photos)).abs().max() <= TOL

    # load_state_dict copies in place too; assigning new tensors (`.data =`) changes them.
    other = make_vae(seed=5)
    vae.load_state_dict(other.state_dict())
    assert (round_trip(vae, photos) - round_trip(other, photos)).abs().max() <= TOL
    for mine, theirs in zip(vae.parameters(), make_vae(seed=6).parameters()):
        mine.data = theirs.data.clone()
    assert (round_trip(vae, photos) - round_trip(make_vae(seed=6), photos)).abs().max() <= TOL


def test_fused_residual_and_packed_weights_equal_diffusers_in_float32(photos):
    vae = make_vae(seed=7)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        ours = vae.encode(photos).latent_dist.parameters, vae.decode(latents).sample
        theirs = twin.encode(photos).latent_dist.parameters, twin.decode(latents).sample
    for our_out, their_out in zip(ours, theirs):
        assert our_out.abs().max() > 0.1
        assert (our_out - their_out).abs().max() <= TOL


def test_weights_made_under_inference_mode_run_unpacked(photos, pack_counter):
    # Inference tensors keep no version counter: an in-place update could not be seen, so nothing is cached.
    reference = make_vae(seed=8)
    with torch.inference_mode():
        vae = copy.deepcopy(reference)
        vae.load_state_dict(reference.state_dict())
        vae = vae.to(torch.float64).to(torch.float32)  # new (inference) tensors
        assert next(vae.parameters()).is_inference()
        out = vae.decode(vae.encode(photos).latent_dist.mean).sample
    assert pack_counter == []
    assert (out - round_trip(reference, photos)).abs().max() <= TOL


def test_a_packed_model_deep_copies_and_the_copy_follows_its_own_weights(photos):
    vae = make_vae(seed=9)
    before = round_trip(vae, photos)  # packs
    twin = copy.deepcopy(vae)
    assert torch.equal(round_trip(twin, photos), before)
    with torch.no_grad():
        for param in twin.parameters():
            param.mul_(0.5)
    assert torch.equal(round_trip(vae, photos), before)  # the original's packs are its own
    assert (round_trip(twin, photos) - round_trip(diffusers_twin(twin), photos)).abs().max() <= TOL


def test_bf16_uses_packed_weights_and_autocast_does_not(photos, pack_counter):
    vae = make_vae(seed=10)
    low = make_vae(seed=10).to(torch.bfloat16)
    their_low = diffusers_twin(vae).to(torch.bfloat16)
    with torch.no_grad():
        reference = vae(photos).sample
        if torch.bfloat16 in blocks._onednn_dtypes():
            out = low(photos.to(torch.bfloat16)).sample
            their_error = (their_low(photos.to(torch.bfloat16)).sample.float() - reference).abs().mean()
            # bf16 rounding, no worse than diffusers' own bf16 run (the fused add rounds once instead of twice).
            assert pack_counter and (out.float() - reference).abs().mean() <= 1.2 * their_error
        pack_counter.clear()
        # Under autocast F.conv2d casts its inputs; the oneDNN op would not, so the autocast run keeps F.conv2d.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = vae(photos).sample
    assert pack_counter == []
    assert autocast_out.dtype == torch.bfloat16 and (autocast_out.float() - reference).abs().mean() < 0.02


@pytest.mark.parametrize("affine, silu", [(True, True), (False, False)])
def test_group_norm_channels_last_has_nchw_accuracy(monkeypatch, affine, silu):
    # Several bands, the last one shorter, two samples; an offset mean, where E[x^2] - E[x]^2 loses digits.
    monkeypatch.setattr(blocks, "_GROUP_NORM_CHUNK_BYTES", 16 * 70 * 4 * 2 * 5)
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = (torch.randn(2, 16, 64, 70) * 0.1 + 4.0).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = norm.double()(x.double())
        norm.float()
        exact = torch.nn.functional.silu(exact) if silu else exact
        ours = blocks.group_norm_channels_last(norm, x, silu=silu)
        kernel = norm(x)
        kernel = torch.nn.functional.silu(kernel) if silu else kernel
    assert ours.is_contiguous(memory_format=torch.channels_last)
    our_error = (ours.double() - exact).abs().max().item()
    assert our_error <= 1e-5
    # The channels_last kernel's error here, for scale (it grows with the plane and the mean).
    assert (kernel.double() - exact).abs().max().item() > 5 * our_error
    # Written over its input (what the path does when the input is spent): the same values, in the input's buffer.
    with torch.no_grad():
        overwritten = x.clone()
        result = blocks.group_norm_channels_last(norm, overwritten, silu=silu, out=overwritten)
    assert result.data_ptr() == overwritten.data_ptr()
    assert torch.equal(result, ours)


def test_float32_group_norms_take_exact_statistics_in_the_model(monkeypatch, photos):
    # Every plane size (here 8x8 to 32x32) goes through the two-pass statistics; the model still equals diffusers.
    calls = []
    exact = blocks.group_norm_channels_last
    monkeypatch.setattr(blocks, "group_norm_channels_last", lambda *a, **k: calls.append(1) or exact(*a, **k))
    vae = make_vae(seed=11)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        ours = vae.encode(photos).latent_dist.parameters, vae.decode(latents).sample
        theirs = twin.encode(photos).latent_dist.parameters, twin.decode(latents).sample
    assert calls
    for our_out, their_out in zip(ours, theirs):
        assert (our_out - their_out).abs().max() <= TOL
