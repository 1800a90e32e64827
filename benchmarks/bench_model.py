"""Encode/decode time of `diffusers_vae_ext.AutoencoderKL` against diffusers' AutoencoderKL, identical weights.

Builds both models on the Stable Diffusion kl-f8 architecture (block_out_channels 128/256/512/512, four
DownEncoderBlock2D/UpDecoderBlock2D levels, layers_per_block 2, latent_channels 4, norm_num_groups 32) with the
same seeded random weights, encodes real photos (scikit-image's astronaut and friends, resized) and decodes
diffusers' posterior means. After a warm-up call of each, the two models alternate for `--rounds` rounds in this
one process (the order flips every round), under `torch.inference_mode()`. It prints a markdown table with the best
time of each (seconds), ours / diffusers, and the max abs difference of the outputs (encode: the posterior mean
and log-variance; decode: the image).

Target (issue 2): ratio <= 0.8 for encode and decode at 256x256, batch 1, float32, max abs diff <= 1e-4.

Timings on a shared or busy CPU are noisy: other processes steal cores and memory bandwidth in bursts. Best-of-N
over alternating rounds keeps the ratio meaningful, but compare ratios, not absolute seconds, and re-run on a quiet
machine before quoting numbers.

Measured on 2026-12-02, this project's 2-core CPU, nothing else running, `--size 256 --rounds 5`:
encode 0.713 s (diffusers) vs 0.621 s (ours) = 0.87, decode 1.591 s vs 1.220 s = 0.77; max abs diff 3.8e-5 and
5.2e-5. Decode meets the 0.8 target, encode does not: 88% of our encode is the 3x3 convolutions, which already
run at about 450 GFLOP/s on the two cores (channels_last gains 20-45% at 128-256 channels but nothing at 512,
where oneDNN is at peak in either layout). Summed per-layer, our convolutions alone take 0.56 s, 0.78 of
diffusers' whole encode, so 0.8 would need the remaining GroupNorm/attention/copies (0.06 s) nearly free or
fewer FLOPs (a Winograd prototype in eager PyTorch was 2-4x slower).

    python benchmarks/bench_model.py --size 256 --rounds 5
    python benchmarks/bench_model.py --device cuda --dtype float16 --size 512 --batch 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.data import SAMPLE_PHOTO_NAMES, pil_to_tensor, resize_and_crop, sample_photos

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


def build_models(seed: int, device: torch.device, dtype: torch.dtype):
    """Ours with seeded random weights and diffusers' AutoencoderKL holding an exact copy of them."""
    torch.manual_seed(seed)
    ours = AutoencoderKL(**KL_F8_CONFIG).eval()
    theirs = DiffusersAutoencoderKL(**KL_F8_CONFIG).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if device.type == "cpu" and dtype == torch.float32:
        return ours, theirs
    return ours.to(device, dtype), theirs.to(device, dtype)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width (multiple of 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per model and op (best is reported)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error(f"--size must be a multiple of 8 (the kl-f8 downsampling factor), got {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = build_models(args.seed, device, dtype)
    images = photo_batch(args.size, args.batch).to(device, dtype)
    with torch.inference_mode():
        latents = theirs.encode(images).latent_dist.mean
        ops = {
            "encode": {m: (lambda m=m: m.encode(images).latent_dist.parameters) for m in (ours, theirs)},
            "decode": {m: (lambda m=m: m.decode(latents).sample) for m in (ours, theirs)},
        }
        best = {(op, m): float("inf") for op in ops for m in (ours, theirs)}
        outputs = {}
        for fns in ops.values():  # warm-up: oneDNN/cuDNN pick and build their kernels on the first call
            for fn in fns.values():
                fn()
        for round_index in range(args.rounds):
            order = (ours, theirs) if round_index % 2 == 0 else (theirs, ours)
            for op, fns in ops.items():
                for model in order:
                    seconds, out = timed(fns[model], device)
                    best[op, model] = min(best[op, model], seconds)
                    outputs[op, model] = out

    print(
        f"AutoencoderKL kl-f8, {args.batch}x3x{args.size}x{args.size}, {args.dtype}, {device.type}"
        f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}, best of {args.rounds} rounds\n"
    )
    print("| op | diffusers s | ours s | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    for op in ops:
        diff = (outputs[op, ours].float() - outputs[op, theirs].float()).abs().max().item()
        ratio = best[op, ours] / best[op, theirs]
        print(f"| {op} | {best[op, theirs]:.3f} | {best[op, ours]:.3f} | {ratio:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
