"""The `diffusers-vae` command: one subcommand per job, each a thin wrapper over the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .optional import MissingDependencyError

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
    from .autoencoders import load_autoencoder
    from .hardware import describe_path
    from .modeling import weights_fingerprint

    if args.path is None:  # `diffusers-vae info` alone: only the machine and the path chosen on it
        print(f"execution path: {describe_path()}")
        return 0
    try:
        adapter = load_autoencoder(args.path, subfolder=args.subfolder or None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vae = adapter.vae
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    num_params = sum(p.numel() for p in vae.parameters())
    print(json.dumps(config, indent=2, default=list))
    print(f"class: {adapter.class_name}")
    print(f"parameters: {num_params:,}")
    print(f"downsampling factor: {adapter.spatial_factor}")
    if adapter.is_video:
        print(f"temporal factor: {adapter.temporal_factor} (clips of {adapter.frame_multiple}k + 1 frames)")
    print(f"latent channels: {adapter.latent_channels} ({'posterior' if adapter.has_posterior else 'deterministic'})")
    print(f"scaling convention: {adapter.convention.convention}")
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


def _clip_options(args: argparse.Namespace):
    from .video import ClipOptions

    return ClipOptions(
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        fps=args.fps,
        max_frames=args.max_frames,
        clips_per_video=args.clips_per_video,
        sequence_fps=args.sequence_fps,
    )


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


def _cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from .stats import run_stats

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
            clip_options=_clip_options(args),
            image_sequences=args.image_sequence,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _json_option(value: str | None, name: str) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f'{name} must be a JSON object, e.g. \'{{"endpoint_url": "http://..."}}\' ({err}).') from err
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}.")
    return parsed


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
            unit_size=args.unit_size,
            clip_options=_clip_options(args),
            image_sequences=args.image_sequence,
            storage_options=_json_option(args.storage_options, "--storage_options"),
            engine=args.engine,
            ray_address=args.ray_address,
            ray_num_encoders=args.ray_num_encoders,
            overwrite=args.overwrite,
        )
    except (CacheMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _split_inputs(inputs: list[str], image_sequences: bool) -> tuple[list[Path], list[Path]]:
    """Image files and videos (files, or image-sequence folders with --image_sequence) named or found in folders."""
    from .data import IMAGE_EXTENSIONS
    from .video import VIDEO_EXTENSIONS

    images: list[Path] = []
    videos: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir() and image_sequences:
            videos.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            found_images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            found_videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
            if not found_images and not found_videos:
                raise ValueError(
                    f"No images ({', '.join(IMAGE_EXTENSIONS)}) or videos ({', '.join(VIDEO_EXTENSIONS)}) found "
                    f"in {str(path)!r}."
                )
            images.extend(found_images)
            videos.extend(found_videos)
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(path)
        else:
            images.append(path)
    return images, videos


def _require_video_support(videos: list[Path], video_format: str) -> None:
    """PyAV for video files, or for writing mp4 clips (frame folders read and WebP clips write without it)."""
    from .optional import require

    if any(path.is_file() for path in videos) or (videos and video_format == "mp4"):
        require("av", "videos (reading video files, writing mp4 clips)")


def _check_dependencies(args: argparse.Namespace) -> None:
    """The optional packages the arguments alone show a command needs (URL protocols, brace patterns, .tar /
    .parquet names, --dataset_name, --engine ray, video files): `optional.MissingDependencyError` before any work.

    What only a listing shows (a folder of tars, of videos) is checked by the command's library function when it
    lists the input, still before it loads a model.
    """
    from .optional import require, require_filesystem

    if args.command in ("cache", "eval"):
        from .cache.sources import check_source_dependencies

        check_source_dependencies(args.train_data_dir, args.dataset_name)
    if args.command == "cache":
        require_filesystem(args.output_dir)
        if args.engine == "ray":
            require("ray", "--engine ray")
    if args.command == "stats" and args.cache_dir is not None:
        require_filesystem(args.cache_dir)
    if args.command == "reconstruct":
        from .video import VIDEO_EXTENSIONS

        named_videos = [Path(p) for p in args.images if Path(p).suffix.lower() in VIDEO_EXTENSIONS]
        _require_video_support(named_videos, args.video_format)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .autoencoders import load_autoencoder
    from .hardware import announce_path, resolve_dtype
    from .reconstruct import (
        format_report,
        format_video_report,
        reconstruct_images,
        reconstruct_videos,
        report_json,
    )

    try:
        images, videos = _split_inputs(args.images, args.image_sequence)
        _require_video_support(videos, args.video_format)
        options = _clip_options(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(args.dtype, device)
        adapter = load_autoencoder(args.vae, subfolder=args.subfolder or None, torch_dtype=dtype)
        adapter.vae.to(device).eval()
        announce_path(device, dtype)
        if args.tiling:
            adapter.enable_tiling()
        common = dict(output_dir=args.output_dir, size_policy=args.size_policy, seed=args.seed)
        results = (
            reconstruct_images(adapter, images, sample_posterior=args.sample_posterior, **common) if images else []
        )
        video_results = None
        if videos:
            video_results = reconstruct_videos(
                adapter,
                videos,
                clip_options=options,
                resolution=args.resolution,
                output_format=args.video_format,
                sample_posterior=args.sample_posterior,
                **common,
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if images or not videos:
        print(format_report(results, args.size_policy, adapter.size_multiple))
    if video_results is not None:
        print(format_video_report(video_results))
    print(report_json(results, args.size_policy, video_results))
    if not any(result.ok for result in [*results, *(video_results or [])]):
        print(f"No image{' or clip' if videos else ''} could be reconstructed.", file=sys.stderr)
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval

    try:
        run_eval(
            args.vae,
            args.output_dir,
            device=args.device,
            screenshot=args.screenshot,
            train_data_dir=args.train_data_dir,
            dataset_name=args.dataset_name,
            dataset_split=args.dataset_split,
            image_column=args.image_column,
            resolution=args.resolution,
            num_images=args.num_images,
            batch_size=args.batch_size,
            lpips_weights=args.lpips_weights,
            inception_weights=args.inception_weights,
            check_fp16=args.check_fp16,
            fp16_images=args.fp16_images,
            patch_size=args.patch_size,
            seed=args.seed,
            show_progress=not args.no_progress,
            diffusability=args.diffusability,
            probe_steps=args.probe_steps,
            probe_samples=args.probe_samples,
        )
    except (OSError, ValueError) as err:  # OSError: diffusers' "no such model folder or repo"
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_convert_inception(args: argparse.Namespace) -> int:
    from .evaluation.inception import convert_inception_weights

    try:
        written = convert_inception_weights(args.input, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"FID Inception weights written to {written}")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # The trainer owns its (long, diffusers-style) argument list; `diffusers-vae train --help` shows it.
        from .training import main as train_main

        try:
            train_main(argv[1:], prog="diffusers-vae train")
        except MissingDependencyError as err:
            print(f"diffusers-vae train: error: {err}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        _check_dependencies(args)  # before any model is loaded or any input read
        return args.func(args)
    except MissingDependencyError as err:  # also one found later, e.g. by listing a folder of tars
        args.command_parser.error(str(err))  # usage, "error: ...", exit code 2; no traceback
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    # What `accelerator.end_training()` does for the trainer: a process of `accelerate launch` that exits with its
    # process group alive can abort at exit ("terminate called without an active exception", seen once in CI on
    # `cache` with 2 CPU processes) while gloo's threads are torn down.
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
