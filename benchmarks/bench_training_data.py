"""Training samples per second: the same photos as a local folder (map-style) and as webdataset shards (streamed).

Both read through `training.training_images` / `training_dataloader`, the trainer's one door, and yield the same
samples (see docs/training.md, "One order for both paths"); the table shows what streaming costs over random access
on local disk (the tar parsing, the shuffle buffer) with 0 and 2 DataLoader workers, and the map-style path's
content hash (the sample key of the crops) next to a plain decode-crop loop over the same files.

    python benchmarks/bench_training_data.py                 # 48 photos (64-96 px crops of scikit-image's), 256 px
    python benchmarks/bench_training_data.py --images 96 --resolution 128
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_description() -> str:
    """The CPU as the package detects it (hardware.cpu_info: model, ISA, AMX), cores and torch."""
    from diffusers_vae_ext.hardware import cpu_info

    info = cpu_info()
    return f"{info.model} ({info.capability}), {os.cpu_count()} logical cores, torch {torch.__version__}"


def write_data(root: Path, count: int, size: int) -> tuple[Path, Path]:
    from diffusers_vae_ext.data import sample_photos

    photos = list(sample_photos().values())
    folder, shards = root / "folder", root / "shards"
    folder.mkdir()
    shards.mkdir()
    blobs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = min(photo.size) // (1 + (i // len(photos)) % 3)
        image = photo.crop((i % 7, 0, i % 7 + side, side)).resize((size + 16 * (i % 3), size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
        (folder / f"{i:05d}.jpg").write_bytes(blobs[-1])
    per_shard = 8
    for start in range(0, count, per_shard):
        with tarfile.open(shards / f"{start // per_shard:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, count)):
                info = tarfile.TarInfo(f"{i:05d}.jpg")
                info.size = len(blobs[i])
                tar.addfile(info, io.BytesIO(blobs[i]))
    return folder, shards


def endless(loader):
    """Epoch after epoch (a stream is endless already; a map-style loader ends with its epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "sampler"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def samples_per_second(data: Path, workers: int, batches: int, resolution: int, out: Path) -> float:
    from accelerate import Accelerator

    from diffusers_vae_ext import training
    from diffusers_vae_ext.training.data import training_dataloader

    args = training.parse_args(
        ["--train_data_dir", str(data), "--report_to", "none", "--output_dir", str(out), "--train_batch_size", "8",
         "--dataloader_num_workers", str(workers), "--unit_size", "8", "--resolution", str(resolution)]
    )  # fmt: skip
    images, _, _ = training.training_images(args)
    _, loader = training_dataloader(images, resolution, 3, args, Accelerator(cpu=True))
    iterator = endless(loader)
    next(iterator)  # workers started, first batch decoded
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * 8 / (time.perf_counter() - started)


def plain_loop(folder: Path, count: int, resolution: int) -> float:
    """Decode, resize and crop the files with no framework at all: the floor for one process."""
    from diffusers_vae_ext.data import load_image_rgb, pil_to_tensor, random_crop_and_flip

    files = sorted(folder.iterdir())
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for i in range(count):
        image = load_image_rgb(files[i % len(files)])
        pil_to_tensor(random_crop_and_flip(image, resolution, resolution, rng))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, shards = write_data(root, args.images, args.resolution + 32)
        print(f"{args.images} JPEG photos, {args.resolution + 32} px short side, crops of {args.resolution}, batch 8")
        print(f"{'read':<44}{'samples/s':>10}{'vs plain':>10}")
        plain = plain_loop(folder, args.batches * 8, args.resolution)
        print(f"{'plain decode + crop loop, one process':<44}{plain:>10.1f}{1.0:>10.2f}")
        for name, data in (("local folder, map-style", folder), ("webdataset shards, streamed", shards)):
            for workers in (0, 2):
                rate = samples_per_second(data, workers, args.batches, args.resolution, root / f"out{workers}")
                print(f"{name + f', {workers} workers':<44}{rate:>10.1f}{rate / plain:>10.2f}")


if __name__ == "__main__":
    main()
