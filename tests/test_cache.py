"""Latent cache: writer (bad input, equality with diffusers' encode, kill -9 and resume, accelerate) and reader."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cpu_launch, diffusers_twin, make_vae
from PIL import Image
from safetensors import safe_open

from diffusers_vae_ext.buckets import BucketBatchSampler, closest_bucket, make_buckets
from diffusers_vae_ext.cache import CacheMismatchError, LatentCacheDataset, load_cache_info, precompute_latents
from diffusers_vae_ext.cache.format import CacheSettings
from diffusers_vae_ext.cache.plan import choose_bucket
from diffusers_vae_ext.cache.sources.folder import metadata_captions
from diffusers_vae_ext.data import load_image_rgb, pil_to_tensor, read_captions, resize_and_crop, sample_photos
from diffusers_vae_ext.scaling import scale_latents

REPO = Path(__file__).resolve().parents[1]
# Small shards and batches so a run has many of them (the kill test needs to land between shards).
RUN = dict(resolution=64, flip=True, batch_size=2, shard_size=2, num_workers=0, progress=False)
GOOD = {
    "sub/astronaut.png": "an astronaut",
    "chelsea.png": "a cat",
    "coffee.png": "a cup of coffee",
    "rocket.png": "a rocket",
    "hubble_deep_field.png": "",
    "odd/gray.png": "grayscale",
    "odd/rgba.png": "",
    "odd/cmyk.jpg": "",
    "odd/deep16.png": "",
    "odd/palette.png": "",
}
BAD = {
    "bad/truncated.jpg": "unreadable",  # its header reads fine: the decode fails in the worker
    "bad/corrupt.png": "unreadable",
    "bad/notes.png": "unreadable",
    "bad/empty.jpg": "unreadable",
    "bad/tiny.png": "too_small",
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_photo_folder(root: Path) -> dict[str, np.ndarray]:
    """Real photos, odd-but-valid files and bad files; returns the RGB each odd file must convert to."""
    photos = sample_photos()
    (root / "sub").mkdir(parents=True)
    (root / "odd").mkdir()
    (root / "bad").mkdir()
    photos["astronaut"].save(root / "sub/astronaut.png")
    for name in ("chelsea", "coffee", "rocket", "hubble_deep_field"):
        photos[name].save(root / f"{name}.png")
    metadata = [
        {"file_name": "sub/astronaut.png", "text": "an astronaut"},
        {"file_name": "chelsea.png", "text": "a cat"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    (root / "coffee.txt").write_text("a cup of coffee\n")
    (root / "rocket.caption").write_text("a rocket")

    expected = {}
    gray = photos["coffee"].convert("L")
    gray.save(root / "odd/gray.png")
    (root / "odd/gray.txt").write_text("grayscale")
    expected["odd/gray.png"] = np.repeat(np.asarray(gray)[..., None], 3, axis=2)

    rgb = np.asarray(photos["chelsea"], dtype=np.float64)
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).round(), (rgb.shape[0], 1)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb.astype(np.uint8), alpha]), "RGBA").save(root / "odd/rgba.png")
    a = alpha[..., None] / 255.0
    expected["odd/rgba.png"] = (rgb * a + 255 * (1 - a)).round()  # over white, not black

    photos["rocket"].convert("CMYK").save(root / "odd/cmyk.jpg", quality=95)
    expected["odd/cmyk.jpg"] = np.asarray(photos["rocket"])

    luminance = np.asarray(photos["astronaut"].convert("L"))
    Image.fromarray(luminance.astype(np.uint16) * 257).save(root / "odd/deep16.png")
    assert Image.open(root / "odd/deep16.png").mode.startswith("I")
    expected["odd/deep16.png"] = np.repeat(luminance[..., None], 3, axis=2)

    palette = photos["immunohistochemistry"].quantize(64)
    palette.save(root / "odd/palette.png")
    expected["odd/palette.png"] = np.asarray(palette.convert("RGB"))

    jpeg = io.BytesIO()
    photos["chelsea"].save(jpeg, format="JPEG")
    (root / "bad/truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "bad/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "bad/notes.png").write_text("these are notes, not an image")
    (root / "bad/empty.jpg").write_bytes(b"")
    photos["coffee"].resize((16, 16)).save(root / "bad/tiny.png")
    return expected


pytestmark = pytest.mark.usefixtures("one_thread")


def child_env() -> dict[str, str]:
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def photo_folder(workdir) -> tuple[Path, dict[str, np.ndarray]]:
    expected = write_photo_folder(workdir / "photos")
    return workdir / "photos", expected


@pytest.fixture(scope="module")
def reference_cache(workdir, vae_dir, photo_folder) -> Path:
    """An uninterrupted single-process run: the reference the kill and multi-process runs must equal."""
    precompute_latents(vae_dir, workdir / "reference", train_data_dir=photo_folder[0], **RUN)
    return workdir / "reference"


def read_cache(path: Path) -> dict[str, tuple[dict, torch.Tensor]]:
    """id -> (index record without its shard location, stored moments), checking each id appears once."""
    dataset = LatentCacheDataset(path, sample_posterior=False, scale=False)
    ids = [r["id"] for r in dataset.records]
    assert len(ids) == len(set(ids))
    in_shards = []
    for shard in sorted((path / "shards").glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            in_shards.extend(handle.keys())
    assert sorted(in_shards) == sorted(ids), "every sample is stored exactly once, in some complete shard"
    return {
        r["id"]: ({k: v for k, v in r.items() if k != "shard"}, dataset.moments(i))
        for i, r in enumerate(dataset.records)
    }


def assert_same_cache(path: Path, reference: Path, exact: bool = True) -> None:
    ours, theirs = read_cache(path), read_cache(reference)
    assert list(ours) == list(theirs)
    for sample_id, (record, moments) in theirs.items():
        assert ours[sample_id][0] == record
        if exact:
            assert torch.equal(ours[sample_id][1], moments), sample_id
        else:
            torch.testing.assert_close(ours[sample_id][1], moments, rtol=1e-5, atol=1e-5)
    skipped = [(path / "skipped.jsonl").read_text(), (reference / "skipped.jsonl").read_text()]
    assert skipped[0] == skipped[1]


def expected_pixels(file: Path, target: tuple[int, int], center_crop: bool, flip: bool):
    image = load_image_rgb(file)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop, top_left = resize_and_crop(image, target, center_crop=center_crop)
    return pil_to_tensor(crop), top_left, (image.height, image.width)


# ------------------------------------------------------------------------------------------------- writer
def test_folder_every_good_image_once_with_caption_every_bad_one_reported(
    workdir, vae_dir, photo_folder, reference_cache, capsys
):
    root, _ = photo_folder
    # With DataLoader workers this time (the reference ran in the main process): same result.
    summary = precompute_latents(vae_dir, workdir / "with_workers", train_data_dir=root, **{**RUN, "num_workers": 2})
    assert_same_cache(workdir / "with_workers", reference_cache)
    assert "cached 20 samples (20 encoded now, 0 resumed), skipped 6 (too_small: 1, unreadable: 5)" in str(summary)
    assert str(summary) in capsys.readouterr().out

    records = [r for r, _ in read_cache(reference_cache).values()]
    assert sorted(r["source"] for r in records if not r["flip"]) == sorted(GOOD)
    assert sorted(r["source"] for r in records if r["flip"]) == sorted(GOOD)
    for record in records:
        assert record["caption"] == GOOD[record["source"]]
        assert record["id"].split("@")[0] == record["source"]
        assert record["id"].endswith(":flip") == record["flip"]

    skipped = [json.loads(line) for line in (reference_cache / "skipped.jsonl").read_text().splitlines()]
    assert {s["source"]: s["kind"] for s in skipped} == BAD
    assert all(s["reason"] for s in skipped)
    by_source = {s["source"]: s for s in skipped}
    assert "truncated" in by_source["bad/truncated.jpg"]["reason"]
    assert "16x16" in by_source["bad/tiny.png"]["reason"]
    # A file that fails to decode is skipped as both of its samples (the image and its mirror), each once.
    truncated = [s["id"] for s in skipped if s["source"] == "bad/truncated.jpg"]
    assert len(truncated) == 2 and truncated[1] == truncated[0] + ":flip"
    info = load_cache_info(reference_cache)
    assert info["status"] == "complete" and info["counts"]["samples"] == 20


def test_odd_formats_are_converted_to_the_right_rgb(photo_folder):
    root, expected = photo_folder
    for name, rgb in expected.items():
        loaded = np.asarray(load_image_rgb(root / name), dtype=np.float64)
        error = np.abs(loaded - rgb).mean()
        assert error < (4.0 if name.endswith(".jpg") else 0.51), (name, error)  # JPEG is lossy; others exact


def test_cached_moments_equal_diffusers_encode_of_the_same_pixels(reference_cache, photo_folder):
    root, _ = photo_folder
    twin = diffusers_twin(make_vae(seed=0))
    for record, moments in read_cache(reference_cache).values():
        pixels, top_left, original = expected_pixels(root / record["source"], (64, 64), False, record["flip"])
        assert record["crop_coords_top_left"] == list(top_left)
        assert record["original_size"] == list(original)
        assert record["target_size"] == record["bucket"] == [64, 64]
        with torch.no_grad():
            posterior = twin.encode(pixels[None]).latent_dist
        torch.testing.assert_close(moments, torch.cat([posterior.mean, posterior.logvar], 1)[0], rtol=1e-4, atol=1e-4)
        assert moments[:4].abs().max() > 1e-2


def test_metadata_jsonl_reads_the_same_from_a_local_and_an_fsspec_folder(tmp_path):
    import fsspec

    (tmp_path / "sub").mkdir()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "sub/a.png", "text": "an a"}\n\n{"no_file": 1}\n')
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "b.png", "prompt": "a b"}\n')
    images = [tmp_path / "sub" / "a.png", tmp_path / "sub" / "b.png"]
    names = ["metadata.jsonl", "sub/metadata.jsonl", "sub/a.png", "sub/b.png"]
    fs, root = fsspec.filesystem("file"), tmp_path.as_posix()
    # Keys resolve against each metadata file's folder; a record without the column gets "".
    for column, expected in (("text", ("an a", "")), ("prompt", ("", "a b"))):
        expected = dict(zip(("sub/a.png", "sub/b.png"), expected))
        assert metadata_captions(fs, root, "file://" + root, names, column) == expected
        assert read_captions(tmp_path, images, column) == expected
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "b.png"}\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"sub/metadata.jsonl:2: not valid JSON"):
        read_captions(tmp_path, images)
    with pytest.raises(ValueError, match=r"sub/metadata.jsonl:2: not valid JSON"):
        metadata_captions(fs, root, "file://" + root, names, "text")


def test_choose_bucket_skips_what_would_be_enlarged_past_max_upscale():
    settings = CacheSettings(resolution=64, max_upscale=2.0)
    assert choose_bucket(40, 40, settings) == ((64, 64), None)  # 1.6x
    assert choose_bucket(32, 32, settings) == ((64, 64), None)  # exactly the limit is kept
    reason = "24x16 px would need 4.00x upscaling to cover 64x64 (limit max_upscale=2.0)"
    assert choose_bucket(16, 24, settings) == ((64, 64), f"too small: {reason}")
    frames_reason = reason.replace("px", "px frames")
    assert choose_bucket(16, 24, settings, frames=True) == ((64, 64), f"too small: {frames_reason}")


def test_buckets_group_by_aspect_ratio_and_match_diffusers(workdir, vae_dir):
    root = workdir / "strips"
    root.mkdir()
    photos = sample_photos()
    sizes = {"wide": (400, 100), "tall": (100, 400), "wide3": (450, 150), "square": (200, 200), "small": (40, 40)}
    for name, size in sizes.items():
        photos["coffee"].resize(size).save(root / f"{name}.png")
    photos["astronaut"].save(root / "astronaut.png")
    out = workdir / "buckets"
    precompute_latents(vae_dir, out, train_data_dir=root, **{**RUN, "resolution": 128, "buckets": True})

    dataset = LatentCacheDataset(out, sample_posterior=False, scale=False)
    buckets = {r["id"].split("@")[0]: tuple(r["bucket"]) for r in dataset.records if not r["flip"]}
    assert buckets == {
        "wide.png": (64, 256),
        "tall.png": (256, 64),
        "wide3.png": (64, 192),
        "square.png": (128, 128),
        "astronaut.png": (128, 128),
    }
    assert all(b in make_buckets(128) and b[0] % 64 == 0 == b[1] % 64 for b in buckets.values())
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["source"], s["kind"]) for s in skipped] == [("small.png", "too_small")]

    twin = diffusers_twin(make_vae(seed=0))
    for index, record in enumerate(dataset.records):
        assert tuple(record["bucket"]) == closest_bucket(*record["original_size"], make_buckets(128))
        pixels, top_left, _ = expected_pixels(root / record["source"], tuple(record["bucket"]), True, record["flip"])
        assert record["crop_coords_top_left"] == list(top_left)
        with torch.no_grad():
            posterior = twin.encode(pixels[None]).latent_dist
        torch.testing.assert_close(dataset[index]["latents"], posterior.mean[0], rtol=1e-4, atol=1e-4)

    # The bucket sampler: one bucket per batch, every sample once per epoch, a new order next epoch.
    sampler = BucketBatchSampler(dataset, batch_size=3, shuffle=True, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len({dataset.sample_buckets[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    assert list(BucketBatchSampler(dataset, 3, seed=0)) == epochs[0]
    dropped = BucketBatchSampler(dataset, batch_size=3, drop_last=True)
    assert all(len(batch) == 3 for batch in dropped) and len(list(dropped)) == len(dropped)

    # DataLoader workers read the shards themselves and draw the same latents as the main process.
    dataset = LatentCacheDataset(out, seed=5)
    dataset.set_epoch(3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    seen = 0
    for batch in loader:
        for row, sample_id in enumerate(batch["id"]):
            index = [r["id"] for r in dataset.records].index(sample_id)
            assert torch.equal(batch["latents"][row], dataset[index]["latents"])
            assert batch["caption"][row] == ""
        assert batch["original_size"].shape == (len(batch["id"]), 2)
        seen += len(batch["id"])
    assert seen == len(dataset)


def kill_9_when(command: list[str], ready: Callable[[], bool], interval: float) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds (asked every `interval` s); fails, showing the end of
    its stderr, when the run ends before."""
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if ready():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(interval)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill: {process.stderr.read()[-2000:]}"


def test_kill_9_mid_run_then_rerun_equals_uninterrupted_run(workdir, vae_dir, photo_folder, reference_cache):
    out = workdir / "killed"
    # The child sleeps after each shard so the kill lands mid-run, not after the last shard.
    slow = (
        "import sys, time\n"
        "from diffusers_vae_ext.cache.storage import CacheStore\n"
        "write = CacheStore.put_shard\n"
        "def slow_write(*args, **kwargs):\n    write(*args, **kwargs)\n    time.sleep(0.4)\n"
        "CacheStore.put_shard = slow_write\n"
        "from diffusers_vae_ext.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["cache", "--vae", str(vae_dir), "--train_data_dir", str(photo_folder[0]), "--output_dir", str(out)]
    args += ["--resolution", "64", "--flip", "--batch_size", "2", "--shard_size", "2"]
    args += ["--dataloader_num_workers", "0"]

    def shards_written() -> int:
        return len(list((out / "shards").glob("shard-*.safetensors")))

    kill_9_when([sys.executable, "-c", slow, *args], lambda: shards_written() >= 3, interval=0.01)
    written = shards_written()
    assert 3 <= written < 11
    with pytest.raises(ValueError, match="incomplete"):
        LatentCacheDataset(out)
    # A write cut off before its rename leaves a temp file; it is never indexed and gets cleaned up.
    (out / "shards" / ".shard-0123456789abcdef.safetensors.tmp-99999").write_bytes(b"partial")

    summary = precompute_latents(vae_dir, out, train_data_dir=photo_folder[0], **RUN)
    assert summary.resumed > 0 and summary.new > 0 and summary.resumed + summary.new == 20
    assert not list((out / "shards").glob(".*tmp*"))
    # Every sample exactly once, bit-identical to the uninterrupted run (same batches, same kernels).
    assert_same_cache(out, reference_cache, exact=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_then_other_vae_refused_and_overwrite_rebuilds(
    workdir, vae_dir, photo_folder, reference_cache, capsys
):
    out = workdir / "two_processes"
    command, launch_env = cpu_launch(2, port=_free_port())
    command += [str(REPO / "scripts/precompute_latents.py"), "--vae", str(vae_dir)]
    command += ["--train_data_dir", str(photo_folder[0]), "--output_dir", str(out), "--resolution", "64", "--flip"]
    command += ["--batch_size", "2", "--shard_size", "2", "--dataloader_num_workers", "0"]
    done = subprocess.run(command, env={**child_env(), **launch_env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cached 20 samples") == 1  # one summary, from the main process
    # The plan is global, so even the shard files are the same as a single process writes.
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted(p.name for p in (reference_cache / "shards").iterdir())
    assert_same_cache(out, reference_cache, exact=True)

    other_vae = make_vae(seed=1)
    with pytest.raises(CacheMismatchError, match="VAE: cache built with"):
        precompute_latents(other_vae, out, train_data_dir=photo_folder[0], **RUN)
    from diffusers_vae_ext.cli import main

    code = main(["cache", "--vae", str(vae_dir), "--train_data_dir", str(photo_folder[0]), "--output_dir", str(out)])
    assert code == 2 and "preprocessing.resolution: cache has 64, this run wants 512" in capsys.readouterr().err
    assert_same_cache(out, reference_cache, exact=False)  # refusing left the cache intact

    precompute_latents(other_vae, out, train_data_dir=photo_folder[0], overwrite=True, **RUN)
    rebuilt, reference = read_cache(out), read_cache(reference_cache)
    assert list(rebuilt) == list(reference)
    assert (
        load_cache_info(out)["provenance"]["vae"]["fingerprint"]
        != load_cache_info(reference_cache)["provenance"]["vae"]["fingerprint"]
    )
    sample_id = next(iter(reference))
    pixels, _, _ = expected_pixels(photo_folder[0] / reference[sample_id][0]["source"], (64, 64), False, False)
    with torch.no_grad():
        mean = other_vae.encode(pixels[None]).latent_dist.mean[0]
    torch.testing.assert_close(rebuilt[sample_id][1][:4], mean, rtol=1e-4, atol=1e-4)


def test_rerun_adds_new_images_drops_changed_ones_and_updates_captions(workdir, vae_dir):
    root = workdir / "incremental"
    root.mkdir()
    photos = sample_photos()
    for name in ("astronaut", "chelsea", "coffee"):
        photos[name].save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(name)
    out = workdir / "incremental_cache"
    run = {**RUN, "resolution": 32, "flip": False}
    assert precompute_latents(vae_dir, out, train_data_dir=root, **run).new == 3
    old_ids = {r["id"] for r in LatentCacheDataset(out).records}

    (root / "chelsea.txt").write_text("a cat")
    photos["rocket"].save(root / "coffee.png")  # same name, new content: a new sample
    photos["hubble_deep_field"].save(root / "hubble.png")
    (root / "astronaut.png").unlink()
    (root / "astronaut.txt").unlink()
    summary = precompute_latents(vae_dir, out, train_data_dir=root, **run)
    assert (summary.cached, summary.new, summary.resumed, summary.stale) == (3, 2, 1, 2)
    records = {r["source"]: r for r in LatentCacheDataset(out).records}
    assert sorted(records) == ["chelsea.png", "coffee.png", "hubble.png"]
    assert records["chelsea.png"]["caption"] == "a cat" and records["chelsea.png"]["id"] in old_ids
    assert records["coffee.png"]["id"] not in old_ids


def test_datasets_input_matches_folder_input_and_scale_follows_the_vae_config(workdir):
    import datasets

    vae = make_vae(seed=2, scaling_factor=0.3611, shift_factor=0.1159)
    photos = sample_photos()
    names = ["astronaut", "chelsea", "coffee"]
    rows = {"image": [{"bytes": _png(photos[n]), "path": None} for n in names], "text": list(names)}
    rows["image"].append({"bytes": b"garbage", "path": None})
    rows["text"].append("broken")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(workdir / "hf"))
    folder = workdir / "hf_as_folder"
    folder.mkdir()
    for n in names:
        photos[n].save(folder / f"{n}.png")

    run = {**RUN, "resolution": 32, "flip": False}
    precompute_latents(vae, workdir / "from_dataset", dataset=str(workdir / "hf"), **run)
    precompute_latents(vae, workdir / "from_folder", train_data_dir=folder, **run)
    from_dataset = LatentCacheDataset(workdir / "from_dataset", sample_posterior=False, scale=False)
    from_folder = LatentCacheDataset(workdir / "from_folder", sample_posterior=False, scale=False)
    assert [r["source"] for r in from_dataset.records] == ["row0", "row1", "row2"]
    assert [r["caption"] for r in from_dataset.records] == names
    for i in range(3):
        assert torch.equal(from_dataset.moments(i), from_folder.moments(i))
    skipped = [json.loads(line) for line in (workdir / "from_dataset/skipped.jsonl").read_text().splitlines()]
    assert [(s["source"], s["kind"]) for s in skipped] == [("row3", "unreadable")]
    assert load_cache_info(workdir / "from_dataset")["source"]["type"] == "datasets"

    raw = LatentCacheDataset(workdir / "from_dataset", seed=1, scale=False)
    scaled = LatentCacheDataset(workdir / "from_dataset", seed=1, scale=True)
    info = load_cache_info(workdir / "from_dataset")["provenance"]
    assert info["scaling"]["convention"] == "shift" and info["moments"]["scaled"] is False
    for i in range(3):
        z = raw[i]["latents"]
        assert torch.equal(scaled[i]["latents"], scale_latents(z[None], vae.config)[0])
        torch.testing.assert_close(scaled[i]["latents"], (z - 0.1159) * 0.3611)


def test_posterior_draws_are_deterministic_per_seed_epoch_and_id(workdir, reference_cache):
    dataset = LatentCacheDataset(reference_cache, seed=0, scale=False, return_moments=True)
    again = LatentCacheDataset(reference_cache, seed=0, scale=False)
    other_seed = LatentCacheDataset(reference_cache, seed=1, scale=False)
    first = [dataset[i] for i in range(len(dataset))]
    assert all(torch.equal(first[i]["latents"], again[i]["latents"]) for i in range(len(dataset)))
    assert not torch.equal(first[0]["latents"], other_seed[0]["latents"])

    dataset.set_epoch(1)
    second = [dataset[i] for i in range(len(dataset))]
    eps = [(item["latents"] - item["mean"]) / torch.exp(0.5 * item["logvar"]) for item in first]
    eps_next = [(item["latents"] - item["mean"]) / torch.exp(0.5 * item["logvar"]) for item in second]
    for a, b in zip(eps, eps_next):
        assert abs(a.mean()) < 0.2 and 0.8 < a.std() < 1.2  # standard normal noise around the stored mean
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.2  # fresh each epoch

    # The draw belongs to the sample id, not to its position: reverse the index and read again.
    reordered = workdir / "reordered"
    shutil.copytree(reference_cache, reordered)
    lines = (reordered / "index.jsonl").read_text().splitlines()
    (reordered / "index.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    reversed_dataset = LatentCacheDataset(reordered, seed=0, scale=False)
    assert all(
        torch.equal(reversed_dataset[len(first) - 1 - i]["latents"], first[i]["latents"]) for i in range(len(first))
    )

    means = LatentCacheDataset(reference_cache, sample_posterior=False, scale=True)
    torch.testing.assert_close(means[0]["latents"], first[0]["mean"] * 0.18215)


def test_non_finite_latents_are_reencoded_in_float32_or_skipped(workdir):
    root = workdir / "nan"
    root.mkdir()
    sample_photos()["chelsea"].save(root / "photo.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(root / "white.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(root / "black.png")

    def poison(module, inputs, output):
        # White images overflow only in reduced precision; black ones in any precision.
        x = inputs[0]
        for i in range(len(x)):
            if x[i].min() > 0.99 and output.dtype != torch.float32 or x[i].max() < -0.99:
                output[i] = float("nan")
        return output

    vae = make_vae(seed=0)
    vae.encoder.register_forward_hook(poison)
    out = workdir / "nan_cache"
    run = {**RUN, "resolution": 32, "dtype": "bf16", "flip": False}
    summary = precompute_latents(vae, out, train_data_dir=root, **run)
    assert summary.skipped == {"non_finite": 1}
    records = {r["source"]: r for r in LatentCacheDataset(out).records}
    assert sorted(records) == ["photo.png", "white.png"]
    assert records["white.png"]["encode_dtype"] == "float32" and records["photo.png"]["encode_dtype"] == "bfloat16"
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["source"] for s in skipped} == {"black.png"} and "float32" in skipped[0]["reason"]
    with safe_open(str(out / records["white.png"]["shard"]), framework="pt") as handle:
        stored = handle.get_tensor(records["white.png"]["key"])
    assert stored.dtype == torch.bfloat16 and torch.isfinite(stored).all()
