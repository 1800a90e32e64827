"""Tiling on every supported autoencoder class: the class's own tiler (diffusers') against untiled, and ours.

`AutoencoderAdapter.enable_tiling` runs our exact tiler for `AutoencoderKL` and each other class's own
`enable_tiling` (overlapping tiles blended together). This script measures how far each tiled reconstruction is
from the untiled one: a real photo (scikit-image's astronaut) for image classes, a pan-and-zoom clip over it for
video classes, encoded (posterior mean) and decoded untiled and with 128-pixel tiles (stride 96 where the class
takes one), on small models (factor 8, 32-64 channels) with seeded random weights. Random weights are not
trained ones: the PSNR shows how much the blending of truncated tiles changes the output, not image quality.

The table gives per class: PSNR and max abs difference of tiled against untiled (both clamped to [-1, 1]), and
tiled / untiled time (in this process, best of `--rounds`; noisy on a shared machine). It starts with the CPU
model and torch's CPU capability.

    python benchmarks/bench_autoencoders.py                 # all classes, 256 px images, 9 x 192 px clips
    python benchmarks/bench_autoencoders.py --classes AutoencoderKL AutoencoderKLWan --rounds 3
"""

from __future__ import annotations

import argparse
import time

import diffusers
import torch

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.data import pil_to_tensor, resize_and_crop, sample_photos
from diffusers_vae_ext.hardware import cpu_info
from diffusers_vae_ext.metrics import psnr
from diffusers_vae_ext.video import frames_to_tensor, pan_zoom_frames

TILE, STRIDE = 128, 96
KL = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16)
CONFIGS = {
    "AutoencoderKL": dict(KL, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "AutoencoderKLFlux2": dict(
        KL, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4
    ),
    "AutoencoderDC": dict(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(32, 64, 64, 64),
        decoder_block_out_channels=(32, 64, 64, 64),
        encoder_qkv_multiscales=((), (), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (5,), (5,)),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    ),
    "AutoencoderTiny": dict(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4),
    "AutoencoderKLWan": dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "AutoencoderKLQwenImage": dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "AutoencoderKLHunyuanVideo": dict(
        latent_channels=8,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "AutoencoderKLLTXVideo": dict(
        latent_channels=16,
        block_out_channels=(16, 32, 32, 32),
        decoder_block_out_channels=(16, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
    ),
    "AutoencoderKLCogVideoX": dict(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=8,
        sample_height=256,
        sample_width=256,
    ),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    klass = AutoencoderKL if name == "AutoencoderKL" else getattr(diffusers, name)
    return klass(**CONFIGS[name]).eval()


def enable_small_tiles(adapter) -> None:
    """128-pixel tiles through each class's own `enable_tiling` (its own argument names, or its attributes)."""
    vae, name = adapter.vae, adapter.class_name
    if name == "AutoencoderKL":
        adapter.enable_tiling(tile_sample_size=TILE)
    elif name in ("AutoencoderKLFlux2", "AutoencoderTiny"):
        adapter.enable_tiling()
        vae.tile_sample_min_size = TILE
        vae.tile_latent_min_size = TILE // adapter.spatial_factor
    elif name == "AutoencoderKLCogVideoX":
        adapter.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE)
    else:
        adapter.enable_tiling(
            tile_sample_min_height=TILE,
            tile_sample_min_width=TILE,
            tile_sample_stride_height=STRIDE,
            tile_sample_stride_width=STRIDE,
        )


@torch.no_grad()
def reconstruct(adapter, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    moments = adapter.encode_moments(pixels)
    decoded = adapter.decode(adapter.latents_from_moments(moments, sample=False)).clamp(-1, 1)
    return decoded, time.perf_counter() - start


def frames_of(video: torch.Tensor) -> torch.Tensor:
    return video.transpose(1, 2).flatten(0, 1) if video.ndim == 5 else video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=list(CONFIGS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--video-size", type=int, default=192)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=1, help="best of this many timed runs each")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_info().model}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"threads: {torch.get_num_threads()}; tiles {TILE} px, stride {STRIDE} px; seeded random weights")
    photo = sample_photos()["astronaut"]
    image = pil_to_tensor(resize_and_crop(photo, (args.image_size, args.image_size))[0])[None]
    clip = frames_to_tensor(pan_zoom_frames(photo, args.frames, (args.video_size, args.video_size)))[None]
    header = f"{'class':<28}{'input':>18}{'PSNR dB':>10}{'max |diff|':>12}{'time ratio':>12}"
    print(header)
    print("-" * len(header))
    for name in args.classes:
        adapter = as_autoencoder(build(name))
        pixels = clip if adapter.is_video else image
        shape = "x".join(str(s) for s in pixels.shape[2:])
        untiled_times, tiled_times = [], []
        try:
            for _ in range(args.rounds):
                adapter.disable_tiling()
                untiled, seconds = reconstruct(adapter, pixels)
                untiled_times.append(seconds)
                enable_small_tiles(adapter)
                tiled, seconds = reconstruct(adapter, pixels)
                tiled_times.append(seconds)
        except RuntimeError as err:  # the adapter's shape check: the class's tiler returned another size
            print(f"{name:<28}{shape:>18}   {err}")
            continue
        finally:
            adapter.disable_tiling()
        value = psnr(frames_of(untiled), frames_of(tiled)).mean().item()
        print(
            f"{name:<28}{shape:>18}{value:>10.1f}{(tiled - untiled).abs().max().item():>12.3g}"
            f"{min(tiled_times) / min(untiled_times):>12.2f}"
        )


if __name__ == "__main__":
    main()
