"""Losses: reconstruction, KL modes, adversarial pieces, LPIPS (random weights; no downloads) and its conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.cli import main
from diffusers_vae_ext.losses import (
    LPIPS,
    LPIPS_WEIGHTS_ENV,
    PatchGAN3DDiscriminator,
    PatchGANDiscriminator,
    adaptive_weight,
    convert_lpips_weights,
    generator_adversarial_loss,
    hinge_d_loss,
    kl_capacity,
    kl_loss,
    load_lpips,
    reconstruction_loss,
    vanilla_d_loss,
    weighted_kl,
)

pytestmark = pytest.mark.usefixtures("one_thread")


VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction and KL
# ---------------------------------------------------------------------------------------------------------------


def test_reconstruction_loss_l1_l2_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]], [[[0.0, 0.0], [3.0, -1.0]]]])
    # Sums per image: L1 3.5 and 4.0, L2 5.25 and 10.0; averaged over the batch of 2.
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx((3.5 + 4.0) / 2)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx((5.25 + 10.0) / 2)
    assert reconstruction_loss(x, x_hat).item() == pytest.approx(3.75)  # default l1
    assert reconstruction_loss(x, x_hat).ndim == 0
    with pytest.raises(ValueError, match="l1, l2"):
        reconstruction_loss(x, x_hat, "huber")
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(x, x_hat[:, :, :1])


def test_reconstruction_loss_sums_half_precision_in_float32():
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    exact = reconstruction_loss(x.double(), x_hat.double())
    halved = reconstruction_loss(x.half(), x_hat.half())
    assert halved.dtype == torch.float32
    assert halved.item() == pytest.approx(exact.item(), rel=1e-3)


def test_kl_loss_matches_closed_form():
    torch.manual_seed(0)
    parameters = torch.randn(3, 8, 5, 5)
    posterior = DiagonalGaussianDistribution(parameters)
    mu, logvar = parameters[:, :4], parameters[:, 4:]
    closed_form = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    assert kl_loss(posterior).ndim == 0
    torch.testing.assert_close(kl_loss(posterior), closed_form)
    # A deterministic posterior has KL 0.
    assert kl_loss(DiagonalGaussianDistribution(parameters, deterministic=True)).item() == 0.0


@pytest.mark.parametrize(
    "step, capacity", [(-5, 0.0), (0, 0.0), (2500, 6.25), (5000, 12.5), (10000, 25.0), (50000, 25.0)]
)
def test_kl_capacity_ramps_and_caps(step, capacity):
    assert kl_capacity(step, capacity_max=25.0, capacity_stop_steps=10000) == pytest.approx(capacity)


def test_weighted_kl_modes():
    kl = torch.tensor(30.0)
    for step in (0, 100, 5000, 10000, 20000):
        assert weighted_kl(kl, step).item() == pytest.approx(1e-6 * 30.0)
        assert weighted_kl(kl, step, mode="plain", kl_weight=1e-3).item() == pytest.approx(0.03)
        assert weighted_kl(kl, step, mode="H", kl_weight=1e-3, beta=4.0).item() == pytest.approx(0.12)
    # B: gamma * kl_weight * |kl - C(step)| with C = 25 * step / 10000, capped at 25 (then |30 - 25| = 5).
    expected_b = {0: 30.0, 2000: 25.0, 5000: 17.5, 10000: 5.0, 20000: 5.0}
    for step, gap in expected_b.items():
        value = weighted_kl(kl, step, mode="B", kl_weight=1e-6, gamma=1000.0)
        assert value.item() == pytest.approx(1e-3 * gap)
    # Above capacity and below it the sign of (kl - C) flips; |.| makes both positive.
    assert weighted_kl(torch.tensor(10.0), 10000, mode="B", kl_weight=1.0, gamma=2.0).item() == pytest.approx(30.0)
    with pytest.raises(ValueError, match="plain, H, B"):
        weighted_kl(kl, 0, mode="beta")


# ---------------------------------------------------------------------------------------------------------------
# Adversarial
# ---------------------------------------------------------------------------------------------------------------


def test_discriminator_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 2].
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expected = 0.5 * (sum(softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(softplus(f) for f in (-2.0, 0.0, 1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.0 / 3.0)
    assert generator_adversarial_loss(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(-2.0)


def test_adaptive_weight_matches_manual_autograd():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    inputs, mix = torch.randn(5, 4), torch.randn(5, 3)
    out = inputs @ weight.t()
    nll = out.abs().sum()
    g = -(out * mix).mean()

    got = adaptive_weight(nll, g, weight, disc_weight=0.5)

    # By hand, on a fresh graph: d nll/dW = sign(out)^T inputs, d g/dW = -(mix^T inputs) / out.numel().
    grad_nll = out.detach().sign().t() @ inputs
    grad_g = -(mix.t() @ inputs) / out.numel()
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4) * 0.5
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    # The graph was retained: the caller can still backpropagate through both losses.
    (nll + got * g).backward()
    assert weight.grad is not None

    # A generator loss with no gradient at the last layer hits the 1e4 clamp instead of dividing by ~0.
    nll2 = (inputs @ weight.t()).square().sum()
    flat = (weight * 0).sum()
    assert adaptive_weight(nll2, flat, weight, disc_weight=2.0).item() == pytest.approx(2e4)


def test_patchgan_layout_init_and_shape():
    disc = PatchGANDiscriminator(in_channels=3, base_channels=2, num_layers=5)
    convs = [m for m in disc.main if isinstance(m, torch.nn.Conv2d)]
    # Doubling, capped at 8x base; then the stride-1 block and the 1-channel head.
    assert [c.out_channels for c in convs] == [2, 4, 8, 16, 16, 16, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, False, False, True]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.main) == 5

    torch.manual_seed(0)
    big = PatchGANDiscriminator()  # default 64 channels, 3 layers: enough weights to check the init statistics
    conv_weights = torch.cat([m.weight.flatten() for m in big.modules() if isinstance(m, torch.nn.Conv2d)])
    bn_weights = torch.cat([m.weight for m in big.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(conv_weights.mean().item()) < 1e-3
    assert bn_weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_weights.std().item() == pytest.approx(0.02, rel=0.2)
    for m in big.modules():
        if getattr(m, "bias", None) is not None:
            assert torch.all(m.bias == 0)
    # 32 px -> 16 -> 8 -> 4 (stride 2) -> 3 -> 2 (4x4 stride 1, padding 1).
    assert big(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_patchgan_3d_keeps_the_saved_layout_and_the_2d_init():
    # The state dict a --disc_3d checkpoint holds: these keys and shapes must keep loading strictly.
    disc = PatchGAN3DDiscriminator(in_channels=3, base_channels=2, num_layers=2)
    conv, norm = (2, 3, 3, 4, 4), (4,)
    expected = {
        "main.0.weight": conv, "main.0.bias": (2,),
        "main.2.weight": (4, 2, 3, 4, 4),
        **{f"main.3.{name}": norm for name in ("weight", "bias", "running_mean", "running_var")},
        "main.3.num_batches_tracked": (),
        "main.5.weight": (8, 4, 3, 4, 4),
        **{f"main.6.{name}": (8,) for name in ("weight", "bias", "running_mean", "running_var")},
        "main.6.num_batches_tracked": (),
        "main.8.weight": (1, 8, 3, 4, 4), "main.8.bias": (1,),
    }  # fmt: skip
    assert {key: tuple(value.shape) for key, value in disc.state_dict().items()} == expected
    convs = [m for m in disc.main if isinstance(m, torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(1, 2, 2), (1, 2, 2), (1, 1, 1), (1, 1, 1)]  # space only, never time
    # 5 frames stay 5; 32 px -> 16 -> 8 (stride 2) -> 7 -> 6 (4x4 stride 1, padding 1).
    assert disc(torch.randn(1, 3, 5, 32, 32)).shape == (1, 1, 5, 6, 6)

    torch.manual_seed(0)
    big = PatchGAN3DDiscriminator()
    conv_weights = torch.cat([m.weight.flatten() for m in big.modules() if isinstance(m, torch.nn.Conv3d)])
    bn_weights = torch.cat([m.weight for m in big.modules() if isinstance(m, torch.nn.BatchNorm3d)])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn_weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert all(torch.all(m.bias == 0) for m in big.modules() if getattr(m, "bias", None) is not None)


def test_generator_and_discriminator_steps_keep_gradients_apart():
    torch.manual_seed(0)
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    disc = PatchGANDiscriminator(base_channels=8, num_layers=2)
    x = torch.randn(2, 3, 32, 32)

    # Generator step: the discriminator is frozen, so only the generator collects gradients.
    disc.requires_grad_(False)
    generator_adversarial_loss(disc(generator(x))).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0

    # Discriminator step on detached reconstructions: only the discriminator collects gradients.
    generator.zero_grad(set_to_none=True)
    disc.requires_grad_(True)
    reconstructions = generator(x)
    hinge_d_loss(disc(x), disc(reconstructions.detach())).backward()
    assert generator.weight.grad is None
    assert all(p.grad is not None for p in disc.parameters())


# ---------------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    """LPIPS with random weights: the VGG keeps PyTorch's init, the heads are made positive as in trained lpips."""
    torch.manual_seed(0)
    model = LPIPS()
    with torch.no_grad():
        for k in range(5):
            head = getattr(model, f"lin{k}").model[1].weight
            head.copy_(torch.rand_like(head) + 0.1)
    return model


@pytest.fixture(scope="module")
def image_pair() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    return x, y


def reference_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS formula written out with functional ops in float64, from the state dict alone."""
    state = {k: v.double() for k, v in model.state_dict().items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    convs_per_stage = (2, 2, 3, 3, 3)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h = (img.double() - shift) / scale
        out, conv = [], iter(VGG_CONV_INDICES)
        for stage, n in enumerate(convs_per_stage):
            if stage:
                h = F.max_pool2d(h, 2)
            for _ in range(n):
                i = next(conv)
                h = F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        weighted = ((a - b) ** 2 * state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(dim=1)
        total += weighted.mean(dim=(1, 2))
    return total


def test_lpips_state_dict_layout_and_frozen(lpips):
    expected = {f"features.{i}.{kind}" for i in VGG_CONV_INDICES for kind in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    state = lpips.state_dict()
    assert set(state) == expected  # the scaling constants are not part of the weights
    assert [tuple(state[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [
        (1, 64, 1, 1),
        (1, 128, 1, 1),
        (1, 256, 1, 1),
        (1, 512, 1, 1),
        (1, 512, 1, 1),
    ]
    assert tuple(state["features.28.weight"].shape) == (512, 512, 3, 3)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()  # e.g. a parent module switched to training mode
    assert not lpips.training


def test_lpips_values_match_reference(lpips, image_pair):
    x, y = image_pair
    with torch.no_grad():
        distance = lpips(x, y)
        same = lpips(x, x)
        swapped = lpips(y, x)
    assert distance.shape == (3,)
    torch.testing.assert_close(distance.double(), reference_lpips(lpips, x, y), rtol=1e-4, atol=1e-6)
    assert torch.all(distance > 0)
    assert torch.all(same.abs() < 1e-6)
    torch.testing.assert_close(swapped, distance, rtol=1e-5, atol=1e-7)
    # Less noise, smaller distance.
    closer = (x + 0.05 * (y - x)).clamp(-1, 1)
    with torch.no_grad():
        assert torch.all(lpips(x, closer) < distance)


def test_lpips_accepts_one_channel(lpips, image_pair):
    x, y = image_pair[0][:, :1], image_pair[1][:, :1]
    with torch.no_grad():
        gray = lpips(x, y)
        rgb = lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    assert gray.shape == (3,)
    torch.testing.assert_close(gray, rgb)
    with pytest.raises(ValueError, match="1 or 3"):
        lpips(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))


def test_lpips_gradients_reach_vae_decoder_only(lpips, image_pair):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    x = image_pair[0][:2]
    lpips(x, vae(x).sample).mean().backward()
    grad = vae.decoder.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Weights: conversion, loading, CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_sources(lpips, tmp_path_factory) -> tuple:
    """Files in torchvision's vgg16 and lpips' vgg.pth layouts, with extra keys the converter must drop."""
    folder = tmp_path_factory.mktemp("lpips_sources")
    state = lpips.state_dict()
    vgg = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.randn(8, 4)
    vgg["classifier.0.bias"] = torch.randn(8)
    vgg["features.31.weight"] = torch.randn(2, 2)  # beyond relu5_3
    lin = {k: v.clone() for k, v in state.items() if k.startswith("lin")}
    lin["lins.0.model.1.weight"] = torch.randn(1, 64, 1, 1)  # lpips' ModuleList alias
    vgg_path, lin_path = folder / "vgg16-397923af.pth", folder / "vgg.pth"
    torch.save(vgg, vgg_path)
    torch.save(lin, lin_path)
    return vgg_path, lin_path


def test_convert_and_load_round_trip(lpips, fake_sources, tmp_path, image_pair, monkeypatch):
    vgg_path, lin_path = fake_sources
    out = convert_lpips_weights(vgg_path, lin_path, tmp_path / "sub" / "lpips.safetensors")
    assert out == tmp_path / "sub" / "lpips.safetensors" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["lpips.safetensors"]  # no temporary left behind
    stored = load_file(str(out))
    assert set(stored) == set(lpips.state_dict())

    loaded = load_lpips(out)
    for key, value in lpips.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, y = image_pair
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), lpips(x, y))

    # The environment variable is found when no path is given.
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(out))
    assert torch.equal(load_lpips().lin2.model[1].weight, lpips.lin2.model[1].weight)


def test_convert_rejects_wrong_shapes(lpips, fake_sources, tmp_path):
    vgg_path, _ = fake_sources
    bad_lin = {f"lin{k}.model.1.weight": torch.randn(1, 3, 1, 1) for k in range(5)}
    torch.save(bad_lin, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        convert_lpips_weights(vgg_path, tmp_path / "bad.pth", tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError):
        convert_lpips_weights(tmp_path / "nope.pth", tmp_path / "bad.pth", tmp_path / "out.safetensors")


def test_load_lpips_missing_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/diffusers_vae_ext/lpips_vgg.safetensors there
    with pytest.raises(FileNotFoundError) as info:
        load_lpips()
    message = str(info.value)
    for needle in ("convert-lpips", "vgg16-397923af.pth", "v0.1/vgg.pth", LPIPS_WEIGHTS_ENV, "never trains silently"):
        assert needle in message
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match="convert-lpips"):
        load_lpips()
    with pytest.raises(FileNotFoundError, match="convert-lpips"):
        load_lpips(tmp_path / "also_absent.safetensors")


def test_load_lpips_refuses_pickles_and_wrong_keys(lpips, fake_sources, tmp_path):
    with pytest.raises(ValueError, match="convert-lpips"):
        load_lpips(fake_sources[1])  # the lpips .pth itself
    state = dict(lpips.state_dict())
    del state["lin4.model.1.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing keys \['lin4.model.1.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        load_lpips(tmp_path / "partial.safetensors")


def test_cli_convert_lpips_default_output(lpips, fake_sources, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    vgg_path, lin_path = fake_sources
    assert main(["convert-lpips", "--vgg", str(vgg_path), "--lin", str(lin_path)]) == 0
    default = tmp_path / ".cache" / "diffusers_vae_ext" / "lpips_vgg.safetensors"
    assert str(default) in capsys.readouterr().out
    # Found at the default location with no argument and no environment variable.
    assert torch.equal(load_lpips().features[0].weight, lpips.features[0].weight)

    explicit = tmp_path / "explicit.safetensors"
    assert main(["convert-lpips", "--vgg", str(vgg_path), "--lin", str(lin_path), "--output", str(explicit)]) == 0
    assert explicit.is_file()
    assert main(["convert-lpips", "--vgg", str(tmp_path / "missing.pth"), "--lin", str(lin_path)]) == 2
    assert "missing.pth" in capsys.readouterr().err
