"""The fast inference path (`diffusers_vae_ext.blocks`) against diffusers' own forward, and when it steps aside."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import diffusers_twin, make_vae, photo_batch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file

from diffusers_vae_ext.blocks import subpixel_weight, upsample_nearest2x_conv3x3

TOL = 1e-5
# Modules whose forward the fast path replaces; diffusers' version running means the fast path stepped aside.
REPLACED_FORWARDS = (
    Encoder,
    Decoder,
    DownEncoderBlock2D,
    UpDecoderBlock2D,
    UNetMidBlock2D,
    ResnetBlock2D,
    Upsample2D,
    Attention,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@contextlib.contextmanager
def diffusers_forwards_forbidden():
    """Fail if any block runs through diffusers' forward, i.e. prove that the fast path ran every block."""
    with contextlib.ExitStack() as stack:
        for cls in REPLACED_FORWARDS:
            stack.enter_context(
                mock.patch.object(cls, "forward", side_effect=AssertionError(f"{cls.__name__}.forward ran"))
            )
        yield


def encode_decode(vae, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return vae.encode(images).latent_dist.parameters, vae.decode(latents).sample


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return photo_batch(32, ("astronaut", "coffee"))


@pytest.fixture(scope="module")
def larger_photos() -> torch.Tensor:
    return photo_batch(64, ("astronaut", "chelsea"))


@pytest.mark.parametrize("train_mode", [False, True])
def test_fast_path_runs_every_block_and_equals_diffusers(larger_photos, train_mode):
    vae = make_vae(seed=2).train(train_mode)
    twin = diffusers_twin(vae).train(train_mode)
    with torch.no_grad():
        latents = twin.encode(larger_photos).latent_dist.mean
        theirs = encode_decode(twin, larger_photos, latents)
        with diffusers_forwards_forbidden():
            ours = encode_decode(vae, larger_photos, latents)
    for our_out, their_out in zip(ours, theirs):
        assert our_out.abs().max() > 0.1  # a meaningful comparison, not two near-zero tensors
        assert max_diff(our_out, their_out) <= TOL
        # Plain contiguous outputs: channels_last stays inside the fast path.
        assert our_out.is_contiguous()


def test_fast_path_is_about_as_accurate_as_diffusers_against_float64(photos):
    # Both differ from the exact result by fp32 rounding; reordered sums must not make ours markedly worse.
    vae = make_vae(seed=2)
    twin = diffusers_twin(vae)
    exact = diffusers_twin(vae).double()
    with torch.no_grad():
        truth = exact(photos.double()).sample
        our_error = max_diff(vae(photos).sample.double(), truth)
        their_error = max_diff(twin(photos).sample.double(), truth)
    assert their_error > 0
    assert our_error <= 3 * their_error


def test_fast_path_off_is_diffusers_exactly(photos):
    vae = make_vae(seed=2)
    twin = diffusers_twin(vae)
    vae.use_fast_path = False
    with torch.no_grad():
        assert torch.equal(vae(photos).sample, twin(photos).sample)


def test_frozen_weights_with_grad_mode_on_take_the_fast_path(photos):
    # A diffusion training loop encodes with a frozen VAE, often without torch.no_grad().
    vae = make_vae(seed=2).requires_grad_(False)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        expected = twin.encode(photos).latent_dist.mean
    with diffusers_forwards_forbidden():
        latents = vae.encode(photos).latent_dist.mean
    assert not latents.requires_grad
    assert max_diff(latents, expected) <= TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_equal_diffusers(photos, checkpointing):
    vae = make_vae(seed=3).train()
    twin = diffusers_twin(vae).train()
    grads = []
    for model in (vae, twin):
        if checkpointing:
            model.enable_gradient_checkpointing()
        posterior = model.encode(photos[:1]).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(0))
        loss = model.decode(latents).sample.square().mean() + 1e-3 * posterior.kl().mean()
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        # Autograd runs diffusers' own forward: the gradients are the same numbers, not just close.
        assert torch.equal(grad, grads[1][name]), name


def test_input_gradients_with_frozen_weights_equal_diffusers(photos):
    vae = make_vae(seed=3).requires_grad_(False)
    twin = diffusers_twin(vae).requires_grad_(False)
    grads = []
    for model in (vae, twin):
        images = photos[:1].clone().requires_grad_(True)
        model(images).sample.square().mean().backward()
        grads.append(images.grad)
    assert grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


def test_saved_weights_stay_contiguous_and_load_in_diffusers(tmp_path, photos):
    vae = make_vae(seed=4)
    with torch.no_grad():
        before = vae(photos).sample  # the fast path ran; it must not have changed the weights' layout
    assert all(t.is_contiguous() for t in vae.state_dict().values())
    vae.save_pretrained(tmp_path / "vae")
    saved = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == vae.state_dict().keys()
    assert all(t.is_contiguous() and torch.equal(t, vae.state_dict()[k]) for k, t in saved.items())
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        # Forward composes encode and decode: allow the decoder's amplification of encode's rounding.
        assert max_diff(theirs(photos).sample, before) <= 5e-5


def test_channels_last_model_runs_and_saves_plain_files(tmp_path, photos):
    vae = make_vae(seed=4)
    twin = diffusers_twin(vae)
    vae.to(memory_format=torch.channels_last)  # users may do this for speed; the fast path accepts it
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        assert max_diff(vae.decode(latents).sample, twin.decode(latents).sample) <= TOL
    vae.save_pretrained(tmp_path / "vae")
    saved = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(t.is_contiguous() for t in saved.values())
    back = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        assert torch.equal(back.decode(latents).sample, twin.decode(latents).sample)


class OffsetAttnProcessor(AttnProcessor2_0):
    """A user's custom processor: SDPA attention plus a constant, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, *args, **kwargs) + 0.25


def test_custom_attention_processor_is_used_not_ignored(photos):
    vae = make_vae(seed=5)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        default_out = vae(photos).sample
        processor = OffsetAttnProcessor()
        vae.set_attn_processor(processor)
        twin.set_attn_processor(OffsetAttnProcessor())
        out = vae(photos).sample
        expected = twin(photos).sample
    assert processor.calls == 2  # encoder and decoder mid-block attention
    assert max_diff(out, default_out) > 1e-3
    assert max_diff(out, expected) <= 5e-5


def test_fused_qkv_projections_fall_back_and_match(photos):
    vae = make_vae(seed=5)
    twin = diffusers_twin(vae)
    vae.fuse_qkv_projections()
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        assert max_diff(vae.decode(latents).sample, twin.decode(latents).sample) <= TOL
    vae.unfuse_qkv_projections()


def test_module_hooks_fall_back_to_diffusers_forward(photos):
    vae = make_vae(seed=6)
    twin = diffusers_twin(vae)
    seen = []
    vae.decoder.up_blocks[0].resnets[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        assert torch.equal(vae.decode(latents).sample, twin.decode(latents).sample)
    assert len(seen) == 1


def test_accelerate_sequential_offload_hooks_fall_back(photos):
    from accelerate import cpu_offload

    vae = make_vae(seed=6)
    twin = diffusers_twin(vae)
    cpu_offload(vae, execution_device=torch.device("cpu"))  # weights move to "meta", hooks bring them back
    assert next(vae.decoder.parameters()).device.type == "meta"
    with torch.no_grad():
        assert torch.equal(vae(photos).sample, twin(photos).sample)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
        dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)),
        dict(act_fn="gelu", layers_per_block=1),
        dict(act_fn="mish", in_channels=1, out_channels=4, latent_channels=16),
    ],
    ids=["no-attention-no-quant", "one-level", "gelu", "mish-1-to-4-channels"],
)
def test_unusual_configs_match_diffusers(overrides):
    vae = make_vae(seed=7, **overrides)
    twin = diffusers_twin(vae)
    images = torch.rand(2, vae.config.in_channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = twin.encode(images).latent_dist.mean
        theirs = encode_decode(twin, images, latents)
        with diffusers_forwards_forbidden():
            ours = encode_decode(vae, images, latents)
    for our_out, their_out in zip(ours, theirs):
        assert max_diff(our_out, their_out) <= TOL


def test_bfloat16_on_cpu_is_as_close_to_float32_as_diffusers(photos):
    vae = make_vae(seed=8)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        latents = twin.encode(photos).latent_dist.mean
        reference = twin.decode(latents).sample
        vae.to(torch.bfloat16)
        twin.to(torch.bfloat16)
        with diffusers_forwards_forbidden():
            ours = vae.decode(latents.bfloat16()).sample
        theirs = twin.decode(latents.bfloat16()).sample
    assert ours.dtype == torch.bfloat16
    their_error = max_diff(theirs, reference)
    assert max_diff(ours, reference) <= 2 * their_error + 1e-2
    assert max_diff(ours, theirs) <= 2 * their_error + 1e-2


@pytest.mark.parametrize(
    "shape, out_channels, bias, channels_last",
    [
        ((1, 8, 6, 6), 8, True, False),
        ((2, 8, 5, 7), 12, True, True),
        ((1, 16, 9, 4), 4, False, True),
    ],
)
def test_subpixel_upsample_equals_nearest_upsample_then_conv(shape, out_channels, bias, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, shape[1], 3, 3, generator=generator)
    b = torch.randn(out_channels, generator=generator) if bias else None
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, b, padding=1)
    out = upsample_nearest2x_conv3x3(x, weight, b)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert max_diff(out, expected) <= 1e-4 * expected.abs().max().item()


def test_subpixel_weight_sums_the_kernel_rows_and_columns_of_each_phase():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    phases = subpixel_weight(weight)
    assert phases.shape == (4, 1, 2, 2)
    # Phase (0, 0) reads input rows/cols (i-1, i): kernel row 0 | rows 1+2, column 0 | columns 1+2.
    assert phases[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # Phase (1, 1) reads (i, i+1): rows 0+1 | row 2, columns 0+1 | column 2.
    assert phases[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
