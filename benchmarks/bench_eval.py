"""`diffusers-vae eval` throughput: the whole evaluation of 2 VAEs vs bare encode + decode of both.

Writes `--num_images` real photos (scikit-image's, resized) as PNG files, then measures, alternating the modes
`--repeats` times:

- `bare encode+decode`: for each batch (already decoded, resized and stacked in memory) and each VAE,
  `decode(encode(x).latent_dist.mode())` — the floor any evaluation pays;
- `eval`: `evaluate()` + `write_report()` on the image folder: reading and resizing the files, both VAEs, PSNR,
  SSIM, KL, latent statistics and the suggested scaling factor, worst-patch crops and heat maps, rows synced to
  metrics.csv/jsonl per batch, report.html and report.md;
- `eval + LPIPS` (with `--lpips`): the same with LPIPS (random VGG weights; the cost is the same as real ones).

and prints images/s, the ratio to the bare loop per repeat (median; target for `eval`: >= 0.85) and the share of
each eval's wall time spent inside encode + decode (measured within the run, so load from other processes between
the modes does not move it; it is the ratio eval would reach against a bare loop running at the same speed). The
VAEs are
the built-in demo config (`small_rgb`, random weights, two seeds) unless `--vae` folders are given. Prints the CPU
model and torch's CPU capability: the numbers depend on them.

    python benchmarks/bench_eval.py                       # 256 px, 24 images, 2 demo VAEs
    python benchmarks/bench_eval.py --vae a=runs/base --vae b=runs/tuned --resolution 512
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.data import list_image_files, load_image_rgb, pil_to_tensor, resize_and_crop, sample_photos
from diffusers_vae_ext.evaluation import EvalVAE, evaluate, load_vaes, write_report
from diffusers_vae_ext.hardware import cpu_info
from diffusers_vae_ext.training import load_model_config


def cpu_description() -> str:
    info = cpu_info()
    return f"{info.model}; torch CPU capability {info.capability}, {info.threads} threads"


def write_photos(folder: Path, count: int) -> None:
    photos = list(sample_photos().values())
    for index in range(count):
        photo = photos[index % len(photos)]
        # Different crops of the same photos, so the images differ.
        shift = (index // len(photos)) * 17
        crop = photo.crop((shift, shift, photo.width - shift // 2, photo.height - shift // 3))
        crop.save(folder / f"{index:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", action="append", default=None, help="LABEL=PATH, twice (default: 2 demo VAEs)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num_images", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lpips", action="store_true", help="also time eval with LPIPS (random VGG weights)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.vae:
        vaes = load_vaes(args.vae, device=device)
    else:
        config = load_model_config("small_rgb")
        vaes = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            vaes.append(EvalVAE(f"demo-{seed}", as_autoencoder(AutoencoderKL.from_config(config).eval().to(device))))
    workdir = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        photos = workdir / "photos"
        photos.mkdir()
        write_photos(photos, args.num_images)
        files = list_image_files(photos)
        pixels = torch.stack(
            [pil_to_tensor(resize_and_crop(load_image_rgb(f), (args.resolution,) * 2)[0]) for f in files]
        )
        batches = list(pixels.split(args.batch_size))
        lpips_file = None
        if args.lpips:
            from safetensors.torch import save_file

            from diffusers_vae_ext.losses import LPIPS

            lpips_file = workdir / "lpips.safetensors"
            save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips_file))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        @torch.no_grad()
        def bare() -> float:
            start = time.perf_counter()
            for batch in batches:
                for vae in vaes:
                    vae.adapter.decode(vae.adapter.encode_moments(batch.to(device)).chunk(2, dim=1)[0]).cpu()
            sync()
            return time.perf_counter() - start

        vae_share: dict[str, list[float]] = {}

        def run_eval(lpips_weights=None, mode: str = "eval") -> float:
            start = time.perf_counter()
            result = evaluate(
                vaes,
                workdir / "out",
                train_data_dir=photos,
                resolution=args.resolution,
                batch_size=args.batch_size,
                lpips_weights=lpips_weights,
                show_progress=False,
            )
            write_report(result)
            sync()
            elapsed = time.perf_counter() - start
            # Share of the eval's wall time spent inside encode + decode: immune to load changes between modes.
            vae_share.setdefault(mode, []).append(sum(v.seconds for v in result.vaes) / elapsed)
            return elapsed

        modes = {"bare encode+decode": bare, "eval": run_eval}
        if lpips_file is not None:
            modes["eval + LPIPS"] = lambda: run_eval(lpips_file, "eval + LPIPS")
        bare()  # warm-up: kernel selection, allocator, imports
        run_eval(mode="warm-up")
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, run in modes.items():  # alternating, so slow phases of a shared machine hit every mode
                times[name].append(run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    count = len(files)
    print(f"\nCPU: {cpu_description()}" if device.type == "cpu" else f"\nGPU: {torch.cuda.get_device_name()}")
    print(
        f"{count} photos -> {args.resolution}x{args.resolution}, {len(vaes)} VAEs "
        f"({', '.join(v.label for v in vaes)}) on {device}, batch {args.batch_size}, {args.repeats} repeats (median)"
    )
    print(f"| {'mode':<20} | {'images/s':>9} | {'÷ bare':>7} | {'VAE share of eval time':>22} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 9}|{'-' * 24}|")
    for name, values in times.items():
        # Ratio per repeat (modes measured back to back), then the median.
        ratio = statistics.median(b / t for b, t in zip(times["bare encode+decode"], values))
        share = f"{statistics.median(vae_share[name]):.3f}" if name in vae_share else "-"
        print(f"| {name:<20} | {count / statistics.median(values):>9.2f} | {ratio:>7.3f} | {share:>22} |")


if __name__ == "__main__":
    main()
