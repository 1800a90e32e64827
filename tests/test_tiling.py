"""Exact tiling: tiled encode/decode equal the untiled ones (ours and diffusers') on real photos."""

from __future__ import annotations

import pytest
import torch
from conftest import diffusers_twin, make_vae

import diffusers_vae_ext.modeling as modeling
from diffusers_vae_ext.data import pil_to_tensor, resize_and_crop, sample_photos

TOL = 1e-4
TILE = 32  # the small config's factor is 4: 32-pixel tiles are 8 latent pixels


pytestmark = pytest.mark.usefixtures("one_thread")


def photos(height: int, width: int, names=("astronaut", "chelsea", "coffee")) -> torch.Tensor:
    """Real photographs (scikit-image) resized and centre-cropped to height x width, in [-1, 1]."""
    images = sample_photos()
    return torch.stack([pil_to_tensor(resize_and_crop(images[name], (height, width))[0]) for name in names])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def photos_72x88() -> torch.Tensor:
    # Not a multiple of the tile in either direction: 3 x 3 tiles of unequal widths.
    return photos(72, 88)


CONFIGS = {
    "default": {},
    "no_mid_attention": {"mid_block_add_attention": False},
    "no_quant_convs": {"use_quant_conv": False, "use_post_quant_conv": False},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_tiled_encode_and_decode_equal_untiled_on_real_photos(overrides, photos_72x88):
    vae = make_vae(**overrides)
    twin = diffusers_twin(vae)
    with torch.no_grad():
        untiled = vae.encode(photos_72x88).latent_dist
        reference = twin.encode(photos_72x88).latent_dist
        z = untiled.mode()
        decoded = vae.decode(z).sample
        decoded_reference = twin.decode(z).sample

        vae.enable_tiling(tile_sample_size=TILE)
        tiled = vae.encode(photos_72x88).latent_dist
        tiled_decoded = vae.decode(z).sample

    assert tiled.mean.shape == (3, 4, 18, 22) and tiled_decoded.shape == photos_72x88.shape
    for ours, theirs in ((tiled.mean, untiled.mean), (tiled.logvar, untiled.logvar)):
        assert max_diff(ours, theirs) <= TOL
    assert max_diff(tiled_decoded, decoded) <= TOL
    # Closing the loop: diffusers' own untiled AutoencoderKL with the same weights.
    assert max_diff(tiled.mean, reference.mean) <= TOL and max_diff(tiled.logvar, reference.logvar) <= TOL
    assert max_diff(tiled_decoded, decoded_reference) <= TOL
    # The outputs are not trivially small, so the tolerance above is meaningful.
    assert decoded.abs().max() > 0.5 and untiled.mean.abs().max() > 0.05


def test_tiny_tiles_are_exact_in_float64():
    """In float64 the rounding noise vanishes, so any wrong halo or statistic would show: 8-pixel tiles are 2 latent
    pixels, every convolution reads across tile borders, and the images are 3 x 2 tiles of unequal sizes."""
    vae = make_vae().double()
    images = photos(24, 12, names=("astronaut", "coffee")).double()
    z = torch.randn(2, 4, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        moments, decoded = vae.encode(images).latent_dist.parameters, vae.decode(z).sample
        vae.enable_tiling(tile_sample_size=8)
        assert max_diff(vae.encode(images).latent_dist.parameters, moments) <= 1e-12
        assert max_diff(vae.decode(z).sample, decoded) <= 1e-12


def test_slicing_and_tiling_together(photos_72x88):
    vae = make_vae()
    with torch.no_grad():
        moments = vae.encode(photos_72x88).latent_dist.parameters
        z = vae.encode(photos_72x88).latent_dist.mode()
        decoded = vae.decode(z).sample
        vae.enable_slicing()
        vae.enable_tiling(tile_sample_size=TILE)
        assert max_diff(vae.encode(photos_72x88).latent_dist.parameters, moments) <= TOL
        assert max_diff(vae.decode(z).sample, decoded) <= TOL
        assert max_diff(vae(photos_72x88).sample, decoded) <= TOL


def test_tiling_off_and_small_inputs_take_the_untiled_path_exactly(monkeypatch, photos64):
    vae = make_vae()
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moments, decoded = vae.encode(photos64).latent_dist.parameters, vae.decode(z).sample
        vae.enable_tiling(tile_sample_size=TILE)
        vae.disable_tiling()
        assert not vae.use_tiling
        assert torch.equal(vae.encode(photos64).latent_dist.parameters, moments)
        assert torch.equal(vae.decode(z).sample, decoded)

        # Tiling on, but the input fits in one tile: the untiled code runs (the tiler must not be called).
        def refuse(*args):
            raise AssertionError("tiler called for an input that fits in one tile")

        monkeypatch.setattr(modeling, "tiled_encode", refuse)
        monkeypatch.setattr(modeling, "tiled_decode", refuse)
        vae.enable_tiling(tile_sample_size=64)
        assert torch.equal(vae.encode(photos64).latent_dist.parameters, moments)
        assert torch.equal(vae.decode(z).sample, decoded)
        vae.enable_tiling(tile_sample_size=TILE)
        with pytest.raises(AssertionError, match="tiler called"):
            vae.decode(z)


def test_enable_tiling_api():
    vae = make_vae()
    assert vae.use_tiling is False
    vae.enable_tiling()  # no arguments, as diffusers' tests and pipelines call it
    assert vae.use_tiling is True
    assert vae.tile_sample_min_size == vae.config.sample_size == 32 and vae.tile_latent_min_size == 8
    vae.enable_tiling(tile_sample_size=48, tile_overlap=16)
    assert vae.tile_sample_min_size == 48 and vae.tile_latent_min_size == 12
    vae.tile_sample_min_size = 64  # diffusers' attribute, set directly as people do on diffusers' VAE
    assert vae.tile_latent_min_size == 16
    for bad in (30, 0, -8, 32.0):
        with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
            vae.enable_tiling(tile_sample_size=bad)
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.enable_tiling(tile_overlap=-1)
    vae.disable_tiling()
    assert vae.use_tiling is False


def test_tiling_refuses_to_record_gradients(photos_72x88):
    vae = make_vae()
    vae.enable_tiling(tile_sample_size=TILE)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        vae.encode(photos_72x88)
    z = torch.randn(1, 4, 18, 22)
    vae.requires_grad_(False)  # frozen VAE, input without grad: nothing to record, runs tiled
    assert vae.decode(z).sample.shape == (1, 3, 72, 88)
    with pytest.raises(RuntimeError, match="for inference"):
        vae.decode(z.requires_grad_())


def test_unsupported_blocks_are_refused_clearly():
    vae = make_vae(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"))
    with pytest.raises(NotImplementedError, match="AttnDownEncoderBlock2D"):
        vae.enable_tiling()


def test_diffusers_per_tile_tiler_differs_so_the_comparison_means_something(photos_72x88):
    """diffusers' tiler normalises each tile on its own and blends: with the same tiles it is far from exact."""
    vae = make_vae()
    twin = diffusers_twin(vae)
    with torch.no_grad():
        z = vae.encode(photos_72x88).latent_dist.mode()
        decoded = vae.decode(z).sample
        twin.enable_tiling()
        twin.tile_sample_min_size, twin.tile_latent_min_size = TILE, TILE // 4
        assert max_diff(twin.decode(z).sample, decoded) > 100 * TOL
        vae.enable_tiling(tile_sample_size=TILE)
        assert max_diff(vae.decode(z).sample, decoded) <= TOL


def test_one_side_larger_than_the_tile_and_channels_last_input():
    """Only the width exceeds the tile (one row of tiles); the input arrives channels_last, as from a pipeline
    that converted it: the tiler must not depend on the caller's memory layout."""
    vae = make_vae()
    images = photos(24, 72, names=("coffee", "chelsea"))
    with torch.no_grad():
        moments = vae.encode(images).latent_dist.parameters
        z = moments[:, :4]
        decoded = vae.decode(z).sample
        vae.enable_tiling(tile_sample_size=TILE)
        tiled_moments = vae.encode(images.contiguous(memory_format=torch.channels_last)).latent_dist.parameters
        tiled_decoded = vae.decode(z.contiguous(memory_format=torch.channels_last)).sample
    assert tiled_decoded.shape == (2, 3, 24, 72)
    assert max_diff(tiled_moments, moments) <= TOL and max_diff(tiled_decoded, decoded) <= TOL
