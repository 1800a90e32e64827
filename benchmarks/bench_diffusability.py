"""Diffusability probe: its cost, and the three cases whose answer is known (docs/diffusability.md).

1. Seconds of the default `measure_diffusability` (training + held-out evaluation) on 256 random latents of
   4x32x32 and of 16x32x32 (goal: under 2 minutes each on 2 cores).
2. On latents of a small random-weight KL VAE (2 levels, 4 channels) of 256 random crops of the scikit-image
   photos: the original latents, the same latents times a fixed random +-1 mask (one sign per channel and
   position, the same for every sample: a bijection that keeps per-element statistics and destroys spatial
   smoothness), a random orthogonal mix of the channels, and i.i.d. Gaussian noise. The table gives probe_loss,
   high_frequency_energy and each case's ratio to the original (the scramble's margin: the wider the better; the
   rotation's: close to 1; Gaussian: probe_loss about 1.0).

Prints the CPU model and torch's CPU capability first: the seconds depend on them and on the machine's load.

    python benchmarks/bench_diffusability.py                     # default budget, 32x32 latents (64 px crops)
    python benchmarks/bench_diffusability.py --steps 150 --crop 40   # the test suite's setting (20x20 latents)
    python benchmarks/bench_diffusability.py --skip_timing --skip_cases --report /tmp/report  # the docs' report

`--report DIR` also runs `diffusers-vae eval --diffusability` on the crops (written as PNG files) with two VAEs
that reconstruct identically: the small VAE and its sign-scrambled twin (`ScrambledTwin`: the encoder's mean is
multiplied by the fixed +-1 mask, the decoder divides it out).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.data import pil_to_tensor, sample_photos
from diffusers_vae_ext.diffusability import measure_diffusability
from diffusers_vae_ext.hardware import cpu_info


class ScrambledTwin(AutoencoderKL):
    """The same VAE with its latent space sign-scrambled: `mean * mask` out of the encoder, `z * mask` into the
    decoder, with a fixed random +-1 mask per (channel, y, x) (seeded by the latent shape). Reconstructions, KL and
    per-element statistics up to sign are the original's; spatial smoothness is gone."""

    def _mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash(shape) % (2**31))
        signs = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
        return signs.to(like.device, like.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = super()._encode(x).chunk(2, dim=1)
        return torch.cat([mean * self._mask(tuple(mean.shape[1:]), mean), logvar], dim=1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return super()._decode(z * self._mask(tuple(z.shape[1:]), z))


def photo_crops(count: int, size: int, max_zoom: float, seed: int = 0) -> torch.Tensor:
    """Random square crops (side between `size` and `max_zoom * size`, area-resized to `size`), [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    photos = [pil_to_tensor(photo) for photo in sample_photos().values()]
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        largest = min(min(photo.shape[1:]), int(max_zoom * size))
        side = int(torch.randint(size, largest + 1, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=generator))
        crop = photo[None, :, top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(crops)


SMALL_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


def small_vae(cls: type = AutoencoderKL, logvar_shift: float = 0.0) -> AutoencoderKL:
    """The small 2-level KL VAE (factor 2, 4 channels) with seeded random weights.

    `logvar_shift` is added to the posterior's log-variance (the bias of `quant_conv`'s logvar half): random weights
    give a posterior std of about 1, so its draws are mostly noise; trained VAEs have small posterior variance."""
    torch.manual_seed(0)
    vae = cls(**SMALL_VAE).eval()
    with torch.no_grad():
        vae.quant_conv.bias[SMALL_VAE["latent_channels"] :] += logvar_shift
    return vae


def write_report_of_twins(pixels: torch.Tensor, output_dir: str, steps: int | None) -> None:
    import tempfile
    from pathlib import Path

    from PIL import Image

    from diffusers_vae_ext.autoencoders import as_autoencoder
    from diffusers_vae_ext.evaluation import EvalVAE, evaluate, write_report

    with tempfile.TemporaryDirectory() as folder:
        for index, crop in enumerate(pixels):
            array = ((crop.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(Path(folder) / f"crop_{index:04d}.png")
        # Posterior std ~exp(-6) like a trained VAE's, so the probed draws carry the encoder's signal.
        vaes = [EvalVAE("small VAE", as_autoencoder(small_vae(logvar_shift=-12.0))),
                EvalVAE("its sign-scrambled twin", as_autoencoder(small_vae(ScrambledTwin, logvar_shift=-12.0)))]  # fmt: skip
        result = evaluate(vaes, output_dir, train_data_dir=folder, resolution=pixels.shape[-1], batch_size=32,
                          diffusability=True, probe_steps=steps, probe_samples=16)  # fmt: skip
    paths = write_report(result)
    print(paths["markdown"].read_text())
    print(f"Report: {paths['html']} (the plots and sample grids are under images/diffusability-*.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="probe steps (default: measure_diffusability's)")
    parser.add_argument("--crop", type=int, default=64, help="crop side in pixels (latents are half of it)")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument("--skip_cases", action="store_true")
    parser.add_argument("--report", default=None, help="also write an eval report (original vs scrambled twin) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {} if args.steps is None else {"steps": args.steps}
    print(f"CPU: {cpu_info().model} | torch {torch.__version__} | capability {torch.backends.cpu.get_cpu_capability()} "
          f"| threads {torch.get_num_threads()} | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip

    if not args.skip_timing:
        print("\n| latents | probe steps | seconds (train) | seconds (total) |\n|---|---|---|---|")
        for channels in (4, 16):
            latents = torch.randn(args.count, channels, 32, 32, generator=torch.Generator().manual_seed(0))
            result = measure_diffusability(latents, **options)
            print(f"| {args.count} x {channels}x32x32 | {result.settings['steps']} | {result.train_seconds:.1f} | "
                  f"{result.seconds:.1f} |", flush=True)  # fmt: skip

    pixels = photo_crops(args.count, args.crop, max_zoom=3.0)
    if args.report:
        write_report_of_twins(pixels, args.report, options.get("steps"))
    if args.skip_cases:
        return
    vae = small_vae()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    generator = torch.Generator().manual_seed(123)
    signs = torch.where(torch.rand(latents.shape[1:], generator=generator) < 0.5, -1.0, 1.0)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    cases = {
        "original": latents,
        "sign-scrambled": latents * signs,
        "channels rotated": torch.einsum("dc,nchw->ndhw", rotation.float(), latents),
        "Gaussian noise": torch.randn(latents.shape, generator=generator),
    }
    shape = "x".join(str(d) for d in latents.shape[1:])
    print(f"\n{args.count} latents of {shape} (crops of {args.crop} px)\n")
    print("| case | probe_loss | ÷ original | high_frequency_energy | seconds |\n|---|---|---|---|---|")
    reference = None
    for name, case in cases.items():
        result = measure_diffusability(case, images=pixels if name == "original" else None, **options)
        reference = reference or result.probe_loss
        print(f"| {name} | {result.probe_loss:.3f} | {result.probe_loss / reference:.3f} | "
              f"{result.high_frequency_energy:.3f} | {result.seconds:.1f} |", flush=True)  # fmt: skip
        if name == "original":
            print(f"| (images at latent resolution) | | | {result.spectrum.image_high_frequency_energy:.3f} | |")


if __name__ == "__main__":
    main()
