"""`diffusers_vae_ext.AutoencoderKL` against diffusers' own AutoencoderKL holding identical weights."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import SMALL_VAE_CONFIG, diffusers_twin, make_vae
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

import diffusers_vae_ext
from diffusers_vae_ext import AutoencoderKL, weights_fingerprint

TOL = 1e-5
# forward() = decode(encode(x)): this small random decoder turns a 1-ulp change of the latents into ~1e-5 at the output
# (diffusers' own fp32 forward is 1.3e-5 from a float64 run), so the fast path's reordered fp32 sums in encode show up
# amplified there. encode and decode on their own keep TOL.
FORWARD_TOL = 5e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_config_keys_and_defaults_match_diffusers():
    ours = inspect.signature(AutoencoderKL.__init__).parameters
    theirs = inspect.signature(DiffusersAutoencoderKL.__init__).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert ours[name].default == param.default, name


def test_state_dict_keys_and_shapes_match_diffusers(small_vae):
    twin = diffusers_twin(small_vae)
    ours = {k: v.shape for k, v in small_vae.state_dict().items()}
    theirs = {k: v.shape for k, v in twin.state_dict().items()}
    assert ours == theirs


def test_encode_decode_forward_equal_diffusers_on_real_photos(small_vae, photos64):
    twin = diffusers_twin(small_vae)
    with torch.no_grad():
        ours = small_vae.encode(photos64)
        theirs = twin.encode(photos64)
        assert isinstance(ours, AutoencoderKLOutput)
        assert isinstance(ours.latent_dist, DiagonalGaussianDistribution)
        assert max_diff(ours.latent_dist.mean, theirs.latent_dist.mean) <= TOL
        assert max_diff(ours.latent_dist.logvar, theirs.latent_dist.logvar) <= TOL
        # The moments are not trivially tiny: the comparison above is meaningful.
        assert ours.latent_dist.mean.abs().max() > 1e-2

        z = theirs.latent_dist.mode()
        decoded = small_vae.decode(z)
        assert isinstance(decoded, DecoderOutput)
        # Two float32 results, each within ~1e-5 of the exact one (ours 6.8e-6, diffusers' 1.2e-5 from a float64
        # run here): they may differ by the sum of both roundings, so the exact result decides.
        their_decoded = twin.decode(z).sample
        exact = diffusers_twin(small_vae).double().decode(z.double()).sample
        assert max_diff(decoded.sample, their_decoded) <= 2 * TOL
        assert max_diff(decoded.sample, exact) <= max(TOL, max_diff(their_decoded, exact))
        assert max_diff(small_vae.decode(z, return_dict=False)[0], decoded.sample) == 0

        assert max_diff(small_vae(photos64).sample, twin(photos64).sample) <= FORWARD_TOL
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ours_sampled = small_vae(photos64, sample_posterior=True, generator=g1).sample
        theirs_sampled = twin(photos64, sample_posterior=True, generator=g2).sample
        assert max_diff(ours_sampled, theirs_sampled) <= FORWARD_TOL


def test_save_ours_load_diffusers_and_back(tmp_path, small_vae, photos64):
    small_vae.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert not {"use_tiling", "use_slicing"} & set(config)

    theirs, info = DiffusersAutoencoderKL.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert max_diff(small_vae(photos64).sample, theirs.eval()(photos64).sample) <= FORWARD_TOL

    theirs.save_pretrained(tmp_path / "theirs")
    back, info = AutoencoderKL.from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert isinstance(back, AutoencoderKL)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert weights_fingerprint(back) == weights_fingerprint(small_vae)
    with torch.no_grad():
        assert max_diff(small_vae(photos64).sample, back.eval()(photos64).sample) == 0


def test_loads_from_a_pipeline_style_subfolder(tmp_path, small_vae):
    small_vae.save_pretrained(tmp_path / "pipe" / "vae")
    back = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    assert weights_fingerprint(back) == weights_fingerprint(small_vae)


def test_pickle_only_folder_is_refused_with_conversion_hint(tmp_path, small_vae):
    small_vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), tmp_path / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="convert-to-safetensors"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="safetensors only"):
        AutoencoderKL.from_pretrained(tmp_path / "vae", use_safetensors=False)

    from diffusers_vae_ext.cli import main

    assert main(["convert-to-safetensors", str(tmp_path / "vae")]) == 0
    back = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert weights_fingerprint(back) == weights_fingerprint(small_vae)


def test_checkpoint_with_missing_weights_fails_clearly(tmp_path, small_vae):
    from safetensors.torch import load_file, save_file

    small_vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("decoder.conv_out.weight")
    save_file(state, weights)
    with pytest.raises((ValueError, RuntimeError, OSError), match="decoder.conv_out.weight"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_seeded_posterior_sampling_is_reproducible(small_vae, photos64):
    with torch.no_grad():
        dist = small_vae.encode(photos64).latent_dist
    a = dist.sample(torch.Generator().manual_seed(0))
    b = dist.sample(torch.Generator().manual_seed(0))
    c = dist.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(dist.mode(), dist.mean)


def test_prior_sampling_is_reproducible_and_in_range(small_vae):
    a = small_vae.sample(2, generator=torch.Generator().manual_seed(0))
    b = small_vae.sample(2, generator=torch.Generator().manual_seed(0))
    c = small_vae.sample(2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert small_vae.sample(1, height=16, width=24).shape == (1, 3, 16, 24)
    # It decodes N(0, I) latents: the same draw decoded by hand gives the same image.
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(small_vae.decode(z).sample.clamp(-1, 1), a) == 0


def test_kl_matches_closed_form(small_vae, photos64):
    with torch.no_grad():
        dist = small_vae.encode(photos64).latent_dist
    mean, logvar = dist.mean.double(), dist.logvar.double()
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(dist.kl().double(), expected, rtol=1e-5)
    # KL against itself is zero; against a shifted copy it is 0.5 * sum(delta^2 / var).
    assert dist.kl(dist).abs().max() < 1e-3
    shifted = DiagonalGaussianDistribution(torch.cat([dist.mean + 0.5, dist.logvar], 1))
    expected_shift = 0.5 * (0.25 / logvar.exp()).sum(dim=(1, 2, 3))
    assert torch.allclose(shifted.kl(dist).double(), expected_shift, rtol=1e-4)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: torch.zeros(3, 64, 64), "4-D"),
        (lambda: torch.zeros(1, 4, 64, 64), "channels"),
        (lambda: torch.zeros(1, 1, 64, 64), "in_channels=3"),
        (lambda: torch.zeros(1, 3, 62, 64), "divisible by the VAE's downsampling factor 4"),
        (lambda: torch.zeros(1, 3, 64, 66, dtype=torch.float32), "divisible"),
        (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float in \\[-1, 1\\]"),
    ],
)
def test_encode_rejects_bad_input_with_helpful_errors(small_vae, make_input, message):
    with pytest.raises(ValueError, match=message):
        small_vae.encode(make_input())


@pytest.mark.parametrize(
    "make_latents, message",
    [
        (lambda: torch.zeros(4, 8, 8), "4-D"),
        (lambda: torch.zeros(1, 3, 8, 8), "latent_channels=4"),
        (lambda: torch.full((1, 4, 8, 8), float("nan")), "NaN"),
        (lambda: torch.zeros(1, 4, 8, 8, dtype=torch.int64), "floating-point"),
    ],
)
def test_decode_rejects_bad_latents(small_vae, make_latents, message):
    with pytest.raises(ValueError, match=message):
        small_vae.decode(make_latents())


def test_bad_configs_fail_early():
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(**{**SMALL_VAE_CONFIG, "norm_num_groups": 5})
    with pytest.raises(ValueError, match="same length"):
        AutoencoderKL(**{**SMALL_VAE_CONFIG, "block_out_channels": (16, 32)})


def test_slicing_gives_the_same_result(small_vae, photos64):
    with torch.no_grad():
        full = small_vae(photos64).sample
        small_vae.enable_slicing()
        sliced = small_vae(photos64).sample
        small_vae.disable_slicing()
    # Batched and per-image convolutions may pick different kernels: equal up to float rounding.
    assert max_diff(full, sliced) <= 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(photos64):
    grads = []
    for checkpointing in (False, True):
        vae = make_vae(seed=1).train()
        if checkpointing:
            vae.enable_gradient_checkpointing()
            assert vae.is_gradient_checkpointing
        vae(
            photos64[:1], sample_posterior=True, generator=torch.Generator().manual_seed(0)
        ).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fused_qkv_projections_match_diffusers_and_unfuse_restores(photos64):
    vae = make_vae(seed=3)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        unfused = vae(photos64).sample
        vae.fuse_qkv_projections()
        twin.fuse_qkv_projections()
        assert {type(p).__name__ for p in vae.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        fused, reference = vae(photos64).sample, twin(photos64).sample
        vae.unfuse_qkv_projections()
        assert {type(p).__name__ for p in vae.attn_processors.values()} == {"AttnProcessor2_0"}
        restored = vae(photos64).sample
    assert max_diff(fused, reference) <= FORWARD_TOL
    assert max_diff(fused, unfused) <= FORWARD_TOL
    assert not torch.equal(fused, unfused)  # the fused processor really ran
    assert torch.equal(restored, unfused)


def test_grayscale_and_wide_latent_configs_match_diffusers():
    vae = make_vae(
        in_channels=1, out_channels=1, latent_channels=16, use_quant_conv=False, mid_block_add_attention=False
    )
    twin = diffusers_twin(vae)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert max_diff(vae(x).sample, twin(x).sample) <= TOL
    assert vae.quant_conv is None


def test_package_root_exposes_what_pipeline_loading_needs():
    assert AutoencoderKL.__module__ == "diffusers_vae_ext"
    assert diffusers_vae_ext.ModelMixin is not None
    assert issubclass(AutoencoderKL, diffusers_vae_ext.ModelMixin)


def test_cli_info_prints_config_and_fingerprint(tmp_path, small_vae, capsys):
    from diffusers_vae_ext.cli import main

    small_vae.save_pretrained(tmp_path / "vae")
    assert main(["info", str(tmp_path / "vae")]) == 0
    out = capsys.readouterr().out
    assert '"latent_channels": 4' in out
    assert f"fingerprint: {weights_fingerprint(small_vae)}" in out
