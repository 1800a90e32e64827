"""`build_parser`: the `diffusers-vae` subcommands and their arguments (what `--help` shows)."""

from __future__ import annotations

import argparse

from .commands import (
    _cmd_cache,
    _cmd_convert,
    _cmd_convert_inception,
    _cmd_convert_lpips,
    _cmd_eval,
    _cmd_info,
    _cmd_reconstruct,
    _cmd_stats,
)

DESCRIPTION = "The `diffusers-vae` command: one subcommand per job, each a thin wrapper over the package."

# The spellings `hardware.parse_dtype` accepts (not imported from there: that would import torch for `--help`).
DTYPE_CHOICES = "fp32/float32, bf16/bfloat16, fp16/float16 or auto"


def _dtype_arg(value: str) -> str:
    """argparse type: any spelling `hardware.parse_dtype` accepts, kept as given until the device is known."""
    from ..hardware import parse_dtype

    try:
        parse_dtype(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _add_video_options(parser: argparse.ArgumentParser, max_frames: int | None) -> None:
    """The clip options shared by `stats`, `reconstruct` and `cache` (see `video.ClipOptions`)."""
    video = parser.add_argument_group("videos")
    video.add_argument("--num_frames", type=int, default=None, help="frames per clip (video VAEs: e.g. 4k+1)")
    rate = video.add_mutually_exclusive_group()
    rate.add_argument("--frame_stride", type=int, default=None, help="take every n-th frame")
    rate.add_argument("--fps", type=float, default=None, help="resample to this frame rate by timestamps")
    video.add_argument(
        "--max_frames",
        type=int,
        default=max_frames,
        help="without --num_frames: at most this many frames per clip, rounded down to a count the VAE encodes",
    )
    video.add_argument("--clips_per_video", type=int, default=1, help="non-overlapping clips spread over each video")
    video.add_argument("--image_sequence", action="store_true", help="folders of frames are videos")
    video.add_argument("--sequence_fps", type=float, default=24.0, help="frame rate of image sequences")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-vae", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        help="fine-tune a VAE or train one from scratch (= scripts/finetune_vae.py; see `diffusers-vae train --help`)",
        add_help=False,
    )

    info = commands.add_parser(
        "info",
        help="print a VAE folder's config, a fingerprint of its weights, and the execution path on this machine",
    )
    info.add_argument("path", nargs="?", default=None, help="VAE folder (or a pipeline folder with --subfolder vae)")
    info.add_argument("--subfolder", default=None)
    info.set_defaults(func=_cmd_info)

    convert = commands.add_parser(
        "convert-to-safetensors", help="convert a trusted pickle checkpoint (.bin/.ckpt) to safetensors"
    )
    convert.add_argument("path", help="a checkpoint file, or a folder holding one")
    convert.set_defaults(func=_cmd_convert)

    stats = commands.add_parser(
        "stats",
        help="measure scaling_factor, shift_factor and per-channel latents_mean/latents_std from images or videos",
        description="Latent statistics for any supported autoencoder, written where its pipelines read them (see "
        "docs/scaling.md and docs/autoencoders.md). Runs under `accelerate launch`.",
    )
    stats.add_argument("--vae", required=True, help="autoencoder folder or hub repo (a pipeline: --subfolder vae)")
    stats.add_argument("--subfolder", default=None)
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--train_data_dir", default=None, help="folder of images, or of videos (.mp4 .webm .mov .mkv; recursive)"
    )
    source.add_argument("--cache_dir", default=None, help="a latent cache written by `diffusers-vae cache`")
    stats.add_argument("--num_images", type=int, default=None, help="a seeded random subset of this many")
    stats.add_argument("--resolution", type=int, default=512, help="centre crop to this square size")
    stats.add_argument("--batch_size", type=int, default=8)
    stats.add_argument(
        "--sample_posterior",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="statistics of posterior samples (default, the LDM recipe) or, with --no-sample_posterior, of means",
    )
    stats.add_argument("--seed", type=int, default=0, help="posterior noise and --num_images subset")
    stats.add_argument(
        "--convention",
        choices=("scale", "shift", "per_channel"),
        default=None,
        help="which keys to compute and write (default: the convention the class's pipelines / the config use)",
    )
    stats.add_argument(
        "--write_config",
        action="store_true",
        help="write the numbers into the folder where its pipelines read them (config.json; weights for LTX/FLUX.2)",
    )
    stats.add_argument("--dtype", type=_dtype_arg, default="float32", help=f"encode dtype: {DTYPE_CHOICES}")
    stats.add_argument("--dataloader_num_workers", type=int, default=0)
    stats.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_video_options(stats, max_frames=33)
    stats.set_defaults(func=_cmd_stats)

    reconstruct = commands.add_parser(
        "reconstruct",
        help="encode+decode images and videos with any supported autoencoder, write input|reconstruction files, "
        "print PSNR/SSIM",
        description="Images give side-by-side PNGs; videos (.mp4 .webm .mov .mkv, or image-sequence folders with "
        "--image_sequence) give side-by-side mp4 or animated WebP clips with PSNR/SSIM per clip (means over its "
        "frames). See docs/autoencoders.md.",
    )
    reconstruct.add_argument("images", nargs="+", help="image files, video files, or folders of them")
    reconstruct.add_argument("--vae", required=True, help="autoencoder folder or hub repo (safetensors only)")
    reconstruct.add_argument("--subfolder", default=None, help='e.g. "vae" for a pipeline folder or repo')
    reconstruct.add_argument("--output-dir", required=True, help="where the side-by-side files are written")
    reconstruct.add_argument(
        "--size-policy",
        choices=("pad", "crop"),
        default="pad",
        help="sides not divisible by the VAE factor: pad (mirror, cut off again before metrics) or centre-crop",
    )
    reconstruct.add_argument(
        "--sample-posterior", action="store_true", help="decode a posterior draw instead of its mean"
    )
    reconstruct.add_argument("--seed", type=int, default=0, help="seed of the posterior draw (per image or clip)")
    reconstruct.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    reconstruct.add_argument(
        "--dtype",
        type=_dtype_arg,
        default="float32",
        help=f"{DTYPE_CHOICES}; auto: bfloat16 where it is native (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else float32",
    )
    reconstruct.add_argument("--tiling", action="store_true", help="enable the autoencoder's tiling")
    _add_video_options(reconstruct, max_frames=33)
    reconstruct.add_argument("--resolution", type=int, default=None, help="resize video frames to this short side")
    reconstruct.add_argument("--video_format", choices=("mp4", "webp"), default="mp4", help="side-by-side clips")
    reconstruct.set_defaults(func=_cmd_reconstruct)
    cache = commands.add_parser(
        "cache",
        help="precompute latents (posterior mean and logvar) of images or videos for diffusion training",
        description="Encode images or video clips once, with any supported autoencoder, into a sharded, resumable "
        "latent cache (see docs/latent_cache.md). Runs unchanged under `accelerate launch --num_processes N`.",
    )
    cache.add_argument("--vae", required=True, help="VAE folder or hub id (a pipeline folder with --vae_subfolder)")
    cache.add_argument("--vae_subfolder", default=None, help="e.g. vae (found automatically in a pipeline folder)")
    cache_input = cache.add_mutually_exclusive_group(required=True)
    cache_input.add_argument(
        "--train_data_dir",
        help="image folder (recursive; metadata.jsonl or .txt captions), webdataset .tar shards (brace pattern, glob, "
        "folder or prefix) or .parquet files; a local path or any fsspec URL (s3://, gs://, file://); or a local "
        "folder of videos (.mp4 .webm .mov .mkv, image sequences with --image_sequence)",
    )
    cache_input.add_argument("--dataset_name", help="datasets name, or a folder saved with save_to_disk")
    cache.add_argument("--dataset_split", default="train")
    cache.add_argument("--image_column", default=None, help="dataset image column (default: image)")
    cache.add_argument("--caption_column", default=None, help="caption column / metadata.jsonl key (default: text)")
    cache.add_argument(
        "--output_dir", required=True, help="cache folder or URL (s3://...); an existing matching cache is resumed"
    )
    cache.add_argument(
        "--storage_options",
        default=None,
        help='fsspec options as JSON for input and output URLs, e.g. \'{"endpoint_url": "http://..."}\' '
        "(default: credentials and endpoint from the environment, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )
    cache.add_argument("--resolution", type=int, default=512)
    cache_crop = cache.add_mutually_exclusive_group()
    cache_crop.add_argument("--center_crop", action="store_true", help="centre crop (default: top-left crop)")
    cache_crop.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about resolution^2 px")
    cache.add_argument("--flip", action="store_true", help="also cache the horizontally flipped image")
    cache.add_argument(
        "--max_upscale", type=float, default=2.0, help="skip images needing more upscaling to cover their target"
    )
    cache.add_argument("--dtype", type=_dtype_arg, default="fp32", help=f"storage and encode dtype: {DTYPE_CHOICES}")
    cache.add_argument("--batch_size", type=int, default=8)
    cache.add_argument("--dataloader_num_workers", type=int, default=2)
    cache.add_argument(
        "--shard_size", type=int, default=None, help="about this many samples per shard (default: 512; videos: 32)"
    )
    cache.add_argument(
        "--unit_size",
        type=int,
        default=None,
        help="images (folder) / videos / rows (dataset) per unit of work (default: shard_size)",
    )
    cache.add_argument("--engine", choices=["local", "ray"], default="local", help="local processes, or a Ray cluster")
    cache.add_argument(
        "--ray_address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: start a local one"
    )
    cache.add_argument(
        "--ray_num_encoders", type=int, default=None, help="encoder actors (default: one per GPU, else per 2 CPUs)"
    )
    cache.add_argument("--overwrite", action="store_true", help="delete an existing cache in --output_dir first")
    _add_video_options(cache, max_frames=33)
    cache.set_defaults(func=_cmd_cache)

    convert_lpips = commands.add_parser(
        "convert-lpips",
        help="combine torchvision's VGG16 and lpips' vgg.pth into the one safetensors file the trainer's LPIPS loads",
    )
    convert_lpips.add_argument("--vgg", required=True, help="torchvision's vgg16-397923af.pth")
    convert_lpips.add_argument("--lin", required=True, help="the lpips package's weights/v0.1/vgg.pth")
    convert_lpips.add_argument(
        "--output",
        default=None,
        help="default: ~/.cache/diffusers_vae_ext/lpips_vgg.safetensors (found automatically)",
    )
    convert_lpips.set_defaults(func=_cmd_convert_lpips)

    evaluate = commands.add_parser(
        "eval",
        help="compare VAEs on your images: PSNR/SSIM/LPIPS/rFID, latent scaling, fp16 safety; report.html",
        description="Reconstruct images with one or more VAEs and write report.html, report.md, metrics.csv and "
        "metrics.jsonl (see docs/evaluation.md).",
    )
    evaluate.add_argument(
        "--vae",
        action="append",
        required=True,
        help="a VAE folder of any supported class (by its config's _class_name; a pipeline folder's vae/ is found), "
        "optionally labelled: LABEL=PATH; repeat for several",
    )
    eval_input = evaluate.add_mutually_exclusive_group()
    eval_input.add_argument(
        "--train_data_dir",
        default=None,
        help="image folder, webdataset .tar shards or parquet files, local or URL (as `diffusers-vae cache` takes them)",
    )
    eval_input.add_argument("--dataset_name", default=None, help="datasets name, or a folder saved with save_to_disk")
    evaluate.add_argument("--dataset_split", default="train")
    evaluate.add_argument("--image_column", default=None, help="dataset image column (default: image)")
    evaluate.add_argument("--output_dir", required=True, help="where the report and rows are written")
    evaluate.add_argument("--resolution", type=int, default=256, help="centre crops of this square size")
    evaluate.add_argument("--num_images", type=int, default=None, help="only the first N images")
    evaluate.add_argument("--batch_size", type=int, default=4)
    evaluate.add_argument("--lpips_weights", default=None, help="LPIPS safetensors (`diffusers-vae convert-lpips`)")
    evaluate.add_argument(
        "--inception_weights", default=None, help="FID Inception safetensors (`diffusers-vae convert-inception`)"
    )
    evaluate.add_argument("--check_fp16", action="store_true", help="also check each VAE in float16 and bfloat16")
    evaluate.add_argument("--fp16_images", type=int, default=4, help="images used by --check_fp16")
    evaluate.add_argument("--patch_size", type=int, default=None, help="worst-patch crop size (default res/2, <=128)")
    evaluate.add_argument("--seed", type=int, default=0, help="posterior samples for the suggested scaling_factor")
    evaluate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    evaluate.add_argument("--screenshot", action="store_true", help="also render report.png with headless Chromium")
    evaluate.add_argument(
        "--diffusability",
        action="store_true",
        help="also measure how easily a diffusion model learns each VAE's latents (docs/diffusability.md)",
    )
    evaluate.add_argument("--probe_steps", type=int, default=None, help="training steps of the diffusability probe")
    evaluate.add_argument(
        "--probe_samples", type=int, default=16, help="probe samples decoded into a grid (and FID); 0: none"
    )
    evaluate.add_argument("--no_progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_eval)

    convert_inception = commands.add_parser(
        "convert-inception",
        help="convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth to the safetensors file rFID loads",
    )
    convert_inception.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    convert_inception.add_argument("--output", required=True, help="e.g. fid_inception.safetensors")
    convert_inception.set_defaults(func=_cmd_convert_inception)
    for command_parser in commands.choices.values():  # errors found after parsing are reported as argparse does
        command_parser.set_defaults(command_parser=command_parser)
    return parser
