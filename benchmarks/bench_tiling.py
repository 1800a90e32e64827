"""Tiled against untiled encode + decode, for our exact tiler and for diffusers' overlap-and-blend tiler.

Both models use the Stable Diffusion kl-f8 architecture (`KL_F8_CONFIG` of bench_model.py) with the same seeded
random weights. A real photo (scikit-image's astronaut, resized) is encoded and its posterior mode decoded at each
size, untiled and with 256-pixel tiles (ours: `enable_tiling(tile_sample_size=256)`; diffusers':
`enable_tiling()` with `tile_sample_min_size=256` and its default 25 % overlap).

Every configuration (model x tiled/untiled x size) runs in its own fresh subprocess, so its peak memory is its own:
the peak RSS of that process on CPU (`ru_maxrss`, which includes Python, torch and the weights; the table also gives
the peak above the RSS with the model and input loaded, i.e. what the activations cost), or
`torch.cuda.max_memory_allocated` on GPU. Sizes up to `--warmup-max-size` get an untimed warm-up call first
(oneDNN builds its kernels on the first call); at larger sizes that one-off cost is a few per cent of the run.

The table gives, per model and size: PSNR and max abs difference of the tiled output against the same model's
untiled output, tiled / untiled time, and tiled / untiled peak memory. Targets (issue 7, for ours): PSNR >= 50 dB,
time <= 1.15x, peak memory at 1024x1024 <= 0.4x. Times come from separate processes: on a shared machine they are
noisy, re-run on a quiet one before quoting them.

    python benchmarks/bench_tiling.py                       # 512 and 1024, CPU: several minutes
    python benchmarks/bench_tiling.py --sizes 512 --picture docs/images/tiling_seams.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import KL_F8_CONFIG  # noqa: E402

from diffusers_vae_ext.data import pil_to_tensor, resize_and_crop, sample_photos  # noqa: E402
from diffusers_vae_ext.metrics import psnr  # noqa: E402

TILE = 256
IMPLEMENTATIONS = ("ours", "diffusers")


# ------------------------------------------------------------------------------------------------ worker
def build_model(implementation: str, seed: int) -> torch.nn.Module:
    """Our AutoencoderKL or diffusers' with seeded random weights: both initialise the same modules in the same
    order, so the weights are identical (the parent checks their fingerprints), and only one model is ever built
    in a process (building both, to copy weights, would raise the memory baseline)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from diffusers_vae_ext import AutoencoderKL

    torch.manual_seed(seed)
    model_class = AutoencoderKL if implementation == "ours" else DiffusersAutoencoderKL
    return model_class(**KL_F8_CONFIG).eval()


def photo(size: int) -> torch.Tensor:
    return pil_to_tensor(resize_and_crop(sample_photos()["astronaut"], (size, size))[0])[None]


def state_dict_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_configuration(implementation: str, tiled: bool, size: int, args: argparse.Namespace) -> None:
    """One configuration in this (fresh) process; writes the output image (.npy) and a JSON of measurements."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(implementation, args.seed).to(device)
    image = photo(size).to(device)
    if tiled:
        if implementation == "ours":
            model.enable_tiling(tile_sample_size=TILE)
        else:
            model.enable_tiling()
            model.tile_sample_min_size, model.tile_latent_min_size = TILE, TILE // 8

    def round_trip() -> torch.Tensor:
        latents = model.encode(image).latent_dist.mode()
        return model.decode(latents).sample

    # Baseline: what the process holds with the model and the input loaded, before any activation exists.
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
    with torch.inference_mode():
        if size <= args.warmup_max_size:
            round_trip()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = round_trip()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()
    np.save(args.out / f"{implementation}_{int(tiled)}_{size}.npy", out.float().cpu().numpy())
    result = {"seconds": seconds, "peak": peak, "baseline": baseline, "weights": state_dict_digest(model)}
    (args.out / f"{implementation}_{int(tiled)}_{size}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent
def measure(implementation: str, tiled: bool, size: int, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", implementation, str(int(tiled)), str(size), "--out", str(folder)]
    command += ["--device", args.device, "--seed", str(args.seed), "--warmup-max-size", str(args.warmup_max_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = json.loads((folder / f"{implementation}_{int(tiled)}_{size}.json").read_text())
    result["image"] = torch.from_numpy(np.load(folder / f"{implementation}_{int(tiled)}_{size}.npy"))
    return result


def seam_picture(results: dict, size: int, path: Path, amplify: int = 50, crop: int = 96, zoom: int = 2) -> None:
    """Untiled | diffusers tiled | ours tiled | |diffusers - untiled| x amplify | |ours - untiled| x amplify, for a
    crop centred on the corner where four 256-pixel tiles meet."""
    centre = TILE if size > TILE else size // 2
    window = (
        slice(None),
        slice(centre - crop // 2, centre + crop // 2),
        slice(centre - crop // 2, centre + crop // 2),
    )
    untiled = results["ours", False, size]["image"][0][window]
    panels = [
        ("untiled", untiled),
        ("diffusers tiled", results["diffusers", True, size]["image"][0][window]),
        ("ours tiled", results["ours", True, size]["image"][0][window]),
    ]

    def to_pixels(image: torch.Tensor) -> np.ndarray:
        return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

    def amplified(image: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
        return ((image - reference).abs() * 127.5 * amplify).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()

    tiles = [to_pixels(image) for _, image in panels]
    tiles += [amplified(panels[1][1], untiled), amplified(panels[2][1], untiled)]
    labels = [name for name, _ in panels] + [f"|diffusers - untiled| x{amplify}", f"|ours - untiled| x{amplify}"]
    side, label_height, gap = crop * zoom, 16, 4
    canvas = Image.new("RGB", (len(tiles) * (side + gap) - gap, side + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (pixels, label) in enumerate(zip(tiles, labels)):
        left = index * (side + gap)
        canvas.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (left, label_height))
        draw.text((left + 2, 2), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes (multiples of 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-max-size", type=int, default=512, help="warm up first at sizes up to this")
    parser.add_argument("--picture", type=Path, default=None, help="write the seam picture (PNG) of the first size")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "TILED", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        implementation, tiled, size = args.worker
        run_configuration(implementation, tiled == "1", int(size), args)
        return 0
    if any(size % 8 or size <= TILE for size in args.sizes):
        parser.error(f"--sizes must be multiples of 8 larger than the {TILE}-pixel tile, got {args.sizes}")

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for implementation in IMPLEMENTATIONS:
                for tiled in (False, True):
                    print(f"running {implementation} {'tiled' if tiled else 'untiled'} {size}x{size} ...", flush=True)
                    results[implementation, tiled, size] = measure(implementation, tiled, size, args, Path(folder))

    if len({result["weights"] for result in results.values()}) != 1:
        raise RuntimeError("ours and diffusers' models did not get identical weights")
    unit = "GPU max allocated" if args.device.startswith("cuda") else "peak RSS"
    threads = f", {args.threads or torch.get_num_threads()} threads" if args.device == "cpu" else ""
    print(f"\nkl-f8 AutoencoderKL, astronaut photo encoded + decoded, fp32, {args.device}{threads}, {TILE}-px tiles\n")
    print(
        f"| model | size | PSNR tiled vs untiled (dB) | max abs diff | time tiled / untiled (s) | ratio "
        f"| {unit} tiled / untiled (GiB) | ratio | above baseline tiled / untiled (GiB) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    gib = 2.0**30
    for size in args.sizes:
        for implementation in IMPLEMENTATIONS:
            tiled, untiled = results[implementation, True, size], results[implementation, False, size]
            quality = psnr(untiled["image"], tiled["image"]).item()
            diff = (tiled["image"] - untiled["image"]).abs().max().item()
            extra = [r["peak"] - r["baseline"] for r in (tiled, untiled)]
            print(
                f"| {implementation} | {size} | {quality:.1f} | {diff:.1e} "
                f"| {tiled['seconds']:.1f} / {untiled['seconds']:.1f} | {tiled['seconds'] / untiled['seconds']:.2f} "
                f"| {tiled['peak'] / gib:.2f} / {untiled['peak'] / gib:.2f} | {tiled['peak'] / untiled['peak']:.2f} "
                f"| {extra[0] / gib:.2f} / {extra[1] / gib:.2f} | {extra[0] / max(extra[1], 1):.2f} |"
            )
    if args.picture is not None:
        seam_picture(results, args.sizes[0], args.picture)
        print(f"\nwrote {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
