"""Latent cache throughput and scale, measured side by side in one process; prints one table.

Rows (each a ratio of two runs made back to back, alternating, `--repeats` times; the median is printed):

- `throughput`: the whole cache run on a local folder (`precompute_latents`: read, hash, decode and resize in
  `--num_workers` DataLoader workers while the VAE encodes, shards and manifests written, index written) and a
  naive `for batch: vae.encode(batch)` loop with PIL decoding in the main process, each ÷ the encoder alone on
  the same batches, already in memory (goal for the cache: >= 0.9);
- `s3`: webdataset shards in an S3 bucket -> cache in an S3 bucket ÷ the same images as a local folder -> local
  cache, at `--s3_resolution` (moto's S3 server on 127.0.0.1 in its own process; goal >= 0.9);
- `first_batch`: time from `precompute_latents(...)` to the first encoded batch, and peak RSS by then (main
  process plus its workers), with 1000 webdataset shards on S3 ÷ with 10 (each in a fresh subprocess;
  goals <= 1.5 and <= 1.2), given as a prefix (one LIST of all shards: the only step that grows with their
  number) and as a brace pattern (no listing);
- `ray`: `--engine ray` on a local Ray cluster (`ray.init(num_cpus=<cores>)`, started before timing) ÷ the local
  engine, same inputs, end to end (actors start inside the timed run; Ray pays off across machines);
- `video`: clips/s of the whole cache run on a folder of real pan-and-zoom mp4s (probe, clip planning, PyAV
  decoding and resizing in the workers, a tiny `AutoencoderKLWan`, shards, index) ÷ clips/s of the bare encoder
  (`AutoencoderAdapter.encode_moments`) on the same clips already in memory, in the same batches; 17 frames at
  `--video_resolution` px, best of `--repeats` runs each, alternating (goal >= 0.9).

The VAE has random weights: `--vae_config sd` is Stable Diffusion's kl-f8 architecture, `mid` the same with half
the channels. Prints the CPU model and torch's CPU capability.

    python benchmarks/bench_cache.py                       # all parts
    python benchmarks/bench_cache.py --parts throughput,s3 # some of them
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.cache import precompute_latents
from diffusers_vae_ext.data import list_image_files, load_image_rgb, pil_to_tensor, resize_and_crop, sample_photos
from diffusers_vae_ext.hardware import cpu_info

SD_KL_F8 = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
CONFIGS = {"sd": SD_KL_F8, "mid": {**SD_KL_F8, "block_out_channels": (64, 128, 256, 256)}}
PARTS = ("throughput", "s3", "first_batch", "ray", "video")
# A tiny Wan 2.1-style video autoencoder (the tests' config): 8x in space, 4x in time, 4 latent channels.
TINY_WAN = dict(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
VIDEO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")

# Run in a fresh interpreter: report the time to the first encoder call and the memory held by then.
FIRST_BATCH_CHILD = """
import json, os, resource, sys, time
import psutil
import torch
from diffusers_vae_ext.cache import precompute_latents, unit
torch.set_num_threads(int(sys.argv[4]))
encode = unit.Encoder.__call__
def first_batch(self, pixels):
    encode(self, pixels)
    elapsed = time.perf_counter() - start
    me = psutil.Process()
    workers = sum(c.memory_info().rss for c in me.children(recursive=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": elapsed, "rss": peak + workers}), flush=True)
    os._exit(0)
unit.Encoder.__call__ = first_batch
start = time.perf_counter()
precompute_latents(sys.argv[1], sys.argv[2], train_data_dir=sys.argv[3], resolution=256, batch_size=8,
                   num_workers=2, progress=False)
"""


def cpu_description() -> str:
    info = cpu_info()
    return f"{info.model}, {os.cpu_count()} logical cores, torch {torch.__version__} CPU capability {info.capability}"


def make_photos(count: int, seed: int = 0) -> list:
    """`count` real photos (random crops of scikit-image's), 256-640 px, as PIL images."""
    rng = random.Random(seed)
    photos = list(sample_photos().values())
    images = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.randint(min(256, min(photo.size)), min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side))
        images.append(crop.resize((rng.randint(256, 640), rng.randint(256, 640))))
    return images


def encode_bytes(image, index: int, jpeg_only: bool = False) -> tuple[str, bytes]:
    png = index % 2 and not jpeg_only
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if png else "JPEG", quality=92)
    return ("png" if png else "jpg"), buffer.getvalue()


def write_folder(folder: Path, images: list) -> None:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        extension, data = encode_bytes(image, index)
        (folder / f"{index:05d}.{extension}").write_bytes(data)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def put_shards(fs, prefix: str, images: list, per_shard: int, count: int | None = None) -> int:
    """Upload webdataset shards of `per_shard` samples (`count` shards cycling through `images`, as JPEG, or all
    `images` once); returns the number of shards."""
    shards = 0
    total = len(images) if count is None else count * per_shard
    for start in range(0, total, per_shard):
        members = []
        for index in range(start, min(start + per_shard, total)):
            image = images[index % len(images)]
            extension, data = encode_bytes(image, index, jpeg_only=count is not None)
            members += [(f"{index:05d}.{extension}", data), (f"{index:05d}.txt", f"photo {index}".encode())]
        fs.pipe_file(f"{prefix}/{shards:05d}.tar", tar_bytes(members))
        shards += 1
    return shards


def start_moto():
    """moto's S3 server on 127.0.0.1 in its own process, and an s3fs client; endpoint and credentials go to the
    environment. Its own process: real object storage does not share this interpreter's GIL with the encoder."""
    import socket

    import requests
    import s3fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError(f"moto's S3 server did not start on {endpoint}")
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    for bucket in ("bench-in", "bench-out"):
        fs.mkdir(bucket)
    return server, fs


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def video_rows(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, float, str]]:
    """The `video` part: the cache on a folder of mp4s ÷ the bare encoder on the same clips (best of N each)."""
    from diffusers import AutoencoderKLWan

    from diffusers_vae_ext.autoencoders import as_autoencoder
    from diffusers_vae_ext.video import ClipOptions, clips_from_file, list_videos, load_clip, write_pan_zoom_video

    torch.manual_seed(0)
    adapter = as_autoencoder(AutoencoderKLWan(**TINY_WAN).eval())
    folder = workdir / "videos"
    folder.mkdir()
    res = args.video_resolution
    for index in range(args.videos):
        photo = VIDEO_PHOTOS[index % len(VIDEO_PHOTOS)]
        write_pan_zoom_video(folder / f"{index:03d}_{photo}.mp4", photo, num_frames=34, size=(res + 16, res + 48))
    options = ClipOptions(num_frames=17, clips_per_video=2)
    clips = [clip for path in list_videos(folder) for clip in clips_from_file(path, options, adapter.frame_multiple)]
    pixels = torch.stack([load_clip(clip, (res, res)) for clip in clips])
    batches = list(pixels.split(args.video_batch_size))

    @torch.no_grad()
    def encoder_only() -> None:
        for batch in batches:
            adapter.encode_moments(batch)

    def cache_run() -> None:
        precompute_latents(
            adapter.vae,
            workdir / "video_cache",
            train_data_dir=folder,
            resolution=res,
            clip_options=options,
            batch_size=args.video_batch_size,
            num_workers=args.num_workers,
            overwrite=True,
            progress=False,
        )

    encoder_only()  # warm-up
    times: dict[str, list[float]] = {"encoder": [], "cache": []}
    for _ in range(args.repeats):
        times["encoder"].append(timed(encoder_only))
        times["cache"].append(timed(cache_run))
    base = f"{len(clips)} clips of 17 frames at {res} px, tiny AutoencoderKLWan, batch {args.video_batch_size}"
    encoder_rate = len(clips) / min(times["encoder"])
    cache_rate = len(clips) / min(times["cache"])
    return [
        (f"encoder only (adapter.encode_moments), {base}", f"{encoder_rate:.3f} clips/s", 1.0, ""),
        (
            f"precompute_latents (mp4 folder) ÷ encoder only, {base}, best of {args.repeats}",
            f"{cache_rate:.3f} clips/s",
            min(times["encoder"]) / min(times["cache"]),
            ">= 0.9",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--vae_config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--resolution", type=int, default=128, help="throughput part")
    parser.add_argument("--s3_resolution", type=int, default=256, help="s3 and ray parts")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shards", default="10,1000", help="first_batch part: small,large shard counts")
    parser.add_argument("--videos", type=int, default=4, help="video part: videos (two 17-frame clips each)")
    parser.add_argument("--video_resolution", type=int, default=128)
    parser.add_argument("--video_batch_size", type=int, default=2)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIGS[args.vae_config]).eval().to(device)
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    vae.save_pretrained(workdir / "vae")
    images = make_photos(args.num_images)
    write_folder(workdir / "photos", images)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, overwrite=True, progress=False)
    rows: list[tuple[str, str, float, str]] = []
    server = None
    try:
        if "throughput" in parts:
            files = list_image_files(workdir / "photos")  # the cache's order: sorted names, one bucket
            res = args.resolution
            pixels = torch.stack(
                [pil_to_tensor(resize_and_crop(load_image_rgb(f), (res, res), center_crop=True)[0]) for f in files]
            )
            batches = list(pixels.split(args.batch_size))

            @torch.no_grad()
            def encoder_only() -> None:
                for batch in batches:
                    vae.encode(batch.to(device)).latent_dist.mean.cpu()

            @torch.no_grad()
            def naive_loop() -> None:
                for start in range(0, len(files), args.batch_size):
                    group = files[start : start + args.batch_size]
                    batch = torch.stack(
                        [pil_to_tensor(resize_and_crop(load_image_rgb(f), (res, res), True)[0]) for f in group]
                    )
                    vae.encode(batch.to(device)).latent_dist.mean.cpu()

            def cache_run() -> None:
                out = workdir / "cache"
                precompute_latents(
                    vae, out, train_data_dir=workdir / "photos", resolution=res, center_crop=True, **common
                )

            encoder_only()  # warm-up: kernel selection, allocator
            times: dict[str, list[float]] = {"encoder": [], "cache": [], "naive": []}
            for _ in range(args.repeats):
                times["encoder"].append(timed(encoder_only))
                times["cache"].append(timed(cache_run))
                times["naive"].append(timed(naive_loop))
            base = f"{len(files)} photos at {res} px"
            encoder_rate = len(files) / statistics.median(times["encoder"])
            rows.append((f"encoder only, {base}", f"{encoder_rate:.2f} img/s", 1.0, ""))
            cache_rate = len(files) / statistics.median(times["cache"])
            ratio = median_ratio(times["encoder"], times["cache"])
            rows.append(
                (
                    f"precompute_latents (local folder) ÷ encoder only, {base}",
                    f"{cache_rate:.2f} img/s",
                    ratio,
                    ">= 0.9",
                )
            )
            naive_rate = len(files) / statistics.median(times["naive"])
            ratio = median_ratio(times["encoder"], times["naive"])
            rows.append((f"naive loop ÷ encoder only, {base}", f"{naive_rate:.2f} img/s", ratio, ""))

        if {"s3", "first_batch"} & set(parts):
            server, fs = start_moto()

        res = args.s3_resolution
        per_unit = max(1, args.num_images // max(4, args.num_workers * 2))
        if "s3" in parts:
            shards = put_shards(fs, "bench-in/wds", images, per_unit)

            def local_run() -> None:
                precompute_latents(
                    vae,
                    workdir / "local_cache",
                    train_data_dir=workdir / "photos",
                    resolution=res,
                    unit_size=per_unit,
                    **common,
                )

            def s3_run() -> None:
                precompute_latents(
                    vae, "s3://bench-out/cache", train_data_dir="s3://bench-in/wds/", resolution=res, **common
                )

            times = {"local": [], "s3": []}
            for _ in range(args.repeats):
                times["local"].append(timed(local_run))
                times["s3"].append(timed(s3_run))
            rate = len(images) / statistics.median(times["s3"])
            name = f"webdataset on S3 -> cache on S3 ÷ local folder -> local cache, {len(images)} photos at {res} px, {shards} units"
            rows.append((name, f"{rate:.2f} img/s", median_ratio(times["local"], times["s3"]), ">= 0.9"))

        if "first_batch" in parts:
            small, large = (int(n) for n in args.shards.split(","))
            photos = [image.resize((256, 256)) for image in make_photos(16, seed=1)]
            put_shards(fs, "bench-in/many", photos, 2, count=large)
            fs.invalidate_cache()
            for index in range(small):  # the small set: the first `small` shards, copied
                fs.copy(f"bench-in/many/{index:05d}.tar", f"bench-in/few/{index:05d}.tar")
            child_env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
                ),
            }
            inputs = {
                "prefix listing": {"few": "s3://bench-in/few/", "many": "s3://bench-in/many/"},
                "brace pattern": {
                    "few": f"s3://bench-in/few/{{00000..{small - 1:05d}}}.tar",
                    "many": f"s3://bench-in/many/{{00000..{large - 1:05d}}}.tar",
                },
            }
            for form, urls in inputs.items():
                results: dict[str, list[dict]] = {"few": [], "many": []}
                for repeat in range(max(args.repeats, 3)):
                    for name in ("few", "many"):
                        out = f"s3://bench-out/first-{form.split()[0]}-{name}-{repeat}"
                        threads = str(torch.get_num_threads())
                        command = [
                            sys.executable,
                            "-c",
                            FIRST_BATCH_CHILD,
                            str(workdir / "vae"),
                            out,
                            urls[name],
                            threads,
                        ]
                        done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=600)
                        if done.returncode != 0 or not done.stdout.strip():
                            raise RuntimeError(f"first-batch child failed: {done.stderr[-2000:]}")
                        results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                seconds = {k: [r["seconds"] for r in v] for k, v in results.items()}
                rss = {k: [r["rss"] for r in v] for k, v in results.items()}
                detail = f"{statistics.median(seconds['many']):.2f} s vs {statistics.median(seconds['few']):.2f} s"
                name = f"time to first encoded batch, {large} ÷ {small} webdataset shards on S3 ({form})"
                rows.append((name, detail, median_ratio(seconds["many"], seconds["few"]), "<= 1.5"))
                detail = f"{statistics.median(rss['many']) / 2**20:.0f} MiB vs {statistics.median(rss['few']) / 2**20:.0f} MiB"
                name = f"peak RSS at the first batch, {large} ÷ {small} shards ({form}, main + workers)"
                rows.append((name, detail, median_ratio(rss["many"], rss["few"]), "<= 1.2"))

        if "ray" in parts:
            import ray

            cores = os.cpu_count() or 2
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            try:
                threads = torch.get_num_threads()

                def local_run() -> None:
                    precompute_latents(
                        vae,
                        workdir / "ray_local",
                        train_data_dir=workdir / "photos",
                        resolution=res,
                        unit_size=per_unit,
                        **common,
                    )

                def ray_run() -> None:
                    precompute_latents(
                        vae,
                        workdir / "ray_cache",
                        train_data_dir=workdir / "photos",
                        resolution=res,
                        unit_size=per_unit,
                        engine="ray",
                        **common,
                    )

                times = {"local": [], "ray": []}
                for _ in range(args.repeats):
                    times["local"].append(timed(local_run))
                    times["ray"].append(timed(ray_run))
                rate = len(images) / statistics.median(times["ray"])
                name = f"--engine ray (local {cores}-CPU cluster, 1-thread actors) ÷ local engine ({threads} threads), {res} px"
                rows.append((name, f"{rate:.2f} img/s", median_ratio(times["local"], times["ray"]), "report"))
            finally:
                ray.shutdown()
        if "video" in parts:
            rows.extend(video_rows(args, workdir))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{cpu_description()}")
    print(
        f"VAE {args.vae_config} on {device}, batch {args.batch_size}, {args.num_workers} workers, "
        f"{torch.get_num_threads()} torch threads, {args.repeats} repeats (median of per-repeat ratios)"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'measurement':<{width}} | {'value':>24} | {'ratio':>6} | {'goal':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 26}|{'-' * 8}|{'-' * 9}|")
    for name, value, ratio, goal in rows:
        print(f"| {name:<{width}} | {value:>24} | {ratio:>6.3f} | {goal:>7} |")


if __name__ == "__main__":
    main()
