"""Latent scaling conventions and latent statistics (`diffusers_vae_ext.scaling`, `diffusers-vae stats`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cpu_launch, make_vae
from PIL import Image

from diffusers_vae_ext import stats as stats_module
from diffusers_vae_ext.data import pil_to_tensor, sample_photos, write_sample_photos
from diffusers_vae_ext.scaling import (
    LatentStatistics,
    estimate_latent_statistics,
    scale_latents,
    scaling_convention,
    unscale_latents,
    write_latent_statistics,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compute_scaling_factor.py"

SD_CONFIG = {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None}
SD3_CONFIG = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None, "latents_std": None}
PER_CHANNEL_CONFIG = {
    "scaling_factor": 0.5,
    "shift_factor": None,
    "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
    "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


# ------------------------------------------------------------------------------------------ conventions


def pipeline_unscale(latents: torch.Tensor, config: dict) -> torch.Tensor:
    """What diffusers' pipelines do right before `vae.decode`, written out from their source (diffusers 0.42)."""
    if config["latents_mean"] is not None and config["latents_std"] is not None:
        # pipeline_stable_diffusion_xl.py: latents * latents_std / scaling_factor + latents_mean
        mean = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config["latents_std"]).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config["scaling_factor"] + mean
    if config["shift_factor"] is not None:
        # pipeline_stable_diffusion_3.py / pipeline_flux.py: (latents / scaling_factor) + shift_factor
        return (latents / config["scaling_factor"]) + config["shift_factor"]
    # pipeline_stable_diffusion.py: vae.decode(latents / scaling_factor)
    return latents / config["scaling_factor"]


def pipeline_scale(latents: torch.Tensor, config: dict) -> torch.Tensor:
    """The encode side, as SDXL img2img (`prepare_latents`), SD3 and SD img2img write it."""
    if config["latents_mean"] is not None and config["latents_std"] is not None:
        mean = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config["latents_std"]).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) * config["scaling_factor"] / std
    if config["shift_factor"] is not None:
        return (latents - config["shift_factor"]) * config["scaling_factor"]
    return config["scaling_factor"] * latents


@pytest.mark.parametrize(
    "config, convention",
    [(SD_CONFIG, "scale"), (SD3_CONFIG, "shift"), (PER_CHANNEL_CONFIG, "per_channel")],
)
def test_scale_unscale_are_inverses_and_match_the_pipelines(config, convention):
    assert scaling_convention(config) == convention
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) * 5 + 1
    scaled = scale_latents(raw, config)
    torch.testing.assert_close(unscale_latents(scaled, config), raw, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(scale_latents(unscale_latents(raw, config), config), raw, rtol=1e-13, atol=1e-13)
    # Against the pipelines' own arithmetic, in the float32 they run in.
    raw32, scaled32 = raw.float(), scaled.float()
    torch.testing.assert_close(unscale_latents(scaled32, config), pipeline_unscale(scaled32, config))
    torch.testing.assert_close(scale_latents(raw32, config), pipeline_scale(raw32, config))


def test_per_channel_stats_with_the_wrong_channel_count_are_refused():
    with pytest.raises(ValueError, match="4/4 entries but the latents have 16 channels"):
        unscale_latents(torch.zeros(1, 16, 4, 4), PER_CHANNEL_CONFIG)
    with pytest.raises(ValueError, match="channels"):
        scale_latents(torch.zeros(1, 16, 4, 4), PER_CHANNEL_CONFIG)


# ------------------------------------------------------------------------------------------ synthetic statistics

CHANNEL_MEAN = torch.tensor([0.5, -1.0, 2.0, 30.0], dtype=torch.float64)
CHANNEL_STD = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)


def synthetic_latents(num_images: int, size: int = 16, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_images, 4, size, size, generator=generator, dtype=torch.float64)
    return noise * CHANNEL_STD.view(1, 4, 1, 1) + CHANNEL_MEAN.view(1, 4, 1, 1) + offset


def assert_same_statistics(a: LatentStatistics, b: LatentStatistics, tolerance: float = 1e-12) -> None:
    assert (a.count, a.num_images) == (b.count, b.num_images)
    assert max_rel(a.channel_mean, b.channel_mean) <= tolerance
    assert max_rel(a.channel_std, b.channel_std) <= tolerance
    for name in ("mean", "std", "scaling_factor", "shift_factor", "scaling_factor_stderr", "shift_factor_stderr"):
        assert rel(getattr(a, name), getattr(b, name)) <= tolerance, name
    assert max_rel(a.channel_std_stderr, b.channel_std_stderr) <= tolerance


def test_synthetic_latents_of_known_mean_and_std_are_recovered():
    latents = synthetic_latents(400)
    stats = LatentStatistics().update(latents)
    n = stats.count
    assert n == 400 * 16 * 16 and stats.num_images == 400 and stats.num_channels == 4
    # The population values, within 5 sampling standard errors.
    assert ((stats.channel_mean - CHANNEL_MEAN).abs() < 5 * CHANNEL_STD / n**0.5).all()
    assert ((stats.channel_std - CHANNEL_STD).abs() < 5 * CHANNEL_STD / (2 * n) ** 0.5).all()
    # The sample values exactly (float64 two-pass reference), global std with the between-channel term.
    flat = latents.transpose(0, 1).reshape(4, -1)
    assert max_rel(stats.channel_mean, flat.mean(1)) < 1e-12
    assert max_rel(stats.channel_std, flat.std(1, correction=0)) < 1e-12
    assert rel(stats.std, latents.std(correction=0).item()) < 1e-12
    assert rel(stats.mean, latents.mean().item()) < 1e-12
    assert rel(stats.scaling_factor, 1 / latents.std(correction=0).item()) < 1e-12
    assert stats.shift_factor == stats.mean
    # Scaling with the measured numbers gives unit variance under every convention.
    for convention in ("scale", "shift", "per_channel"):
        scaled = scale_latents(latents, stats.config_updates(convention))
        assert rel(scaled.std(correction=0).item(), 1.0) < 1e-12, convention
        if convention != "scale":
            assert abs(scaled.mean().item()) < 1e-12, convention
    per_channel = scale_latents(latents, stats.config_updates("per_channel")).transpose(0, 1).reshape(4, -1)
    assert max_rel(per_channel.std(1, correction=0), torch.ones(4, dtype=torch.float64)) < 1e-12


def test_large_offsets_keep_float64_precision():
    # E[z^2] - E[z]^2 would lose every digit here (z ~ 1e8, std ~ 1); Chan's update keeps them.
    latents = synthetic_latents(64, offset=1e8)
    stats = LatentStatistics()
    for chunk in latents.split(5):
        stats.update(chunk)
    centred = LatentStatistics()
    for chunk in (latents - 1e8).split(5):
        centred.update(chunk)
    flat = latents.transpose(0, 1).reshape(4, -1)
    assert max_rel(stats.channel_std, flat.std(1, correction=0)) < 1e-8
    assert rel(stats.std, centred.std) < 1e-8
    assert rel(stats.scaling_factor_stderr, centred.scaling_factor_stderr) < 1e-6


def test_streaming_small_batches_equals_one_big_batch():
    latents = synthetic_latents(97, size=8, seed=1)
    whole = LatentStatistics().update(latents)
    streamed = LatentStatistics()
    sizes = [1, 2, 3, 5, 8, 13, 21, 44]
    for chunk in latents.split(sizes):
        streamed.update(chunk)
    assert_same_statistics(streamed, whole)


def test_merging_shards_equals_the_whole_and_round_trips_through_json():
    latents = synthetic_latents(90, size=8, seed=2)
    whole = LatentStatistics().update(latents)
    shards = [latents[:7], latents[7:7], latents[7:50], latents[50:]]  # one empty shard
    parts = []
    for shard in shards:
        part = LatentStatistics(num_channels=4)
        for chunk in shard.split(4):
            part.update(chunk)
        parts.append(part)
    merged = LatentStatistics()
    for part in parts:
        merged.merge(part)
    assert_same_statistics(merged, whole)
    restored = LatentStatistics.from_dict(json.loads(json.dumps(merged.to_dict())))
    assert_same_statistics(restored, merged, tolerance=0.0)
    with pytest.raises(ValueError, match="posterior samples"):
        LatentStatistics(sample_posterior=True).merge(LatentStatistics(sample_posterior=False))
    with pytest.raises(ValueError, match="channels"):
        LatentStatistics().update(latents).merge(LatentStatistics().update(torch.zeros(1, 3, 2, 2)))


class FakeRank:
    """Stands in for an `Accelerator` on one rank: `gather` returns every rank's tensor, in rank order."""

    def __init__(self, all_stats: list[LatentStatistics]):
        self.all_stats, self.num_processes, self.device = all_stats, len(all_stats), torch.device("cpu")
        self.calls = 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:  # the channel counts
            return torch.tensor([float(s.num_channels or 0) for s in self.all_stats], dtype=torch.float64)
        channels = next(s.num_channels for s in self.all_stats if s.num_channels)
        return torch.stack([s._pack(channels) for s in self.all_stats])


def test_gather_merges_all_ranks_in_rank_order():
    latents = synthetic_latents(30, size=8, seed=3)
    whole = LatentStatistics(sample_posterior=True).update(latents)
    ranks = [LatentStatistics(sample_posterior=True).update(latents[r::3]) for r in range(3)]
    ranks.append(LatentStatistics(sample_posterior=True))  # a rank that got no data and knows no channel count
    merged = ranks[3].gather(FakeRank(ranks))
    # The shards hold the same images in another order: equal up to float64 rounding.
    assert_same_statistics(merged, whole, tolerance=1e-12)
    assert merged.sample_posterior is True
    assert LatentStatistics().update(latents).gather(None).std == whole.std


def test_standard_error_counts_images_not_pixels():
    """Pixels within an image share an offset: the reported error must match the spread over repeated datasets."""
    generator = torch.Generator().manual_seed(4)
    factors, errors = [], []
    for _ in range(300):
        offsets = torch.randn(24, 2, 1, 1, generator=generator, dtype=torch.float64) * 0.8
        scales = torch.exp(torch.randn(24, 1, 1, 1, generator=generator, dtype=torch.float64) * 0.3)
        latents = offsets + scales * torch.randn(24, 2, 6, 6, generator=generator, dtype=torch.float64)
        stats = LatentStatistics().update(latents)
        factors.append(stats.scaling_factor)
        errors.append(stats.scaling_factor_stderr)
    spread = torch.tensor(factors).std().item()
    reported = torch.tensor(errors).mean().item()
    assert 0.8 < reported / spread < 1.25
    # Treating the 24 * 2 * 36 elements as independent (se(var) = var * sqrt(2 / elements) for Gaussian data)
    # would claim several times less error than there is.
    elements = stats.count * stats.num_channels
    naive = stats.scaling_factor * (2 / elements) ** 0.5 / 2
    assert spread > 3 * naive


def test_statistics_refuse_bad_latents():
    with pytest.raises(ValueError, match="No latents"):
        _ = LatentStatistics().std
    with pytest.raises(ValueError, match="NaN or Inf"):
        LatentStatistics().update(torch.tensor([[[[float("nan")]]]]))
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        LatentStatistics().update(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="Unknown convention"):
        LatentStatistics().update(torch.randn(2, 4, 2, 2)).config_updates("sdxl")
    single = LatentStatistics().update(torch.randn(1, 4, 2, 2))
    assert single.scaling_factor_stderr != single.scaling_factor_stderr  # NaN: one image gives no error estimate


# ------------------------------------------------------------------------------------------ real photos


def random_crops(count: int, seed: int, size: int = 32) -> torch.Tensor:
    """Crops of random place and scale from scikit-image's photos: an i.i.d. sample of 'natural image' crops."""
    generator = torch.Generator().manual_seed(seed)
    photos = list(sample_photos().values())
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        short = min(photo.size)
        side = int(short * (0.15 + 0.5 * torch.rand(1, generator=generator).item()))
        left = int(torch.randint(photo.width - side + 1, (1,), generator=generator))
        top = int(torch.randint(photo.height - side + 1, (1,), generator=generator))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append(pil_to_tensor(crop))
    return torch.stack(crops)


@pytest.fixture(scope="module")
def crop_sets() -> list[torch.Tensor]:
    """16 independent groups of 10 random 24x24 crops (small: the CPU test budget is tight)."""
    return list(random_crops(160, seed=10, size=24).split(10))


@pytest.fixture(scope="module")
def photo_vae():
    return make_vae(seed=5)


@pytest.fixture(scope="module")
def crop_posteriors(photo_vae, crop_sets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(posterior mean, posterior std) of every group of crops, float64."""
    with torch.no_grad():
        posteriors = [photo_vae.encode(crops).latent_dist for crops in crop_sets]
    return [(p.mean.double(), p.std.double()) for p in posteriors]


def draw(posteriors: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype) for mean, std in posteriors]


def test_computed_factor_gives_unit_std_on_new_photos_within_the_reported_error(photo_vae, crop_sets, crop_posteriors):
    generator = torch.Generator().manual_seed(0)
    fit = estimate_latent_statistics(photo_vae, crop_sets[:8], generator=generator, show_progress=False)
    assert fit.num_images == 80 and fit.sample_posterior is True
    relative_error = fit.scaling_factor_stderr / fit.scaling_factor
    assert relative_error < 0.02  # 80 crops are enough for a useful estimate with this model
    # Scaling fresh latents (other crops, other noise) with the computed factor gives std 1 within the reported
    # errors of both estimates.
    held_out = LatentStatistics()
    for z in draw(crop_posteriors[8:], seed=1):
        held_out.update(z)
    scaled_std = held_out.std * fit.scaling_factor
    combined = (relative_error**2 + (held_out.scaling_factor_stderr / held_out.scaling_factor) ** 2) ** 0.5
    assert abs(scaled_std - 1) < 3 * combined


def test_reported_error_matches_the_spread_between_independent_groups_of_photos(crop_posteriors):
    latents = draw(crop_posteriors, seed=2)
    groups = [LatentStatistics().update(z) for z in latents]
    factors = torch.tensor([g.scaling_factor for g in groups])
    reported = torch.tensor([g.scaling_factor_stderr for g in groups]).mean().item()
    assert 0.5 < reported / factors.std().item() < 2.0
    # The streamed delta-method error equals a leave-one-image-out jackknife over the same images.
    z = torch.cat(latents[:4])
    stats = LatentStatistics().update(z)
    leave_one_out = torch.tensor([1 / torch.cat([z[:i], z[i + 1 :]]).std(correction=0).item() for i in range(len(z))])
    jackknife = ((len(z) - 1) / len(z) * (leave_one_out - leave_one_out.mean()).square().sum()).sqrt().item()
    assert rel(stats.scaling_factor_stderr, jackknife) < 0.05


def test_posterior_samples_have_the_extra_posterior_variance(photo_vae, crop_sets):
    crops = torch.cat(crop_sets[:2])
    samples = estimate_latent_statistics(
        photo_vae, [crops], sample_posterior=True, generator=torch.Generator().manual_seed(1), show_progress=False
    )
    means = estimate_latent_statistics(photo_vae, [crops], sample_posterior=False, show_progress=False)
    assert samples.sample_posterior is True and means.sample_posterior is False
    with torch.no_grad():
        posterior = photo_vae.encode(crops).latent_dist
    torch.testing.assert_close(means.channel_mean, posterior.mean.double().mean(dim=(0, 2, 3)))
    # Var(mean + std * eps) = Var(mean) + E[std^2]: the variances differ by the average posterior variance.
    expected = means.var + posterior.var.double().mean().item()
    assert abs(samples.var - expected) < 3 * samples.var_stderr
    assert samples.var > means.var


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def stats_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stats")
    make_vae(seed=6).save_pretrained(root / "vae")
    images = root / "images"
    write_sample_photos(images, num_faces=10)
    (images / "not_really.png").write_bytes(b"this is not a PNG")
    return root / "vae", images


def parse_json_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == 1, output
    return json.loads(lines[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_processes_equal_one_process(stats_folders, tmp_path, capsys):
    vae, images = stats_folders
    args = ["--vae", str(vae), "--train_data_dir", str(images), "--resolution", "32", "--batch_size", "3"]
    args += ["--no_progress", "--seed", "7"]
    # One process: in this process (saves an interpreter start), through the same command-line parser.
    from diffusers_vae_ext.cli import main

    # One thread like the launched processes (OMP_NUM_THREADS=1): with more, oneDNN's channels_last convolutions
    # split their sums by batch size, and the two runs batch the images differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["stats", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    single_stdout = capsys.readouterr().out
    # The 2-process run writes the config: only the main process may, once.
    config_copy = tmp_path / "vae"
    config_copy.mkdir()
    for file in vae.iterdir():
        (config_copy / file.name).write_bytes(file.read_bytes())
    launch, launch_env = cpu_launch(2, port=free_port())
    double = subprocess.run(
        [*launch, str(SCRIPT), *args, "--vae", str(config_copy), "--write_config"],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **launch_env},
        timeout=300,
    )
    assert double.returncode == 0, double.stderr
    one, two = parse_json_line(single_stdout), parse_json_line(double.stdout)
    assert one["num_images"] == two["num_images"] == 16 and one["skipped"] == two["skipped"] == 1
    assert one["count"] == two["count"] == 16 * 8 * 8
    for key in ("scaling_factor", "scaling_factor_stderr", "shift_factor", "shift_factor_stderr", "std"):
        assert rel(two[key], one[key]) < 1e-6, key
    for key in ("latents_mean", "latents_std", "latents_std_stderr"):
        assert max_rel(torch.tensor(two[key]), torch.tensor(one[key])) < 1e-6, key
    assert double.stdout.count("Updated ") == 1 and double.stdout.count("not_really.png") == 1
    written = json.loads((config_copy / "config.json").read_text())
    assert written["scaling_factor"] == two["scaling_factor"]


def test_run_stats_reports_and_writes_the_config(stats_folders, tmp_path, capsys):
    vae, images = stats_folders
    folder = tmp_path / "vae"
    folder.mkdir()
    for file in vae.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["my_note"] = "keep me"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    record = stats_module.run_stats(
        str(folder),
        train_data_dir=str(images),
        num_images=8,
        resolution=32,
        convention="shift",
        write_config=True,
        show_progress=False,
    )
    output = capsys.readouterr().out
    assert parse_json_line(output) == json.loads(json.dumps(record))
    assert "scaling_factor" in output and "current config" in output
    assert record["num_images"] + record["skipped"] == 8
    assert record["current_config"]["scaling_factor"] == 0.18215
    written = json.loads((folder / "config.json").read_text())
    assert written["my_note"] == "keep me" and list(written)[:-1] == list(config)[:-1]
    assert written["scaling_factor"] == record["scaling_factor"]
    assert written["shift_factor"] == record["shift_factor"]
    assert scaling_convention(written) == "shift"
    assert {k: v for k, v in written.items() if k not in ("scaling_factor", "shift_factor")} == {
        k: v for k, v in config.items() if k not in ("scaling_factor", "shift_factor")
    }


@pytest.mark.parametrize("convention", ["scale", "shift", "per_channel"])
def test_write_latent_statistics_is_atomic_and_keeps_other_keys(tmp_path, monkeypatch, convention):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    make_vae().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["shift_factor"] = 0.1  # stale values of another convention are cleared
    config["extra"] = {"nested": [1, 2]}
    path.write_text(json.dumps(config, indent=2))
    os.chmod(path, 0o644)
    latents = synthetic_latents(20, size=4, seed=8)
    stats = LatentStatistics().update(latents)

    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_latent_statistics(tmp_path, stats, convention)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors"]
    )
    monkeypatch.undo()

    changes = write_latent_statistics(tmp_path, stats, convention)
    written = json.loads(path.read_text())
    assert list(written) == list(config) and written["extra"] == {"nested": [1, 2]}
    assert (path.stat().st_mode & 0o777) == 0o644
    assert scaling_convention(written) == convention
    assert "shift_factor" in changes
    # The written config makes these latents unit-variance, with our helper and with the pipelines' own
    # arithmetic (which turns latents_mean/latents_std into float32 tensors first).
    assert rel(scale_latents(latents, written).std(correction=0).item(), 1.0) < 1e-12
    assert rel(pipeline_scale(latents, written).std(correction=0).item(), 1.0) < 1e-6
    # diffusers loads it.
    loaded = DiffusersAutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == written["scaling_factor"]


def test_empty_folder_and_non_images_give_clear_errors(stats_folders, tmp_path, capsys):
    vae, _ = stats_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name in ("a.png", "b.jpg", "c.webp"):
        (fakes / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="No images found"):
        stats_module.run_stats(str(vae), train_data_dir=str(empty), resolution=32, show_progress=False)
    with pytest.raises(ValueError, match="No images found"):
        stats_module.run_stats(str(vae), train_data_dir=str(texts), resolution=32, show_progress=False)
    with pytest.raises(ValueError, match="None of the 3 samples .* could be used"):
        stats_module.run_stats(str(vae), train_data_dir=str(fakes), resolution=32, show_progress=False)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 4"):
        stats_module.run_stats(str(vae), train_data_dir=str(fakes), resolution=30, show_progress=False)
    with pytest.raises(FileNotFoundError):
        stats_module.run_stats(str(vae), train_data_dir=str(tmp_path / "missing"), resolution=32, show_progress=False)

    from diffusers_vae_ext.cli import main

    # `scripts/compute_scaling_factor.py` is `sys.exit(main(["stats", *argv]))`: the exit code is main's.
    assert main(["stats", "--vae", str(vae), "--train_data_dir", str(fakes), "--resolution", "32"]) == 2
    error = capsys.readouterr().err
    assert "error: None of the 3 samples" in error and "not an image file" in error
    assert main(["stats", "--vae", str(vae), "--train_data_dir", str(empty), "--no_progress"]) == 2
    assert "error: No images found" in capsys.readouterr().err


def test_cache_dir_reads_unscaled_latents_through_the_cache_reader(stats_folders, monkeypatch, capsys):
    """Contract with `diffusers_vae_ext.cache.LatentCacheDataset` (a stand-in here; the real reader is tested
    with real caches in the cache's own tests): unscaled latents, bucketed shapes, a seeded subset."""
    vae, _ = stats_folders
    latents = [synthetic_latents(1, size=4 + 2 * (i % 3), seed=20 + i)[0] for i in range(30)]
    calls = []

    class StandInCacheDataset:
        def __init__(self, path, sample_posterior=True, seed=0, scale=True):
            calls.append(dict(path=path, sample_posterior=sample_posterior, seed=seed, scale=scale))

        def __len__(self):
            return len(latents)

        def __getitem__(self, index):
            return {"latents": latents[index].float(), "caption": ""}

    monkeypatch.setattr(stats_module, "LatentCacheDataset", StandInCacheDataset)
    # An image cache (not clips), as `cache.json` of a real one would say.
    monkeypatch.setattr(stats_module, "load_cache_info", lambda url: {"provenance": {"preprocessing": {}}})
    record = stats_module.run_stats(
        str(vae), cache_dir="some/cache", sample_posterior=False, seed=3, show_progress=False
    )
    assert calls == [dict(path="some/cache", sample_posterior=False, seed=3, scale=False)]
    expected = LatentStatistics()
    for z in latents:
        expected.update(z.float()[None])
    assert record["num_images"] == 30 and record["count"] == expected.count
    assert rel(record["scaling_factor"], expected.scaling_factor) < 1e-12
    assert rel(record["scaling_factor_stderr"], expected.scaling_factor_stderr) < 1e-9
    subset = stats_module.run_stats(str(vae), cache_dir="some/cache", num_images=10, show_progress=False)
    assert subset["num_images"] == 10
    assert '"sample_posterior": false' in capsys.readouterr().out


def test_cache_dir_statistics_equal_those_of_the_images(stats_folders, tmp_path):
    """A real latent cache of the same photos (centre crops at the same resolution) gives the image statistics."""
    from diffusers_vae_ext.cache import precompute_latents

    vae, images = stats_folders
    cache = tmp_path / "cache"
    summary = precompute_latents(
        str(vae), cache, train_data_dir=images, resolution=32, center_crop=True, num_workers=0, progress=False
    )
    assert summary.cached == 16 and summary.skipped == {"unreadable": 1}  # not_really.png, reported too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-independent convolutions: the two runs batch the photos differently
    try:
        common = dict(resolution=32, sample_posterior=False, show_progress=False)
        from_images = stats_module.run_stats(str(vae), train_data_dir=str(images), **common)
        from_cache = stats_module.run_stats(str(vae), cache_dir=str(cache), **common)
    finally:
        torch.set_num_threads(threads)
    assert from_cache["num_images"] == from_images["num_images"] == 16
    assert from_cache["count"] == from_images["count"] == 16 * 4 * 4 * 4
    for key in ("scaling_factor", "shift_factor", "std"):
        assert rel(from_cache[key], from_images[key]) < 1e-5, key
    assert max_rel(torch.tensor(from_cache["latents_std"]), torch.tensor(from_images["latents_std"])) < 1e-5
