"""Latent cache with every autoencoder class and with video: a real pan-and-zoom mp4 through a tiny Wan, bad video
files listed, deterministic classes stored once, the class's own scaling in both readers, bad options refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from autoencoder_configs import EXPECTED, TINY_CONFIGS, build_tiny, own_decode, own_encode
from conftest import photo_batch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader

pytest.importorskip("av", reason="PyAV is not installed (pip install 'diffusers-vae-ext[video]')")

from test_video import VFR_TIMES, write_audio_only  # noqa: E402

from diffusers_vae_ext.autoencoders import load_autoencoder  # noqa: E402
from diffusers_vae_ext.cache import (  # noqa: E402
    BucketBatchSampler,
    CacheMismatchError,
    LatentCacheDataset,
    LatentCacheIterableDataset,
    precompute_latents,
)
from diffusers_vae_ext.cli import main  # noqa: E402
from diffusers_vae_ext.data import pil_to_tensor, resize_and_crop  # noqa: E402
from diffusers_vae_ext.video import (  # noqa: E402
    ClipOptions,
    clips_from_file,
    load_clip,
    pan_zoom_frames,
    probe_image_sequence,
    read_frames,
    write_pan_zoom_video,
)

CLIPS = ClipOptions(num_frames=9, clips_per_video=2)
RUN = dict(resolution=32, batch_size=2, num_workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def video_folder(workdir) -> Path:
    """A real 20-frame pan and zoom over the astronaut photo (two 9-frame clips), a caption, and bad files."""
    root = workdir / "videos"
    (root / "bad").mkdir(parents=True)
    write_pan_zoom_video(root / "astronaut.mp4", "astronaut", num_frames=20, size=(48, 64))
    (root / "astronaut.txt").write_text("an astronaut, panning\n")
    write_pan_zoom_video(root / "bad" / "short.mp4", "chelsea", num_frames=5, size=(32, 32))
    (root / "bad" / "zero.mp4").write_bytes(b"")
    write_audio_only(root / "bad" / "audio.mp4")
    write_pan_zoom_video(
        root / "bad" / "vfr.mkv", "coffee", num_frames=len(VFR_TIMES), size=(32, 32), timestamps=VFR_TIMES
    )
    return root


def save_tiny(workdir: Path, name: str) -> Path:
    folder = workdir / f"vae_{name}"
    if not folder.exists():
        build_tiny(name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wan_cache(workdir, video_folder) -> Path:
    vae = save_tiny(workdir, "AutoencoderKLWan")
    precompute_latents(vae, workdir / "wan", train_data_dir=video_folder, clip_options=CLIPS, **RUN)
    return workdir / "wan"


def expected_clips(video_folder: Path, frame_multiple: int):
    """The clips and pixels (1, 3, T, 32, 32) as the video module cuts them (the same path `stats` takes)."""
    clips = clips_from_file(video_folder / "astronaut.mp4", CLIPS, frame_multiple)
    return [(clip, load_clip(clip, (32, 32))[None]) for clip in clips]


def items_by_id(dataset) -> dict[str, dict]:
    return {item["id"]: item for item in (dataset[i] for i in range(len(dataset)))}


def assert_same_items(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


# ------------------------------------------------------------------------------------------------- video, Wan
@torch.no_grad()
def test_wan_clips_equal_the_class_encode_and_decode_through_the_reader(workdir, video_folder, wan_cache):
    model = load_autoencoder(workdir / "vae_AutoencoderKLWan").vae
    dataset = LatentCacheDataset(wan_cache, sample_posterior=False, scale=False, return_moments=True)
    items = items_by_id(dataset)
    expected = expected_clips(video_folder, 4)
    assert len(items) == len(expected) == 2
    for clip, pixels in expected:
        (item,) = [v for k, v in items.items() if k.startswith(f"astronaut.mp4#clip{clip.index}@")]
        moments = own_encode(model, pixels)[0]  # diffusers' AutoencoderKLWan.encode on the same clip
        torch.testing.assert_close(torch.cat([item["mean"], item["logvar"]]), moments, rtol=1e-5, atol=1e-5)
        assert item["latents"].shape == (4, 3, 4, 4)  # (C, 1 + (9 - 1) / 4, 32 / 8, 32 / 8)
        assert item["caption"] == "an astronaut, panning"
        assert item["num_frames"] == 9 and item["clip"] == clip.index
        assert item["fps"].item() == pytest.approx(24.0)
        assert item["frame_indices"].tolist() == list(clip.frame_indices)
        assert item["original_size"].tolist() == [48, 64] and item["bucket"].tolist() == [9, 32, 32]
        decoded = own_decode(model, item["latents"][None])
        assert decoded.shape == (1, 3, 9, 32, 32)
        torch.testing.assert_close(decoded, own_decode(model, moments[None, :4]), rtol=1e-4, atol=1e-4)
    assert [i["frame_indices"][0].item() for i in items.values()] == [0, 11]  # non-overlapping, spread out

    # Scaled as Wan's pipelines do it: (z - latents_mean) / latents_std per channel, read from the provenance.
    scaled = items_by_id(LatentCacheDataset(wan_cache, sample_posterior=False))
    config = model.config
    mean = torch.tensor(config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(-1, 1, 1, 1)
    for key, item in items.items():
        torch.testing.assert_close(scaled[key]["latents"], (item["latents"] - mean) / std)


def test_bad_videos_are_listed_and_the_good_clips_kept(wan_cache):
    skipped = {
        Path(row["source"]).name: row
        for row in map(json.loads, (wan_cache / "skipped.jsonl").read_text().splitlines())
    }
    assert {name: row["kind"] for name, row in skipped.items()} == {
        "short.mp4": "too_short",
        "zero.mp4": "unreadable",
        "audio.mp4": "no_video_stream",
        "vfr.mkv": "variable_frame_rate",
    }
    assert "5 frames, fewer than the 9" in skipped["short.mp4"]["reason"]
    assert "zero-byte" in skipped["zero.mp4"]["reason"] and "--fps" in skipped["vfr.mkv"]["reason"]
    info = json.loads((wan_cache / "cache.json").read_text())
    assert info["counts"]["samples"] == 2 and info["counts"]["skipped"] == 4
    assert info["provenance"]["vae"]["class_name"] == "AutoencoderKLWan"
    assert info["provenance"]["moments"]["kind"] == "moments"
    assert info["provenance"]["preprocessing"]["video"]["num_frames"] == 9


def test_both_readers_draw_the_same_fresh_latents_each_sample_once(wan_cache):
    mapped = LatentCacheDataset(wan_cache, seed=3)
    for epoch in (0, 1):
        mapped.set_epoch(epoch)
        reference = items_by_id(mapped)
        halves = [
            list(LatentCacheIterableDataset(wan_cache, seed=3, epoch=epoch, rank=rank, world_size=2))
            for rank in (0, 1)
        ]
        streamed = [item for half in halves for item in half]
        assert sorted(item["id"] for item in streamed) == sorted(reference)  # each clip once over the ranks
        for item in streamed:
            assert_same_items(item, reference[item["id"]])
    first, second = (LatentCacheDataset(wan_cache, seed=3) for _ in range(2))
    second.set_epoch(1)
    assert not torch.equal(first[0]["latents"], second[0]["latents"])  # a fresh draw each epoch
    batch = next(iter(LatentCacheIterableDataset(wan_cache, batch_size=2)))
    assert batch["latents"].shape == (2, 4, 3, 4, 4) and batch["frame_indices"].shape == (2, 9)
    loader = DataLoader(mapped, batch_sampler=BucketBatchSampler(mapped, batch_size=2))
    (batch,) = list(loader)
    assert batch["latents"].shape == (2, 4, 3, 4, 4) and batch["bucket"].tolist() == [[9, 32, 32]] * 2


def test_rerun_resumes_without_encoding_and_another_class_is_refused(workdir, video_folder, wan_cache, monkeypatch):
    from diffusers_vae_ext.cache import unit

    shards = {p: p.stat().st_mtime_ns for p in (wan_cache / "shards").iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("a complete unit was encoded again")

    monkeypatch.setattr(unit.Encoder, "__call__", refuse)
    vae = workdir / "vae_AutoencoderKLWan"
    summary = precompute_latents(vae, wan_cache, train_data_dir=video_folder, clip_options=CLIPS, **RUN)
    assert (summary.cached, summary.new, summary.resumed) == (2, 0, 2)
    assert {p: p.stat().st_mtime_ns for p in (wan_cache / "shards").iterdir()} == shards

    tiny = save_tiny(workdir, "AutoencoderTiny")
    with pytest.raises(CacheMismatchError, match="VAE class: cache built with AutoencoderKLWan, this VAE is Auto"):
        precompute_latents(tiny, wan_cache, train_data_dir=video_folder, clip_options=CLIPS, **RUN)


def test_frame_counts_the_vae_cannot_encode_are_refused_before_work(workdir, video_folder, capsys):
    vae = workdir / "vae_AutoencoderKLWan"
    if not vae.exists():
        build_tiny("AutoencoderKLWan").save_pretrained(vae)
    with pytest.raises(ValueError, match=r"4k \+ 1 frames. Use --num_frames 5 or 9"):
        precompute_latents(vae, workdir / "never", train_data_dir=video_folder, clip_options=ClipOptions(8), **RUN)
    assert not (workdir / "never").exists()
    command = ["cache", "--vae", str(vae), "--train_data_dir", str(video_folder), "--output_dir"]
    assert main([*command, str(workdir / "never"), "--num_frames", "12", "--resolution", "32"]) == 2
    assert "--num_frames 12 is not a frame count AutoencoderKLWan encodes" in capsys.readouterr().err
    assert not (workdir / "never").exists()


# ------------------------------------------------------------------------------------------------- other classes
@torch.no_grad()
def test_deterministic_latents_are_stored_once_and_returned_without_a_draw(workdir, video_folder):
    """AutoencoderTiny on the video (frames encoded as images, as stats does) is exactly its own `encode`; the
    mirrored clips (`flip`) are the mirrored frames, mirrored before the centre crop as images are."""
    vae = save_tiny(workdir, "AutoencoderTiny")
    model = load_autoencoder(vae).vae
    out = workdir / "tiny"
    run = {**RUN, "batch_size": 1, "flip": True}
    precompute_latents(vae, out, train_data_dir=video_folder, clip_options=CLIPS, **run)
    info = json.loads((out / "cache.json").read_text())
    assert info["provenance"]["moments"]["kind"] == "latents"
    assert info["provenance"]["moments"]["frame_axis"] == "frames"
    raw = items_by_id(LatentCacheDataset(out, scale=False, return_moments=True))
    drawn = items_by_id(LatentCacheDataset(out, seed=5, sample_posterior=True))
    for clip, pixels in expected_clips(video_folder, 1):
        (key,) = [k for k in raw if k.startswith(f"astronaut.mp4#clip{clip.index}@") and "flip" not in k]
        own = model.encode(pixels[0].transpose(0, 1)).latents.transpose(0, 1)  # (C, T, h, w)
        assert torch.equal(raw[key]["latents"], own)
        assert "logvar" not in raw[key] and torch.equal(raw[key]["mean"], own)
        torch.testing.assert_close(drawn[key]["latents"], own * TINY_CONFIGS["AutoencoderTiny"]["scaling_factor"])
        mirrored = [resize_and_crop(Image.fromarray(f[:, ::-1]), (32, 32))[0] for f in read_frames(clip)]
        own = model.encode(torch.stack([pil_to_tensor(image) for image in mirrored])).latents.transpose(0, 1)
        assert torch.equal(raw[key + ":flip"]["latents"], own) and raw[key + ":flip"]["flip"]
    assert len(raw) == 4
    with safe_open(str(next((out / "shards").iterdir())), framework="pt") as handle:
        assert handle.get_tensor(handle.keys()[0]).shape[0] == 4  # C channels stored, not 2C


@pytest.mark.parametrize("name", ["AutoencoderDC", "AutoencoderKLQwenImage", "AutoencoderKLLTXVideo"])
@torch.no_grad()
def test_images_with_other_classes_and_their_pipeline_scaling(workdir, name):
    """Photos through DC (deterministic), Qwen-Image (images as one-frame videos), LTX-Video (statistics in the
    weights): stored tensors equal the class's own encode, and scaling is the class's pipeline convention."""
    photos = workdir / "photos"
    if not photos.exists():
        photos.mkdir()
        for index, pixels in enumerate(photo_batch(32, ("astronaut", "coffee"))):
            array = pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(array).save(photos / f"{index}.png")
    vae = save_tiny(workdir, name)
    adapter = load_autoencoder(vae)
    out = workdir / f"images_{name}"
    precompute_latents(vae, out, train_data_dir=photos, **{**RUN, "batch_size": 1})
    raw = LatentCacheDataset(out, sample_posterior=False, scale=False, return_moments=True)
    scaled = LatentCacheDataset(out, sample_posterior=False)
    pixels = photo_batch(32, ("astronaut", "coffee"))
    for index in range(2):
        item = raw[index]
        source = int(item["id"].split("@")[0].removesuffix(".png"))
        x = pixels[source : source + 1]
        x = x.unsqueeze(2) if adapter.is_video else x
        own = own_encode(adapter.vae, x)[0]
        stored = item["mean"] if not adapter.has_posterior else torch.cat([item["mean"], item["logvar"]])
        torch.testing.assert_close(stored, own, rtol=1e-5, atol=1e-5)
        expected_shape = (adapter.latent_channels, 1, 32 // 8, 32 // 8) if adapter.is_video else None
        if expected_shape:
            assert item["latents"].shape == expected_shape
        torch.testing.assert_close(scaled[index]["latents"], adapter.scale(item["latents"][None])[0])
    if name == "AutoencoderKLLTXVideo":  # the per-channel statistics live in the weights, not the config
        expected = (raw[0]["latents"] - adapter.vae.latents_mean.view(-1, 1, 1, 1)) * 1.3
        torch.testing.assert_close(scaled[0]["latents"], expected / adapter.vae.latents_std.view(-1, 1, 1, 1))
    assert EXPECTED[name][1] == adapter.has_posterior


@torch.no_grad()
def test_cli_image_sequences_are_clips_too(workdir, capsys):
    """`diffusers-vae cache --image_sequence`: a folder of PNG frames is one video (frames in natural order)."""
    root = workdir / "sequences" / "rocket"
    root.mkdir(parents=True)
    for index, frame in enumerate(pan_zoom_frames("rocket", num_frames=10, size=(40, 40))):
        Image.fromarray(frame).save(root / f"frame_{index + 1}.png")  # frame_2 sorts before frame_10
    vae = save_tiny(workdir, "AutoencoderKLWan")
    out = workdir / "sequence_cache"
    args = ["--vae", str(vae), "--train_data_dir", str(root.parent), "--output_dir", str(out), "--image_sequence"]
    assert main(["cache", *args, "--resolution", "32", "--dataloader_num_workers", "0"]) == 0
    assert "cached 1 samples (1 encoded now, 0 resumed)" in capsys.readouterr().out
    (item,) = [LatentCacheDataset(out, sample_posterior=False, scale=False, return_moments=True)[0]]
    assert item["id"].startswith("rocket#clip0@") and item["num_frames"] == 9  # --max_frames 33, cut to 4k + 1
    (clip,) = clips_from_file(root, ClipOptions(max_frames=33), 4)
    assert clip.frame_files[1].endswith("frame_2.png")
    pixels = load_clip(clip, (32, 32))[None]
    own = own_encode(load_autoencoder(vae).vae, pixels)[0]
    torch.testing.assert_close(torch.cat([item["mean"], item["logvar"]]), own, rtol=1e-5, atol=1e-5)
    assert probe_image_sequence(root).num_frames == 10


def test_stats_of_a_video_cache_count_clips(workdir, wan_cache, capsys):
    """`diffusers-vae stats --cache_dir` on a clip cache: per-channel statistics over every latent frame."""
    vae = workdir / "vae_AutoencoderKLWan"
    assert (
        main(["stats", "--vae", str(vae), "--cache_dir", str(wan_cache), "--no-sample_posterior", "--no_progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "Latent statistics of 2 clips" in out
    record = json.loads(out.strip().splitlines()[-1])
    means = torch.stack(
        [item["latents"] for item in LatentCacheDataset(wan_cache, sample_posterior=False, scale=False)]
    )
    expected = means.transpose(0, 1).flatten(1).double().mean(1)
    torch.testing.assert_close(torch.tensor(record["latents_mean"], dtype=torch.float64), expected)
    assert record["unit"] == "clip"
