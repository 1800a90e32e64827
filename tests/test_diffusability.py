"""`diffusers_vae_ext.diffusability`: the spectrum on constructed fields with known answers, the Gaussian optimum,
the probe on real latents (a small VAE on the scikit-image photos) against the three cases whose answer is known
(a sign scramble must be worse, a channel rotation the same, Gaussian noise 1.0), determinism, bad input, the
cache as input, and `diffusers-vae eval --diffusability` (report section; rows kept when the probe is interrupted)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vae
from PIL import Image

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.cli import main
from diffusers_vae_ext.data import pil_to_tensor, sample_photos, write_sample_photos
from diffusers_vae_ext.diffusability import gaussian_optimum_loss, latent_spectrum, measure_diffusability
from diffusers_vae_ext.diffusability import probe as probe_module
from diffusers_vae_ext.evaluation import EvalVAE, evaluate, write_report

# The three cases' budget on 4x20x20 latents: a clear margin (docs/diffusability.md), ~30 s a probe on a busy CPU.
PROBE_STEPS = 150


pytestmark = pytest.mark.usefixtures("one_thread")


def photo_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` random square crops of the sample photos (side `size` to `3 * size`, random place, area-resized to
    `size`), [-1, 1]; as `benchmarks/bench_diffusability.py` makes them."""
    generator = torch.Generator().manual_seed(seed)
    photos = [pil_to_tensor(photo) for photo in sample_photos().values()]
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(torch.randint(size, min(min(photo.shape[1:]), 3 * size) + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=generator))
        crop = photo[None, :, top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(crops)


def photo_vae() -> AutoencoderKL:
    """A small 2-level KL VAE (factor 2, 4 latent channels) with seeded random weights."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def photo_latents() -> tuple[torch.Tensor, torch.Tensor]:
    """256 crops of 40x40 and their posterior means (256, 4, 20, 20)."""
    pixels = photo_crops(256, 40)
    with torch.no_grad():
        latents = photo_vae().encode(pixels).latent_dist.mean
    return pixels, latents


# ------------------------------------------------------------------------------------------------------ spectrum
def test_white_noise_is_flat_and_smooth_fields_are_not():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 4, 32, 32, generator=generator) * torch.tensor([1.0, 5.0, 0.1, 2.0]).view(1, 4, 1, 1)
    spectrum = latent_spectrum(noise)
    # Flat spectrum: the share of power equals the share of coefficients in the upper half (about 3/4 of the disc).
    assert spectrum.high_frequency_energy == pytest.approx(spectrum.high_frequency_area, abs=0.01)
    assert 0.74 < spectrum.high_frequency_area < 0.77
    power = torch.tensor(spectrum.latent_power)
    assert float(power.std() / power.mean()) < 0.1  # flat, whatever each channel's scale
    # A 5x5 box blur keeps little above a quarter cycle per pixel.
    smooth = F.avg_pool2d(F.pad(noise, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    assert latent_spectrum(smooth).high_frequency_energy < 0.25
    # A cosine puts all its power at r = cycles / 32: below 1/4 (share 0) or above (share 1).
    grid = torch.arange(32.0)
    for cycles, high in ((3, 0.0), (7, 0.0), (8, 1.0), (12, 1.0)):
        wave = torch.cos(2 * math.pi * cycles * grid / 32).view(1, 1, 1, 32).expand(8, 1, 32, 32)
        assert latent_spectrum(wave).high_frequency_energy == pytest.approx(high, abs=1e-9)


def test_images_beside_latents_and_the_temporal_spectrum(photo_latents):
    pixels, latents = photo_latents
    spectrum = latent_spectrum(latents, pixels)
    # Photos are smooth at 20x20; a random-weight VAE's latents are much rougher than the pixels they encode.
    assert spectrum.image_high_frequency_energy < 0.2 < spectrum.high_frequency_energy
    assert len(spectrum.image_power) == len(spectrum.latent_power) == 10
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(16, 4, 5, 8, 8, generator=generator)
    frozen = video[:, :, :1].expand(-1, -1, 5, -1, -1)  # the same frame 5 times: no temporal change at all
    white, still = latent_spectrum(video), latent_spectrum(frozen, frozen[:, :3])
    assert white.temporal_frequencies == pytest.approx([0.0, 0.2, 0.4])
    assert white.temporal_high_frequency_energy == pytest.approx(2 / 5, abs=0.05)  # +-0.4 of 5 frequencies
    assert still.temporal_high_frequency_energy == pytest.approx(0.0, abs=1e-9)
    assert still.image_temporal_high_frequency_energy == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------------------ the probe
def test_gaussian_optimum_is_the_best_linear_predictor():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 200_000, generator=generator, dtype=torch.float64)
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        x_t, v = (1 - t) * x0 + t * eps, eps - x0
        slope = float((v * x_t).mean() / x_t.square().mean())  # least squares
        assert float((v - slope * x_t).square().mean()) == pytest.approx(gaussian_optimum_loss(t), rel=0.01)
    assert gaussian_optimum_loss(0.5) == 2.0 and gaussian_optimum_loss(0.0) == 1.0


@pytest.fixture(scope="module")
def three_cases(photo_latents):
    _, latents = photo_latents
    generator = torch.Generator().manual_seed(123)
    signs = torch.where(torch.rand(latents.shape[1:], generator=generator) < 0.5, -1.0, 1.0)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    cases = {
        "original": latents,
        "scrambled": latents * signs,  # a bijection: same reconstructions once unscrambled, rough as noise
        "rotated": torch.einsum("dc,nchw->ndhw", rotation.float(), latents),
    }
    results = {name: measure_diffusability(x, steps=PROBE_STEPS) for name, x in cases.items()}
    # Noise has nothing to learn at any budget; a shorter run keeps the file fast (the benchmark runs it at 300).
    results["gaussian"] = measure_diffusability(torch.randn(latents.shape, generator=generator), steps=60)
    for name, result in results.items():
        print(f"{name}: probe_loss {result.probe_loss:.4f}, high_frequency_energy {result.high_frequency_energy:.4f}")
    return results


@pytest.mark.slow  # the three probes: ~1 min each on a busy CPU
def test_sign_scramble_scores_clearly_worse(three_cases):
    original, scrambled = three_cases["original"], three_cases["scrambled"]
    assert original.probe_loss < 0.9  # the probe found structure in real latents
    assert scrambled.probe_loss >= 1.2 * original.probe_loss
    assert scrambled.high_frequency_energy > original.high_frequency_energy + 0.2


@pytest.mark.slow  # the three probes: ~1 min each on a busy CPU
def test_channel_rotation_changes_little(three_cases):
    original, rotated = three_cases["original"], three_cases["rotated"]
    assert abs(rotated.probe_loss / original.probe_loss - 1) < 0.10


@pytest.mark.slow  # the three probes: ~1 min each on a busy CPU
def test_gaussian_noise_scores_one(three_cases):
    gaussian = three_cases["gaussian"]
    assert gaussian.probe_loss == pytest.approx(1.0, abs=0.1)
    assert all(0.9 < ratio < 1.1 for ratio in gaussian.loss_curve)
    assert gaussian.high_frequency_energy == pytest.approx(gaussian.spectrum.high_frequency_area, abs=0.02)
    record = json.loads(json.dumps(gaussian.to_dict()))  # plain JSON
    assert record["settings"]["steps"] == 60 and record["settings"]["num_held_out"] == 32


def test_same_seed_same_numbers():
    latents = torch.randn(40, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cumsum(-1)
    first, second = (measure_diffusability(latents, steps=6, seed=3) for _ in range(2))
    assert first.probe_loss == second.probe_loss and first.loss_curve == second.loss_curve
    assert first.train_loss_curve == second.train_loss_curve
    other = measure_diffusability(latents, steps=6, seed=4)
    assert other.loss_curve != first.loss_curve


def test_video_latents_and_decoded_samples():
    latents = torch.randn(24, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).cumsum(2)
    result = measure_diffusability(latents, steps=3, held_out=8)
    assert "per frame" in result.settings["denoiser"]["class"] and result.spectrum.temporal_power is not None
    vae = make_vae(0)  # factor 4: latents 8x8 -> 32x32 pixels
    images = measure_diffusability(latents[:, :, 0], steps=3, vae=vae, num_samples=3, sample_steps=2)
    assert images.samples.shape == (3, 3, 32, 32) and images.samples.abs().max() <= 1
    with torch.no_grad():  # the samples are the VAE's decoding of the probe's raw-space samples
        expected = vae.decode(images.sample_latents).sample.clamp(-1, 1)
    torch.testing.assert_close(images.samples, expected)


def test_bad_input_fails_clearly():
    good = torch.randn(40, 4, 8, 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        measure_diffusability(good.clone().index_fill_(0, torch.tensor([5]), float("nan")), steps=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        measure_diffusability(good.clone().index_fill_(0, torch.tensor([7]), float("inf")), steps=1)
    with pytest.raises(ValueError, match="at least 24 latents"):
        measure_diffusability(good[:20], steps=1)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        measure_diffusability(good[0], steps=1)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        latent_spectrum(good[0])
    with pytest.raises(TypeError, match="latent tensor"):
        measure_diffusability([good], steps=1)


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    write_sample_photos(folder, num_faces=34)  # 6 photos + 34 faces: 40 images
    return folder


def test_a_latent_cache_as_input(tmp_path, face_folder):
    from diffusers_vae_ext.cache import LatentCacheDataset, precompute_latents

    vae = make_vae(0)
    precompute_latents(vae, tmp_path / "cache", train_data_dir=face_folder, resolution=32, center_crop=True,
                       batch_size=8, num_workers=0, progress=False)  # fmt: skip
    dataset = LatentCacheDataset(tmp_path / "cache", seed=0)
    expected = torch.stack([LatentCacheDataset(tmp_path / "cache", scale=False)[i]["latents"] for i in range(40)])
    from_tensor = measure_diffusability(expected, steps=3)
    from_dataset = measure_diffusability(dataset, steps=3, vae=vae, num_samples=2, sample_steps=2)
    from_path = measure_diffusability(str(tmp_path / "cache"), steps=3)
    # A URL is streamed (LatentCacheIterableDataset); fsspec's in-memory file system stands in for object storage.
    fsspec = pytest.importorskip("fsspec", reason="cache URLs need fsspec (the [scale] extra)")
    fsspec.filesystem("memory").put(str(tmp_path / "cache"), "/diffusability-cache", recursive=True)
    from_url = measure_diffusability("memory://diffusability-cache", steps=3, vae=vae)
    # Raw (unscaled) latents, posterior draws as training reads them in epoch 0: the same numbers as the tensor.
    assert from_dataset.loss_curve == from_tensor.loss_curve == from_path.loss_curve == from_url.loss_curve
    assert from_dataset.samples.shape == (2, 3, 32, 32) and from_dataset.settings["source"].endswith("cache")
    for source in (dataset, "memory://diffusability-cache"):
        with pytest.raises(ValueError, match="made by another VAE"):
            measure_diffusability(source, steps=1, vae=make_vae(1), num_samples=2)


# ------------------------------------------------------------------------------------------------------ eval
def test_eval_report_has_the_diffusability_section(tmp_path, face_folder):
    out = tmp_path / "report"
    make_vae(0).save_pretrained(tmp_path / "a")
    make_vae(1, latent_channels=8).save_pretrained(tmp_path / "b")
    argv = ["eval", "--vae", f"four={tmp_path / 'a'}", "--vae", f"eight={tmp_path / 'b'}", "--train_data_dir",
            str(face_folder), "--output_dir", str(out), "--resolution", "32", "--diffusability", "--probe_steps",
            "3", "--probe_samples", "4", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for vae in summary["vaes"]:
        record = vae["diffusability"]
        assert 0 < record["probe_loss"] < 1.5 and record["settings"]["steps"] == 3
        assert record["settings"]["num_latents"] == 40 and len(record["loss_curve"]) == 9
        assert Image.open(out / record["sample_grid"]).size == (2 * 32 + 2, 2 * 32 + 2)
    assert summary["vaes"][1]["diffusability"]["spectrum"]["shape"] == [8, 8, 8]
    page, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert 'id="diffusability"' in page and "## Diffusability" in markdown
    for plot in summary["settings"]["diffusability"]["plots"].values():
        assert Image.open(out / plot).size[0] > 300 and plot in page and plot in markdown
    assert "| four |" in markdown.split("## Diffusability")[1] and "| eight |" in markdown.split("## Diffusability")[1]


def test_eval_with_too_few_images_reports_the_skip(tmp_path):
    result = evaluate([EvalVAE("a", as_autoencoder(make_vae(0)))], tmp_path, resolution=32, diffusability=True,
                      probe_steps=2, show_progress=False)  # fmt: skip
    assert "at least 24 latents" in result.vaes[0].diffusability["skipped"]
    paths = write_report(result)
    assert "skipped: The probe needs" in paths["markdown"].read_text()


def test_an_interrupted_probe_keeps_the_rows(tmp_path, face_folder, monkeypatch):
    calls = {"n": 0}
    predict = probe_module.predict_velocity

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of the probe's training
            raise KeyboardInterrupt
        return predict(*args, **kwargs)

    monkeypatch.setattr(probe_module, "predict_velocity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate([EvalVAE("a", as_autoencoder(make_vae(0)))], tmp_path, train_data_dir=face_folder, resolution=32,
                 diffusability=True, probe_steps=10, show_progress=False)  # fmt: skip
    assert calls["n"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(math.isfinite(row["psnr"]) for row in rows)
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 41
    summary = json.loads((tmp_path / "summary.json").read_text())  # the reconstruction summary, written before
    assert summary["settings"]["num_images"] == 40 and summary["vaes"][0]["diffusability"] is None


def test_eval_sample_fid_with_inception_weights(tmp_path, face_folder, monkeypatch):
    """The sample FID is the Frechet distance between the features of the evaluated images and of the decoded probe
    samples. A cheap stand-in for the Inception (pooled pixels) records what it is given, so the value is checked
    exactly; the Inception itself is tested in test_evaluation.py."""
    from diffusers_vae_ext.evaluation import inception as inception_module
    from diffusers_vae_ext.evaluation.fid import frechet_distance_of_features

    calls = []

    def features(images):
        calls.append(images.clone())
        return F.adaptive_avg_pool2d(images, 2).flatten(1)  # 12 features

    monkeypatch.setattr(inception_module, "load_inception", lambda weights: features)
    result = evaluate([EvalVAE("a", as_autoencoder(make_vae(0)))], tmp_path, train_data_dir=face_folder,
                      resolution=32, num_images=24, batch_size=8, inception_weights="stand-in", diffusability=True,
                      probe_steps=2, probe_samples=5, show_progress=False)  # fmt: skip
    record = result.vaes[0].diffusability
    originals, samples = torch.cat(calls[0:6:2]), calls[-1]  # per batch: originals, then reconstructions
    assert originals.shape == (24, 3, 32, 32) and samples.shape == (5, 3, 32, 32)
    expected = frechet_distance_of_features(features(originals).double().numpy(), features(samples).double().numpy())
    assert record["sample_fid_count"] == 5 and record["sample_fid"] == pytest.approx(expected, rel=1e-9)
    assert "(n=5)" in write_report(result)["markdown"].read_text()
