"""Model speed and bf16 quality: `diffusers_vae_ext.AutoencoderKL` against diffusers' AutoencoderKL, one table.

Every model is the Stable Diffusion kl-f8 architecture (block_out_channels 128/256/512/512, four levels,
layers_per_block 2, latent_channels 4) with the same seeded random weights: ours (fp32 and a bf16 copy), diffusers'
default (contiguous) and diffusers with model and input in channels_last (the one-line change any user can make:
the fairer peer). Inputs are real photos (scikit-image's astronaut first), centre-cropped to each size. After a
warm-up call of each, the models alternate for `--rounds` rounds in this one process (the order flips every
round) under `torch.inference_mode()`; each time is the best of the rounds and every ratio is taken between
times measured side by side. The table rows:

- ours fp32 / diffusers fp32 channels_last, encode and decode per size (goal <= 0.8), with the max abs difference
  of the outputs from diffusers' (goal <= 1e-4); ours / diffusers' default layout for context;
- ours bf16 (the model cast with `.to(torch.bfloat16)`, bf16 input) / diffusers fp32, encode + decode (goal
  <= 0.35 on a CPU with AMX);
- bf16 round trip vs fp32 round trip, PSNR on the photos (goal >= 40 dB), and the same for images decoded (in
  fp32) from posterior draws of bf16 vs fp32 moments with the same noise (what a bf16 latent cache gives);
  on the random-weight kl-f8 and, when `--demo_vae` (default runs/demo, README command 1's output) exists, on that
  trained VAE;
- decode GFLOP/s, counting the FLOPs our path executes (`FlopCounterMode` on our decode, attention and the oneDNN
  convolutions included), divided by the best GFLOP/s of a 2048x2048 matmul in the same dtype, timed in the same
  rounds as the model calls (goal >= 0.85);
- `precompute_latents(..., dtype="bf16")` images/s / fp32 images/s at 256 px (goal >= 2.5 on a CPU with AMX);
- training s/step of scripts/finetune_vae.py, default (`--mixed_precision auto`: bf16 autocast where bf16 is
  native) / `--mixed_precision no` (goal <= 0.5 on AMX); `--train demo` runs README command 1 in full both ways
  and adds the held-out PSNR difference (goal within 0.3 dB).

The header names the CPU, torch's CPU capability and the path `diffusers_vae_ext.hardware` chooses; the load
average before and after says how busy the machine was. On a shared machine timings are noisy: compare ratios,
not seconds, and re-run on a quiet machine before quoting numbers.

    python benchmarks/bench_model.py                                   # everything, 256 and 512 px
    python benchmarks/bench_model.py --sizes 256 --skip cache train    # model rows only
    python benchmarks/bench_model.py --train demo                      # + two full README command 1 runs
    python benchmarks/bench_model.py --device cuda --sizes 512 1024    # on a GPU (fp32 vs bf16 there)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers_vae_ext import AutoencoderKL  # noqa: E402
from diffusers_vae_ext.data import (  # noqa: E402
    SAMPLE_PHOTO_NAMES,
    pil_to_tensor,
    resize_and_crop,
    sample_photos,
    tensor_to_pil,
)
from diffusers_vae_ext.hardware import choose_path, configure_backends, describe_path  # noqa: E402
from diffusers_vae_ext.metrics import psnr  # noqa: E402

KL_F8_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ helpers
def build_models(seed: int, device: torch.device, dtype: torch.dtype):
    """Ours with seeded random weights and diffusers' AutoencoderKL holding an exact copy of them."""
    torch.manual_seed(seed)
    ours = AutoencoderKL(**KL_F8_CONFIG).eval()
    theirs = DiffusersAutoencoderKL(**KL_F8_CONFIG).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if device.type == "cpu" and dtype == torch.float32:
        return ours, theirs
    return ours.to(device, dtype), theirs.to(device, dtype)


def half_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Parameter-wise, not `.to(dtype)`: diffusers' override warns about fp32-pinned modules even when there are none.
    twin = copy.deepcopy(model)
    for param in twin.parameters():
        param.data = param.data.to(dtype)
    return twin


def photo_batch(size: int, batch: int) -> torch.Tensor:
    """`batch` real photos (astronaut first, then the other scikit-image samples), centre-cropped to size x size."""
    photos = sample_photos()
    names = [SAMPLE_PHOTO_NAMES[i % len(SAMPLE_PHOTO_NAMES)] for i in range(batch)]
    return torch.stack([pil_to_tensor(resize_and_crop(photos[name], (size, size))[0]) for name in names])


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype`: the chip's practical peak for that dtype in this run."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_conv_flops(*args, out_shape=None, **kwargs) -> int:
    # mkldnn::_convolution_pointwise(X, W, ...), its .binary(X, other, W, ...): the weight follows the tensors.
    x_shape, second, third = args[0], args[1], args[2]
    w_shape = third if isinstance(third, (tuple, list, torch.Size)) and len(third) == 4 else second
    return conv_flop_count(x_shape, w_shape, out_shape)


def _onednn_conv_inplace_flops(*args, out_shape=None, **kwargs) -> int:
    # mkldnn::_convolution_pointwise_.binary(other, X, W, ...), the residual-fused convolution.
    return conv_flop_count(args[1], args[2], out_shape)


def counted_flops(fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of the ops `fn` executes (convolutions, matmuls, attention; elementwise work is not counted)."""
    # FlopCounterMode knows the CUDA attention kernels but neither the CPU flash-attention op nor the oneDNN
    # convolutions on packed weights that our path runs.
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.mkldnn._convolution_pointwise: _onednn_conv_flops,
        torch.ops.mkldnn._convolution_pointwise_: _onednn_conv_inplace_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, row: str, value: str, goal: str = "", met: bool | None = None, note: str = "") -> None:
        verdict = "" if met is None else ("yes" if met else "no")
        if note:
            verdict = f"{verdict} ({note})" if verdict else note
        self.rows.append((row, value, goal, verdict))

    def print(self) -> None:
        print("| row | measured | goal | met |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


# ------------------------------------------------------------------------------------------------ sections
def speed_rows(args, device: torch.device, table: Table, peaks: dict, size: int) -> None:
    ours, theirs = build_models(args.seed, device, torch.float32)
    if device.type != "cpu":
        ours, theirs = ours.to(device), theirs.to(device)
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    low = torch.bfloat16 if device.type == "cpu" else choose_path(device).dtype
    ours_low = half_copy(ours, low)
    images = photo_batch(size, args.batch).to(device)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        latents = theirs.encode(images).latent_dist.mean
        latents_cl = latents.contiguous(memory_format=torch.channels_last)
        matmul = {dtype: [torch.randn(2048, 2048, device=device).to(dtype) for _ in range(2)] for dtype in peaks}
        calls = {
            ("matmul", torch.float32): lambda: torch.mm(*matmul[torch.float32]),
            ("matmul", low): lambda: torch.mm(*matmul[low]),
            ("encode", "ours"): lambda: ours.encode(images).latent_dist.parameters,
            ("encode", "diffusers"): lambda: theirs.encode(images).latent_dist.parameters,
            ("encode", "diffusers_cl"): lambda: theirs_cl.encode(images_cl).latent_dist.parameters,
            ("encode", "ours_low"): lambda: ours_low.encode(images.to(low)).latent_dist.parameters,
            ("decode", "ours"): lambda: ours.decode(latents).sample,
            ("decode", "diffusers"): lambda: theirs.decode(latents).sample,
            ("decode", "diffusers_cl"): lambda: theirs_cl.decode(latents_cl).sample,
            ("decode", "ours_low"): lambda: ours_low.decode(latents.to(low)).sample,
        }
        for fn in calls.values():  # warm-up: oneDNN/cuDNN pick and build their kernels on the first call
            fn()
        best = dict.fromkeys(calls, float("inf"))
        outputs = {}
        keys = list(calls)
        for round_index in range(args.rounds):
            for key in keys if round_index % 2 == 0 else keys[::-1]:
                seconds, outputs[key] = timed(calls[key], device)
                best[key] = min(best[key], seconds)
        flops = {name: counted_flops(calls["decode", name]) for name in ("ours", "ours_low")}
    # The matmul peaks of this section's own rounds, taken between the model calls (the load changes over a run).
    peaks = {dtype: max(peaks[dtype], 2 * 2048**3 / best["matmul", dtype] / 1e9) for dtype in peaks}

    low_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[low]
    for op in ("encode", "decode"):
        diff = max_diff(outputs[op, "ours"], outputs[op, "diffusers"])
        ratio = best[op, "ours"] / best[op, "diffusers_cl"]
        table.add(
            f"{op} {size} px: ours fp32 / diffusers fp32 channels_last",
            f"{ratio:.2f} ({best[op, 'ours']:.3f} s / {best[op, 'diffusers_cl']:.3f} s); max abs diff {diff:.1e}",
            "<= 0.8, diff <= 1e-4",
            ratio <= 0.8 and diff <= 1e-4,
        )
        table.add(
            f"{op} {size} px: ours fp32 / diffusers fp32 default layout",
            f"{best[op, 'ours'] / best[op, 'diffusers']:.2f} (diffusers {best[op, 'diffusers']:.3f} s)",
        )
    round_trip = {name: best["encode", name] + best["decode", name] for name in ("ours", "ours_low", "diffusers")}
    ratio = round_trip["ours_low"] / round_trip["diffusers"]
    amx = getattr(choose_path(device).cpu, "amx_bf16", False)
    table.add(
        f"encode+decode {size} px: ours {low_name} / diffusers fp32",
        f"{ratio:.2f} ({round_trip['ours_low']:.3f} s / {round_trip['diffusers']:.3f} s); "
        f"ours {low_name} / ours fp32 {round_trip['ours_low'] / round_trip['ours']:.2f}",
        "<= 0.35 on an AMX CPU",
        ratio <= 0.35 if (amx or device.type != "cpu") else None,
        note="" if (amx or device.type != "cpu") else "no AMX here: not measurable",
    )
    for name, dtype, label in (("ours", torch.float32, "fp32"), ("ours_low", low, low_name)):
        gflops = flops[name] / best["decode", name] / 1e9
        ratio = gflops / peaks[dtype]
        table.add(
            f"decode {size} px {label}: GFLOP/s of our path / matmul GFLOP/s",
            f"{ratio:.2f} ({flops[name] / 1e9:.0f} GFLOP in {best['decode', name]:.3f} s = {gflops:.0f} GFLOP/s; "
            f"matmul {peaks[dtype]:.0f})",
            ">= 0.85",
            ratio >= 0.85,
        )


def quality_rows(args, device: torch.device, table: Table, vae: AutoencoderKL, label: str, size: int) -> None:
    """bf16 vs fp32 round trips on the photos, and decodes of posterior draws from bf16 vs fp32 moments."""
    vae = vae.to(device).eval()
    low = torch.bfloat16 if device.type == "cpu" else choose_path(device).dtype
    vae_low = half_copy(vae, low)
    images = photo_batch(size, len(SAMPLE_PHOTO_NAMES)).to(device)
    names = ", ".join(SAMPLE_PHOTO_NAMES)
    with torch.inference_mode():
        post32 = vae.encode(images).latent_dist
        post16 = vae_low.encode(images.to(low)).latent_dist
        round32 = vae.decode(post32.mean).sample
        round16 = vae_low.decode(post16.mean).sample
        # A bf16 latent cache stores mean and logvar in bf16; a training loop draws mean + std * eps from them.
        noise = torch.randn(post32.mean.shape, generator=torch.Generator().manual_seed(0)).to(device)
        draw32 = post32.mean + post32.std * noise
        draw16 = post16.mean.float() + torch.exp(0.5 * post16.logvar.float()) * noise
        cached32, cached16 = vae.decode(draw32).sample, vae.decode(draw16).sample
    low_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[low]
    for what, a, b in (("round trip", round32, round16), ("decoded posterior draws", cached32, cached16)):
        values = psnr(a.float().cpu(), b.float().cpu())
        table.add(
            f"{low_name} vs fp32 {what}, {label}, {size} px",
            f"min {values.min():.1f} dB, mean {values.mean():.1f} dB ({len(values)} photos: {names})",
            ">= 40 dB",
            bool(values.min() >= 40),
        )


def cache_rows(args, device: torch.device, table: Table) -> None:
    from diffusers_vae_ext.cache import precompute_latents

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**KL_F8_CONFIG).eval().to(device)
    workdir = Path(tempfile.mkdtemp(prefix="bench_model_cache_"))
    try:
        photos = workdir / "photos"
        photos.mkdir()
        for index, image in enumerate(photo_batch(args.cache_size, args.cache_images)):
            tensor_to_pil(image).save(photos / f"{index:03d}.png")

        def run(dtype: str) -> float:
            start = time.perf_counter()
            precompute_latents(
                vae,
                workdir / f"cache_{dtype}",
                train_data_dir=photos,
                resolution=args.cache_size,
                center_crop=True,
                dtype=dtype,
                batch_size=args.batch_size,
                num_workers=0,
                overwrite=True,
                progress=False,
            )
            return time.perf_counter() - start

        run("bf16")  # warm-up: kernels for both dtypes
        run("fp32")
        times = {"fp32": float("inf"), "bf16": float("inf")}
        for round_index in range(args.rounds):
            for dtype in ("fp32", "bf16") if round_index % 2 == 0 else ("bf16", "fp32"):
                times[dtype] = min(times[dtype], run(dtype))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rates = {dtype: args.cache_images / seconds for dtype, seconds in times.items()}
    ratio = rates["bf16"] / rates["fp32"]
    amx = getattr(choose_path(device).cpu, "amx_bf16", False)
    table.add(
        f"`diffusers-vae cache --dtype bf16` / fp32 images/s, {args.cache_size} px",
        f"{ratio:.2f} ({rates['bf16']:.2f} / {rates['fp32']:.2f} images/s, {args.cache_images} photos, "
        f"batch {args.batch_size})",
        ">= 2.5 on an AMX CPU",
        ratio >= 2.5 if amx else None,
        note="" if amx else "no AMX here: not measurable",
    )


def train_rows(args, table: Table) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import run_demo, run_variant

    amx = getattr(choose_path("cpu").cpu, "amx_bf16", False)
    if args.train == "demo":
        runs = {mode: run_demo(mode, args.threads) for mode in ("auto", "no")}
        ratio = runs["auto"]["seconds_per_step"] / runs["no"]["seconds_per_step"]
        gap = runs["auto"]["psnr"] - runs["no"]["psnr"]
        table.add(
            "README command 1 (600 steps): default (auto) / --mixed_precision no, s/step",
            f"{ratio:.2f} ({runs['auto']['wall']:.0f} s vs {runs['no']['wall']:.0f} s wall; "
            f"{runs['auto']['mixed_precision']} vs no)",
            "<= 0.5 on an AMX CPU; default <= 180 s",
            ratio <= 0.5 if amx else runs["auto"]["wall"] <= 180,
            note="" if amx else "no AMX: checked the 180 s only",
        )
        table.add(
            "README command 1: held-out PSNR, default - fp32",
            f"{gap:+.2f} dB ({runs['auto']['psnr']:.2f} vs {runs['no']['psnr']:.2f})",
            "within 0.3 dB",
            abs(gap) <= 0.3,
        )
        return
    steps = {
        mode: run_variant(["--mixed_precision", mode], args.train_steps, 64, 8, args.threads)
        for mode in ("auto", "no")
    }
    ratio = steps["auto"]["seconds"] / steps["no"]["seconds"]
    table.add(
        f"training s/step (small_rgb 64 px, batch 8, {args.train_steps} steps): default / --mixed_precision no",
        f"{ratio:.2f} ({steps['auto']['seconds']:.3f} / {steps['no']['seconds']:.3f} s)",
        "<= 0.5 on an AMX CPU",
        ratio <= 0.5 if amx else None,
        note="" if amx else "no AMX here: not measurable",
    )


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (multiples of 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality_size", type=int, default=256, help="photo size of the bf16 quality rows")
    parser.add_argument("--demo_vae", default=str(REPO / "runs" / "demo"), help="a trained VAE folder, if present")
    parser.add_argument("--cache_images", type=int, default=16)
    parser.add_argument("--cache_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4, help="cache batch size")
    parser.add_argument("--train", choices=("steps", "demo"), default="steps", help="short runs, or full demos")
    parser.add_argument("--train_steps", type=int, default=24)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("speed", "quality", "cache", "train"), help="sections to leave out"
    )
    args = parser.parse_args(argv)
    if any(size % 8 for size in args.sizes):
        parser.error(f"--sizes must be multiples of 8 (the kl-f8 downsampling factor), got {args.sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    path = choose_path(device)
    configure_backends(path)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, {args.threads} threads")
    print(f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}")
    print(f"path: {describe_path(path)}")
    low = torch.bfloat16 if device.type == "cpu" else path.dtype
    peaks = {dtype: matmul_gflops(dtype, device) for dtype in (torch.float32, low)}
    print("matmul 2048^2: " + ", ".join(f"{str(d).removeprefix('torch.')} {g:.0f} GFLOP/s" for d, g in peaks.items()))

    table = Table()
    if "speed" not in args.skip:
        for size in args.sizes:
            speed_rows(args, device, table, peaks, size)
    if "quality" not in args.skip:
        ours, _ = build_models(args.seed, torch.device("cpu"), torch.float32)
        quality_rows(args, device, table, ours, "kl-f8 random weights", args.quality_size)
        if Path(args.demo_vae, "config.json").is_file():
            demo = AutoencoderKL.from_pretrained(args.demo_vae)
            quality_rows(args, device, table, demo, f"trained {Path(args.demo_vae).name} VAE", args.quality_size)
        else:
            table.add("bf16 quality on the trained demo VAE", f"skipped: no VAE at {args.demo_vae}")
    if "cache" not in args.skip:
        cache_rows(args, device, table)
    if "train" not in args.skip and device.type == "cpu":
        train_rows(args, table)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average before {load_before}, after {load_after}; best of {args.rounds} rounds\n")
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
