"""One `_cmd_*` function per `diffusers-vae` subcommand, each a thin wrapper over a package function, and the
helpers they share (dtype resolution, input listing, optional-dependency checks before any work)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _resolved_dtype(value: str, device: str, short: bool = False) -> str:
    """The dtype name a package function takes (`"bfloat16"`, or with `short` `"bf16"`); says which path runs."""
    from ..hardware import announce_path, dtype_name, resolve_dtype

    dtype = resolve_dtype(value, device)
    announce_path(device, dtype)
    return dtype_name(dtype, short=short)


def _cmd_info(args: argparse.Namespace) -> int:
    from ..autoencoders import load_autoencoder
    from ..hardware import describe_path
    from ..modeling import weights_fingerprint

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

    from ..modeling import PICKLE_WEIGHT_SUFFIXES

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
    from ..video import ClipOptions

    return ClipOptions(
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        fps=args.fps,
        max_frames=args.max_frames,
        clips_per_video=args.clips_per_video,
        sequence_fps=args.sequence_fps,
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from ..stats import run_stats

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

    from ..cache import CacheMismatchError, precompute_latents

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
    from ..data import IMAGE_EXTENSIONS
    from ..video import VIDEO_EXTENSIONS

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
    from ..optional import require

    if any(path.is_file() for path in videos) or (videos and video_format == "mp4"):
        require("av", "videos (reading video files, writing mp4 clips)")


def _check_dependencies(args: argparse.Namespace) -> None:
    """The optional packages the arguments alone show a command needs (URL protocols, brace patterns, .tar /
    .parquet names, --dataset_name, --engine ray, video files): `optional.MissingDependencyError` before any work.

    What only a listing shows (a folder of tars, of videos) is checked by the command's library function when it
    lists the input, still before it loads a model.
    """
    from ..optional import require, require_filesystem

    if args.command in ("cache", "eval"):
        from ..cache.sources import check_source_dependencies

        check_source_dependencies(args.train_data_dir, args.dataset_name)
    if args.command == "cache":
        require_filesystem(args.output_dir)
        if args.engine == "ray":
            require("ray", "--engine ray")
    if args.command == "stats" and args.cache_dir is not None:
        require_filesystem(args.cache_dir)
    if args.command == "reconstruct":
        from ..video import VIDEO_EXTENSIONS

        named_videos = [Path(p) for p in args.images if Path(p).suffix.lower() in VIDEO_EXTENSIONS]
        _require_video_support(named_videos, args.video_format)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ..autoencoders import load_autoencoder
    from ..hardware import announce_path, resolve_dtype
    from ..reconstruct import (
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
    from ..losses import DEFAULT_LPIPS_PATH, convert_lpips_weights

    try:
        written = convert_lpips_weights(args.vgg, args.lin, args.output or DEFAULT_LPIPS_PATH)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"LPIPS weights written to {written}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation import run_eval

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
    from ..evaluation.inception import convert_inception_weights

    try:
        written = convert_inception_weights(args.input, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"FID Inception weights written to {written}")
    return 0
