"""The `diffusers-vae` command: one subcommand per job, each a thin wrapper over the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The spellings `hardware.parse_dtype` accepts (not imported from there: that would import torch for `--help`).
DTYPE_CHOICES = "fp32/float32, bf16/bfloat16, fp16/float16 or auto"


def _dtype_arg(value: str) -> str:
    """argparse type: any spelling `hardware.parse_dtype` accepts, kept as given until the device is known."""
    from .hardware import parse_dtype

    try:
        parse_dtype(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _resolved_dtype(value: str, device: str, short: bool = False) -> str:
    """The dtype name a package function takes (`"bfloat16"`, or with `short` `"bf16"`); says which path runs."""
    from .hardware import announce_path, dtype_name, resolve_dtype

    dtype = resolve_dtype(value, device)
    announce_path(device, dtype)
    return dtype_name(dtype, short=short)


def _cmd_info(args: argparse.Namespace) -> int:
    from .hardware import describe_path
    from .modeling import AutoencoderKL, weights_fingerprint

    if args.path is None:  # `diffusers-vae info` alone: only the machine and the path chosen on it
        print(f"execution path: {describe_path()}")
        return 0
    vae = AutoencoderKL.from_pretrained(args.path, subfolder=args.subfolder or "")
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    num_params = sum(p.numel() for p in vae.parameters())
    print(json.dumps(config, indent=2, default=list))
    print(f"parameters: {num_params:,}")
    print(f"downsampling factor: {vae.downsampling_factor}")
    print(f"fingerprint: {weights_fingerprint(vae)}")
    print(f"execution path: {describe_path()}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .modeling import PICKLE_WEIGHT_SUFFIXES

    folder = Path(args.path)
    sources = (
        [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    )
    if not sources:
        print(f"No pickle checkpoint ({', '.join(PICKLE_WEIGHT_SUFFIXES)}) found at {folder}.", file=sys.stderr)
        return 2
    for source in sources:
        # weights_only=True refuses arbitrary objects: only tensors and plain containers are unpickled.
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        target = source.with_name("diffusion_pytorch_model.safetensors")
        save_file(tensors, str(target), metadata={"format": "pt"})
        print(f"{source} -> {target} ({len(tensors)} tensors)")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from .scaling import run_stats

    try:
        run_stats(
            args.vae,
            train_data_dir=args.train_data_dir,
            cache_dir=args.cache_dir,
            subfolder=args.subfolder,
            num_images=args.num_images,
            resolution=args.resolution,
            batch_size=args.batch_size,
            sample_posterior=args.sample_posterior,
            seed=args.seed,
            convention=args.convention,
            write_config=args.write_config,
            dtype=_resolved_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu"),
            dataloader_num_workers=args.dataloader_num_workers,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from .cache import CacheMismatchError, precompute_latents

    try:
        precompute_latents(
            args.vae,
            args.output_dir,
            train_data_dir=args.train_data_dir,
            dataset=args.dataset_name,
            vae_subfolder=args.vae_subfolder,
            dataset_split=args.dataset_split,
            image_column=args.image_column,
            caption_column=args.caption_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            buckets=args.buckets,
            flip=args.flip,
            max_upscale=args.max_upscale,
            dtype=_resolved_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu", short=True),
            batch_size=args.batch_size,
            num_workers=args.dataloader_num_workers,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
        )
    except (CacheMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .data import list_image_files
    from .hardware import announce_path, resolve_dtype
    from .modeling import AutoencoderKL
    from .reconstruct import format_report, reconstruct_images, report_json

    paths = []
    for path in map(Path, args.images):
        paths.extend(list_image_files(path) if path.is_dir() else [path])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.subfolder or "", torch_dtype=dtype).to(device).eval()
    announce_path(device, dtype)
    results = reconstruct_images(
        vae,
        paths,
        output_dir=args.output_dir,
        size_policy=args.size_policy,
        sample_posterior=args.sample_posterior,
        seed=args.seed,
    )
    print(format_report(results, args.size_policy, vae.downsampling_factor))
    print(report_json(results, args.size_policy))
    if not any(result.ok for result in results):
        print("No image could be reconstructed.", file=sys.stderr)
        return 1
    return 0


def _cmd_convert_lpips(args: argparse.Namespace) -> int:
    from .losses import DEFAULT_LPIPS_PATH, convert_lpips_weights

    try:
        written = convert_lpips_weights(args.vgg, args.lin, args.output or DEFAULT_LPIPS_PATH)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"LPIPS weights written to {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-vae", description=__doc__)
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
        help="measure scaling_factor, shift_factor and per-channel latents_mean/latents_std from data",
        description="Latent statistics for a VAE config (see docs/scaling.md). Runs under `accelerate launch`.",
    )
    stats.add_argument("--vae", required=True, help="VAE folder or hub repo (a pipeline with --subfolder vae)")
    stats.add_argument("--subfolder", default=None)
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", default=None, help="folder of images (recursive)")
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
        help="which config keys to compute and write (default: the convention the VAE config already uses)",
    )
    stats.add_argument("--write_config", action="store_true", help="update the VAE folder's config.json")
    stats.add_argument("--dtype", type=_dtype_arg, default="float32", help=f"encode dtype: {DTYPE_CHOICES}")
    stats.add_argument("--dataloader_num_workers", type=int, default=0)
    stats.add_argument("--no_progress", action="store_true", help="no progress bar")
    stats.set_defaults(func=_cmd_stats)

    reconstruct = commands.add_parser(
        "reconstruct", help="encode+decode images, write input|reconstruction PNGs, print PSNR/SSIM"
    )
    reconstruct.add_argument("images", nargs="+", help="image files or folders of images")
    reconstruct.add_argument("--vae", required=True, help="VAE folder or hub repo (safetensors only)")
    reconstruct.add_argument("--subfolder", default=None, help='e.g. "vae" for a pipeline folder or repo')
    reconstruct.add_argument("--output-dir", required=True, help="where the side-by-side PNGs are written")
    reconstruct.add_argument(
        "--size-policy",
        choices=("pad", "crop"),
        default="pad",
        help="sides not divisible by the VAE factor: pad (mirror, cut off again before metrics) or centre-crop",
    )
    reconstruct.add_argument(
        "--sample-posterior", action="store_true", help="decode a posterior draw instead of its mean"
    )
    reconstruct.add_argument("--seed", type=int, default=0, help="seed of the posterior draw (per image)")
    reconstruct.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    reconstruct.add_argument(
        "--dtype",
        type=_dtype_arg,
        default="float32",
        help=f"{DTYPE_CHOICES}; auto: bfloat16 where it is native (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else float32",
    )
    reconstruct.set_defaults(func=_cmd_reconstruct)
    cache = commands.add_parser(
        "cache",
        help="precompute latents (posterior mean and logvar) of an image folder or dataset for diffusion training",
        description="Encode images once into a sharded, resumable latent cache (see docs/latent_cache.md). "
        "Runs unchanged under `accelerate launch --num_processes N`.",
    )
    cache.add_argument("--vae", required=True, help="VAE folder or hub id (a pipeline folder with --vae_subfolder)")
    cache.add_argument("--vae_subfolder", default=None, help="e.g. vae (found automatically in a pipeline folder)")
    cache_input = cache.add_mutually_exclusive_group(required=True)
    cache_input.add_argument("--train_data_dir", help="image folder (recursive; metadata.jsonl or .txt captions)")
    cache_input.add_argument("--dataset_name", help="datasets name, or a folder saved with save_to_disk")
    cache.add_argument("--dataset_split", default="train")
    cache.add_argument("--image_column", default=None, help="dataset image column (default: image)")
    cache.add_argument("--caption_column", default=None, help="caption column / metadata.jsonl key (default: text)")
    cache.add_argument("--output_dir", required=True, help="cache folder; an existing matching cache is resumed")
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
    cache.add_argument("--shard_size", type=int, default=512, help="about this many samples per shard")
    cache.add_argument("--overwrite", action="store_true", help="delete an existing cache in --output_dir first")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # The trainer owns its (long, diffusers-style) argument list; `diffusers-vae train --help` shows it.
        from .training import main as train_main

        train_main(argv[1:], prog="diffusers-vae train")
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
