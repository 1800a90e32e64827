"""Latent cache throughput: end-to-end caching vs the encoder alone, and a naive loop for comparison.

Builds a folder of real photos (scikit-image's, cropped and resized into `--num_images` PNG and JPEG files of
256-640 px), then measures on the same batches, alternating the modes `--repeats` times:

- `encoder only`: `vae.encode` on the batches, already decoded, resized and stacked in memory;
- `precompute_latents`: the whole cache run (scan and hash, decode and resize in `--num_workers` DataLoader
  workers while the VAE encodes, shards written and fsynced, index written);
- `naive loop`: `for batch: vae.encode(batch)` with PIL decoding and resizing in the main process.

and prints images/s and each mode's ratio to the encoder alone (target for the cache: >= 0.9). The VAE has random
weights; `--vae_config sd` is Stable Diffusion's kl-f8 architecture, `mid` the same with half the channels.

    python benchmarks/bench_cache.py                                  # mid VAE at 128 px, quick on a CPU
    python benchmarks/bench_cache.py --vae_config sd --resolution 256 # the encoder dominates more
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.cache import precompute_latents
from diffusers_vae_ext.data import list_image_files, load_image_rgb, pil_to_tensor, resize_and_crop, sample_photos

SD_KL_F8 = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
CONFIGS = {"sd": SD_KL_F8, "mid": {**SD_KL_F8, "block_out_channels": (64, 128, 256, 256)}}


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    photos = list(sample_photos().values())
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.randint(min(256, min(photo.size)), min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side))
        crop = crop.resize((rng.randint(256, 640), rng.randint(256, 640)))
        crop.save(folder / f"{index:04d}.{'png' if index % 2 else 'jpg'}", quality=92)


def preprocess(path: Path, resolution: int) -> torch.Tensor:
    return pil_to_tensor(resize_and_crop(load_image_rgb(path), (resolution, resolution), center_crop=True)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIGS[args.vae_config]).eval().to(device)
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        photos = workdir / "photos"
        photos.mkdir()
        write_photos(photos, args.num_images)
        files = list_image_files(photos)  # the cache's order: sorted relative paths, one bucket
        pixels = torch.stack([preprocess(f, args.resolution) for f in files])
        batches = list(pixels.split(args.batch_size))
        file_batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        @torch.no_grad()
        def encoder_only() -> float:
            start = time.perf_counter()
            for batch in batches:
                vae.encode(batch.to(device)).latent_dist.mean.cpu()
            sync()
            return time.perf_counter() - start

        def cache_run() -> float:
            start = time.perf_counter()
            precompute_latents(
                vae,
                workdir / "cache",
                train_data_dir=photos,
                resolution=args.resolution,
                center_crop=True,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                overwrite=True,
                progress=False,
            )
            return time.perf_counter() - start

        @torch.no_grad()
        def naive_loop() -> float:
            start = time.perf_counter()
            for group in file_batches:
                batch = torch.stack([preprocess(f, args.resolution) for f in group])
                vae.encode(batch.to(device)).latent_dist.mean.cpu()
            sync()
            return time.perf_counter() - start

        encoder_only()  # warm-up: kernel selection, allocator
        modes = {"encoder only": encoder_only, "precompute_latents": cache_run, "naive loop": naive_loop}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, run in modes.items():  # alternating, so slow phases of a shared machine hit every mode
                times[name].append(run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    count = len(files)
    print(
        f"\n{count} photos -> {args.resolution}x{args.resolution}, VAE {args.vae_config} on {device}, "
        f"batch {args.batch_size}, {args.num_workers} workers, {torch.get_num_threads()} torch threads, "
        f"{args.repeats} repeats (median)"
    )
    print(f"| {'mode':<20} | {'images/s':>9} | {'÷ encoder only':>14} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 16}|")
    for name, values in times.items():
        # Ratio per repeat (modes measured back to back), then the median.
        ratio = statistics.median(e / t for e, t in zip(times["encoder only"], values))
        print(f"| {name:<20} | {count / statistics.median(values):>9.2f} | {ratio:>14.3f} |")


if __name__ == "__main__":
    main()
