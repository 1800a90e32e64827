"""The trainer's command line: every argument, its default and the checks between arguments.

`parse_args` fills the defaults that depend on other arguments (learning rate, `--recompute_scaling_factor`,
`--resize_to`) so the rest of the trainer reads plain values; `resolve_mixed_precision` turns `auto` into a dtype.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .. import fp16_safe
from ..cache.sources import check_source_dependencies
from ..hardware import choose_path
from ..optional import MissingDependencyError, require
from ..regularisers import REGULARISER_DEFAULTS

BUILTIN_CONFIGS = ("small_rgb", "digits")
CONFIG_DIR = Path(__file__).parent.parent / "configs"


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune any diffusers autoencoder class, train one from scratch, or distil one into a small one. "
        "See docs/training.md.",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path", default=None, help="VAE folder or hub id to fine-tune (safetensors)."
    )
    model.add_argument("--vae_subfolder", default=None, help='e.g. "vae" (found automatically in a local pipeline)')
    model.add_argument("--revision", default=None)
    model.add_argument(
        "--model_config",
        default=None,
        help=f"train from scratch: a config.json path (its `_class_name` picks the class: any supported "
        f"autoencoder class; none: AutoencoderKL) or a built-in name ({', '.join(BUILTIN_CONFIGS)}); "
        "default small_rgb when no --pretrained_model_name_or_path is given",
    )
    model.add_argument(
        "--train_decoder_only",
        action="store_true",
        help="freeze what produces the latent (encoder, quant_conv) for every class, so the latent space stays "
        "compatible (how sd-vae-ft-* were made)",
    )
    model.add_argument(
        "--teacher_vae",
        default=None,
        help="distil this autoencoder folder (any supported class) into the trained one, as TAESD was made: the "
        "student's encoder learns the teacher's scaled latents, its decoder decodes them. The student must be "
        "deterministic (AutoencoderTiny, AutoencoderDC) with the teacher's latent channels and factor",
    )
    model.add_argument(
        "--distill_target",
        choices=("images", "teacher"),
        default="images",
        help="what the student's decode of the teacher's latents learns: the images (TAESD) or the teacher's decode",
    )
    model.add_argument(
        "--distill_latent_weight", type=float, default=1.0, help="weight of the encoder's squared error to the latents"
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir",
        default=None,
        help="what the latent cache reads: a folder of images (recursive) or videos; webdataset .tar shards (a "
        "folder, prefix, glob or brace pattern such as data/{00000..00099}.tar); .parquet files; local or any "
        "fsspec URL (s3://bucket/shards/, gs://...). Shards, parquet, URLs and videos are streamed, see "
        "docs/training.md",
    )
    data.add_argument("--dataset_name", default=None, help="a datasets name or a folder saved with save_to_disk")
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--image_column", default="image")
    data.add_argument(
        "--resolution", type=int, default=None, help="square training crops (default: the config's sample_size)"
    )
    data.add_argument(
        "--resize_to",
        type=int,
        default=None,
        help="resize the short side to this before cropping (default: --resolution; 256 for the built-in photos, "
        "so they give many distinct patches)",
    )
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--num_validation_images", type=int, default=4, help="held out of the training data")
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes; streamed data is split over processes x workers (each unit read once)",
    )
    data.add_argument(
        "--storage_options",
        type=_json_object,
        default=None,
        help='fsspec options as JSON for --train_data_dir URLs, e.g. \'{"endpoint_url": "http://..."}\' (default: '
        "credentials and endpoint from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )
    data.add_argument(
        "--unit_size",
        type=int,
        default=None,
        help="images / videos / dataset rows per unit of the epoch order (default 512; videos: 32, as `cache` "
        "cuts them; a tar shard or a parquet row group is one unit anyway); units are shuffled per epoch and "
        "split over processes x workers",
    )
    data.add_argument(
        "--shuffle_buffer", type=int, default=1000, help="samples held per reader to shuffle within its units"
    )
    video = parser.add_argument_group("videos (clips cut as `diffusers-vae cache` and `stats` cut them)")
    video.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="frames per training clip (video classes: default the class's smallest clip above 1, e.g. 5; "
        "a folder of videos for an image class needs it)",
    )
    rate = video.add_mutually_exclusive_group()
    rate.add_argument("--frame_stride", type=int, default=None, help="take every n-th frame")
    rate.add_argument("--fps", type=float, default=None, help="resample to this frame rate by timestamps")
    video.add_argument("--clips_per_video", type=int, default=1, help="non-overlapping clips spread over each video")
    video.add_argument("--image_sequence", action="store_true", help="folders of frames are videos")
    video.add_argument("--sequence_fps", type=float, default=24.0, help="frame rate of image sequences")

    train = parser.add_argument_group("optimisation")
    train.add_argument("--output_dir", default="vae-finetuned")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=8, help="per device")
    train.add_argument("--max_train_steps", type=int, default=600)
    train.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="default 1e-5 when fine-tuning, 5e-4 when training from scratch",
    )
    train.add_argument("--scale_lr", action="store_true", help="multiply lr by batch x accumulation x processes")
    train.add_argument("--lr_scheduler", default="constant_with_warmup", help="diffusers' get_scheduler name")
    train.add_argument("--lr_warmup_steps", type=int, default=50)
    train.add_argument("--adam_beta1", type=float, default=0.5, help="0.5/0.9: the latent-diffusion autoencoders")
    train.add_argument("--adam_beta2", type=float, default=0.9)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument(
        "--mixed_precision",
        choices=("auto", "no", "fp16", "bf16"),
        default="auto",
        help="autocast dtype, weights stay fp32. auto (default): accelerate's configured fp16/bf16 if any, else bf16 "
        "where it is native (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else no. `no` trains in fp32",
    )
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--use_ema", action="store_true")
    train.add_argument("--ema_decay", type=float, default=0.999)
    train.add_argument(
        "--max_nonfinite_steps", type=int, default=5, help="abort after this many non-finite losses in a row"
    )

    loss = parser.add_argument_group("losses")
    loss.add_argument("--rec_loss", choices=("l1", "l2"), default="l1")
    loss.add_argument("--kl_weight", type=float, default=1e-6)
    loss.add_argument("--kl_mode", choices=("plain", "H", "B"), default="plain", help="plain, beta-VAE H, or B")
    loss.add_argument("--kl_beta", type=float, default=4.0, help="beta of --kl_mode H")
    loss.add_argument("--kl_gamma", type=float, default=1000.0, help="gamma of --kl_mode B")
    loss.add_argument("--capacity_max", type=float, default=25.0, help="final KL capacity C of --kl_mode B (nats)")
    loss.add_argument("--capacity_stop_steps", type=int, default=10000, help="steps over which C rises to max")
    loss.add_argument("--perceptual_weight", type=float, default=0.0, help="LPIPS weight (1.0 in latent diffusion)")
    loss.add_argument("--lpips_weights", default=None, help="safetensors file from `diffusers-vae convert-lpips`")
    loss.add_argument("--disc_weight", type=float, default=0.5, help="0 disables the discriminator")
    loss.add_argument("--disc_start", type=int, default=50001, help="step at which the adversarial loss starts")
    loss.add_argument("--disc_loss", choices=("hinge", "vanilla"), default="hinge")
    loss.add_argument("--disc_learning_rate", type=float, default=None, help="default: --learning_rate")
    loss.add_argument("--disc_layers", type=int, default=3)
    loss.add_argument(
        "--discriminator_weights",
        default=None,
        help="start the discriminator from these weights: a final folder's discriminator.safetensors (or the "
        "folder) to continue a fine-tune elsewhere with the same discriminator (exact resume: "
        "--resume_from_checkpoint)",
    )
    loss.add_argument(
        "--disc_3d",
        action="store_true",
        help="video: a 3-D PatchGAN that sees whole clips (default: the 2-D PatchGAN on every frame)",
    )

    regularisers = parser.add_argument_group(
        "regularisers for diffusability (docs/training.md#regularisers; each one added to the loss above)"
    )
    eq_defaults = REGULARISER_DEFAULTS["equivariance"]["defaults"]
    regularisers.add_argument("--equivariance", action="store_true", help=REGULARISER_DEFAULTS["equivariance"]["help"])
    regularisers.add_argument(
        "--equivariance_p_prior",
        type=float,
        default=eq_defaults["p_prior"],
        help="--equivariance: probability of a plain (prior-preservation) step",
    )
    scale_defaults = REGULARISER_DEFAULTS["scale_equivariance"]["defaults"]
    regularisers.add_argument(
        "--scale_equivariance", action="store_true", help=REGULARISER_DEFAULTS["scale_equivariance"]["help"]
    )
    regularisers.add_argument(
        "--scale_equivariance_weight",
        type=float,
        default=scale_defaults["weight"],
        help="--scale_equivariance: weight of its term, per pixel as the reconstruction term",
    )
    align_defaults = REGULARISER_DEFAULTS["align"]["defaults"]
    regularisers.add_argument("--align_to", default=None, metavar="PATH", help=REGULARISER_DEFAULTS["align"]["help"])
    regularisers.add_argument(
        "--align_weight",
        type=float,
        default=align_defaults["align_weight"],
        help="--align_to: VA-VAE's vf_weight, times the adaptive weight",
    )
    regularisers.add_argument(
        "--latent_noise",
        type=float,
        nargs="?",
        const=REGULARISER_DEFAULTS["latent_noise"]["defaults"]["sigma"],
        default=0.0,
        metavar="SIGMA",
        help=REGULARISER_DEFAULTS["latent_noise"]["help"]
        + f" The flag alone means SIGMA {REGULARISER_DEFAULTS['latent_noise']['defaults']['sigma']}.",
    )

    run = parser.add_argument_group("checkpoints, validation, logging")
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    run.add_argument("--validation_steps", type=int, default=100)
    run.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    run.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    run.add_argument(
        "--recompute_scaling_factor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the trained VAE's scaling_factor on the training images and write it into the output "
        "config (default: on when training from scratch, off when fine-tuning)",
    )
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    fp16_safe.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.pretrained_model_name_or_path and args.model_config:
        parser.error("give either --pretrained_model_name_or_path (fine-tune) or --model_config (from scratch)")
    if args.train_data_dir and args.dataset_name:
        parser.error("give either --train_data_dir or --dataset_name, not both")
    from_scratch = not args.pretrained_model_name_or_path
    if args.learning_rate is None:
        args.learning_rate = 5e-4 if from_scratch else 1e-5
    if args.recompute_scaling_factor is None:
        args.recompute_scaling_factor = from_scratch
    if args.resize_to is None and not (args.train_data_dir or args.dataset_name):
        args.resize_to = 256
    if args.train_decoder_only and from_scratch:
        parser.error("--train_decoder_only needs a trained encoder: give --pretrained_model_name_or_path")
    if args.num_frames is not None and args.num_frames < 1:
        parser.error("--num_frames must be at least 1")
    teacher = Path(args.teacher_vae or "")
    if (
        args.teacher_vae
        and teacher.is_dir()
        and not any((teacher / sub / "config.json").is_file() for sub in ("", "vae"))
    ):
        parser.error(
            f"--teacher_vae {args.teacher_vae}: no config.json there; point at a diffusers autoencoder folder"
        )
    if args.teacher_vae and args.fp16_safe:
        parser.error("--teacher_vae and --fp16_safe both train against a teacher: use one")
    for name in (
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "unit_size",
        "shuffle_buffer",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.discriminator_weights and args.disc_weight <= 0:
        parser.error("--discriminator_weights needs the discriminator: drop --disc_weight 0")
    fp16_safe.check_arguments(args, parser)
    _check_regularisers(args, parser)
    _check_optional_dependencies(args, parser)
    return args


def regulariser_settings(args: argparse.Namespace) -> dict[str, dict]:
    """The regularisers this run uses: flag name -> {"paper", "settings"}, with every default that applies (the
    papers' values from `REGULARISER_DEFAULTS` overridden by the arguments). Stored in `args.regularisers`, so the
    run's provenance (`vars(args)`) records them."""
    used = {}
    if args.equivariance:
        settings = {**REGULARISER_DEFAULTS["equivariance"]["defaults"], "p_prior": args.equivariance_p_prior}
        used["equivariance"] = {"paper": REGULARISER_DEFAULTS["equivariance"]["paper"], "settings": settings}
    if args.scale_equivariance:
        settings = {**REGULARISER_DEFAULTS["scale_equivariance"]["defaults"], "weight": args.scale_equivariance_weight}
        used["scale_equivariance"] = {
            "paper": REGULARISER_DEFAULTS["scale_equivariance"]["paper"],
            "settings": settings,
        }
    if args.align_to:
        settings = {
            **REGULARISER_DEFAULTS["align"]["defaults"],
            "align_weight": args.align_weight,
            "path": args.align_to,
        }
        used["align"] = {"paper": REGULARISER_DEFAULTS["align"]["paper"], "settings": settings}
    if args.latent_noise:
        settings = {**REGULARISER_DEFAULTS["latent_noise"]["defaults"], "sigma": args.latent_noise}
        used["latent_noise"] = {"paper": REGULARISER_DEFAULTS["latent_noise"]["paper"], "settings": settings}
    return used


def _check_regularisers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 0.0 <= args.equivariance_p_prior <= 1.0:
        parser.error(f"--equivariance_p_prior must be a probability in [0, 1], got {args.equivariance_p_prior}")
    if args.latent_noise < 0:
        parser.error(
            f"--latent_noise must be >= 0 (a noise level in latent standard deviations), got {args.latent_noise}"
        )
    if args.scale_equivariance_weight < 0 or args.align_weight < 0:
        parser.error("--scale_equivariance_weight and --align_weight must be >= 0")
    regularised = [
        flag
        for flag, on in (
            ("--equivariance", args.equivariance),
            ("--scale_equivariance", args.scale_equivariance),
            ("--align_to", args.align_to),
            ("--latent_noise", args.latent_noise),
        )
        if on
    ]
    for other, given in (("--teacher_vae", args.teacher_vae), ("--fp16_safe", args.fp16_safe)):
        if regularised and given:
            parser.error(f"{', '.join(regularised)} regularise an autoencoder's own training; drop them with {other}")
    if args.align_to and args.train_decoder_only:
        parser.error(
            "--align_to shapes the latents through the encoder, which --train_decoder_only freezes: drop one of them"
        )
    args.regularisers = regulariser_settings(args)


def _check_optional_dependencies(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Stop before any work when an argument needs a package that is missing, with its install hint."""
    needs = []
    if args.report_to in ("tensorboard", "all"):
        needs.append(("tensorboard", "--report_to tensorboard"))
    if args.report_to == "wandb":
        needs.append(("wandb", "--report_to wandb"))
    if args.dataset_name:
        needs.append(("datasets", "--dataset_name"))
    try:
        for name, for_what in needs:
            require(name, for_what)
        # What the data argument's name says it needs (s3fs for s3://, webdataset for .tar, braceexpand, ...).
        check_source_dependencies(args.train_data_dir)
        if args.num_frames is not None:
            require("av", "--num_frames (training on videos)")
    except MissingDependencyError as err:
        parser.error(str(err))


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'not JSON ({err}); e.g. \'{{"endpoint_url": "http://..."}}\'') from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {value!r}")
    return parsed


def resolve_mixed_precision(requested: str) -> str:
    """`--mixed_precision auto` -> `"bf16"`, `"fp16"` or `"no"`; other values are returned as given.

    auto takes fp16/bf16 from accelerate's configuration (`ACCELERATE_MIXED_PRECISION`, set by `accelerate launch`
    from `accelerate config` or its own flag) and otherwise what `hardware.choose_path` picks for the device: bf16
    autocast where bf16 is native, fp32 elsewhere (accelerate launch writes "no" when nothing was configured, so "no"
    there does not override the choice; pass `--mixed_precision no` to the script to train in fp32).
    """
    if requested != "auto":
        return requested
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if configured in ("fp16", "bf16"):
        return configured
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return choose_path("cpu" if use_cpu or not torch.cuda.is_available() else "cuda").mixed_precision
