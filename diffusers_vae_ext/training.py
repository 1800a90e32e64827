"""Fine-tune a VAE or train one from scratch: `accelerate launch scripts/finetune_vae.py --output_dir DIR`.

The loop is a plain loop in `train()`, readable top to bottom, in the style of diffusers' example scripts (same
argument names). Per optimisation step:

1. Generator step. Encode, draw `z = mean + std * eps` from the posterior (eps seeded by (seed, step, rank) so a
   resumed run draws the same noise), decode. Loss = reconstruction (L1 or L2, summed over pixels, the
   latent-diffusion convention) + `perceptual_weight` * LPIPS + KL (`--kl_mode plain|H|B`) + once
   `--disc_start` is reached, the adaptive-weighted adversarial term. The discriminator is called unwrapped and
   with `requires_grad_(False)`, so this step neither updates it nor leaves gradients in it, and DDP never sees
   a discriminator forward without its backward.
2. Discriminator step (from `--disc_start`): hinge or vanilla loss on real images and *detached*
   reconstructions, so no gradient reaches the VAE.

Weights stay fp32 (accelerate autocast for `--mixed_precision`; by default bf16 where the hardware runs it natively,
see `hardware.py`); EMA uses diffusers' `EMAModel`. Checkpoints are
`accelerator.save_state` folders (VAE, discriminator, optimizers, schedulers, RNG, EMA as a diffusers folder)
and resuming replays the same data order, crops and noise, so the losses after a resume equal the uninterrupted
run's. Ctrl-C or SIGTERM saves a checkpoint before exiting. The output folder is a plain diffusers VAE folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from . import fp16_safe, losses
from .data import (
    EpochShuffleSampler,
    TrainingImageDataset,
    list_image_files,
    open_dataset,
    sample_photos,
    tensor_to_pil,
    to_rgb,
)
from .hardware import choose_path, describe_path
from .metrics import psnr, ssim
from .modeling import AutoencoderKL

logger = logging.getLogger("diffusers_vae_ext.training")

BUILTIN_CONFIGS = ("small_rgb", "digits")
CONFIG_DIR = Path(__file__).parent / "configs"
# Validation photo held out of the built-in sample set: a still life the model never sees in training.
BUILTIN_VALIDATION_PHOTOS = ("coffee",)


# ====================================================================================================== args


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune a diffusers AutoencoderKL, or train one from scratch. See docs/training.md."
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
        help=f"train from scratch: a config.json path or a built-in name ({', '.join(BUILTIN_CONFIGS)}); "
        "default small_rgb when no --pretrained_model_name_or_path is given",
    )
    model.add_argument(
        "--train_decoder_only",
        action="store_true",
        help="freeze encoder and quant_conv so the latent space stays compatible (how sd-vae-ft-* were made)",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None, help="folder of images (recursive)")
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
    data.add_argument("--dataloader_num_workers", type=int, default=0)

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
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    fp16_safe.check_arguments(args, parser)
    return args


# ===================================================================================================== model


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """A built-in config name (`small_rgb`, `digits`) or a path to a config.json (or a folder holding one)."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN_CONFIGS:
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--model_config {name_or_path!r} is neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) nor a "
            "config.json file."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_vae(args: argparse.Namespace) -> AutoencoderKL:
    if not args.pretrained_model_name_or_path:
        return AutoencoderKL.from_config(load_model_config(args.model_config or "small_rgb"))
    subfolder = args.vae_subfolder
    local = Path(args.pretrained_model_name_or_path)
    if subfolder is None and (local / "vae" / "config.json").is_file() and not (local / "config.json").is_file():
        subfolder = "vae"
    return AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision
    )


class VAETrainingForward(nn.Module):
    """Encode, sample the posterior with given noise, decode: one `forward` so DDP sees encoder and decoder.

    With `train_decoder_only` the encoder runs without autograd (its weights are frozen; this also takes the
    fast inference path). `_decode` skips decode()'s NaN check on purpose: a non-finite loss must reach the loop,
    which skips the step, instead of crashing the run.
    """

    def __init__(self, vae: AutoencoderKL, train_decoder_only: bool = False):
        super().__init__()
        self.vae = vae
        self.train_decoder_only = train_decoder_only

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad() if self.train_decoder_only else nullcontext():
            moments = self.vae.encode(pixels).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.mean + posterior.std * noise.to(moments.dtype)
        return self.vae._decode(latents), moments


# ====================================================================================================== data


class DatasetImages(Sequence):
    """A `datasets` image column as a lazy sequence of RGB PIL images, optionally restricted to `rows`.

    Rows are decoded when a DataLoader worker asks for them, so a large dataset is never held in memory.
    """

    def __init__(self, dataset: Any, column: str, rows: Sequence[int] | None = None):
        self.dataset, self.column = dataset, column
        self.rows = list(range(len(dataset))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Image.Image:
        return to_rgb(self.dataset[self.rows[index]][self.column])

    def subset(self, positions: Sequence[int]) -> DatasetImages:
        return DatasetImages(self.dataset, self.column, [self.rows[p] for p in positions])


def _load_dataset_images(args: argparse.Namespace) -> DatasetImages:
    dataset = open_dataset(args.dataset_name, args.dataset_split)
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {args.image_column!r} is not a column of {args.dataset_name}: {dataset.column_names}"
        )
    return DatasetImages(dataset, args.image_column)


def training_images(args: argparse.Namespace) -> tuple[list, list, str]:
    """(training images, held-out validation images, description); files, or PIL images for built-in data."""
    if args.train_data_dir:
        images: Sequence = list_image_files(args.train_data_dir)
        source = f"{len(images)} images from {args.train_data_dir}"
    elif args.dataset_name:
        images = _load_dataset_images(args)
        if not images:
            raise ValueError(f"The dataset {args.dataset_name!r} has no rows in split {args.dataset_split!r}.")
        source = f"{len(images)} images from {args.dataset_name}"
    else:
        photos = sample_photos()
        validation = [photos.pop(name) for name in BUILTIN_VALIDATION_PHOTOS]
        return list(photos.values()), validation, f"the {len(photos)} built-in sample photos (scikit-image)"
    if len(images) < 2:
        logger.warning("Only one training image: validation uses it too (it is not held out).")
        return images, images, source
    held_out = max(1, min(args.num_validation_images, len(images) // 5))
    # Hold out an evenly spread, deterministic subset so the same images are validated on every run.
    picks = sorted(set(np.linspace(0, len(images) - 1, held_out).round().astype(int).tolist()))
    rest = sorted(set(range(len(images))) - set(picks))
    if isinstance(images, DatasetImages):
        return images.subset(rest), images.subset(picks), f"{source} ({len(picks)} held out for validation)"
    train, validation = [images[index] for index in rest], [images[index] for index in picks]
    return train, validation, f"{source} ({len(validation)} held out for validation)"


def validation_batch(
    images: list, resolution: int, channels: int, count: int, resize_to: int | None = None
) -> torch.Tensor:
    """`count` fixed crops of the held-out images (several per image when there are fewer images than `count`)."""
    count = max(count, len(images))
    dataset = TrainingImageDataset(
        images, resolution, channels, random_crop=True, seed=2**31 - 1, min_length=count, resize_to=resize_to
    )
    return torch.stack([dataset[index]["pixel_values"] for index in range(count)])


# ================================================================================================ validation


@torch.no_grad()
def validate(vae: AutoencoderKL, pixels: torch.Tensor, step: int, args: argparse.Namespace, accelerator) -> dict:
    """Reconstruct the held-out images (posterior mode), write a grid PNG, append PSNR/SSIM to metrics.jsonl."""
    was_training = vae.training
    vae.eval()
    pixels = pixels.to(vae.device)
    reconstructions = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train(was_training)
    metrics = {
        "step": step,
        "psnr": float(psnr(pixels, reconstructions).mean()),
        "ssim": float(ssim(pixels, reconstructions).mean()) if min(pixels.shape[-2:]) >= 7 else None,
        "num_images": pixels.shape[0],
    }
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid = image_grid([pixels.cpu(), reconstructions.cpu()])
    grid.save(folder / f"step_{step:06d}.png")
    with open(Path(args.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(metrics) + "\n")
    accelerator.log({"val/psnr": metrics["psnr"], "val/ssim": metrics["ssim"] or 0.0}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
    return metrics


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """Rows of (N, C, H, W) tensors in [-1, 1] -> one PIL image (originals over reconstructions)."""
    count, _, height, width = rows[0].shape
    zoom = max(1, 128 // max(height, width))  # small crops are enlarged (nearest) so the PNG is readable
    height, width = height * zoom, width * zoom
    grid = Image.new("RGB", (count * (width + pad) + pad, len(rows) * (height + pad) + pad), (255, 255, 255))
    for row_index, row in enumerate(rows):
        for column, tensor in enumerate(row):
            grid.paste(
                tensor_to_pil(tensor).convert("RGB").resize((width, height), Image.Resampling.NEAREST),
                (pad + column * (width + pad), pad + row_index * (height + pad)),
            )
    return grid


def plot_loss_curve(log_path: Path, metrics_path: Path, output: Path) -> Path | None:
    """Loss curves (total, reconstruction per pixel, KL) and validation PSNR from the run's JSONL logs."""
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [row for row in rows if row.get("finite", True)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    validation = []
    if metrics_path.is_file():
        validation = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    figure, axes = plt.subplots(1, 3 if validation else 2, figsize=(13 if validation else 9, 3.4))
    axes[0].plot(steps, [row["rec_per_pixel"] for row in rows], lw=0.8, label="reconstruction / pixel")
    if any("lpips" in row for row in rows):
        axes[0].plot(steps, [row.get("lpips", np.nan) for row in rows], lw=0.8, label="LPIPS")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot(steps, [row["kl"] for row in rows], lw=0.8, color="C2", label="KL (per image)")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].legend()
    if validation:
        axes[2].plot([m["step"] for m in validation], [m["psnr"] for m in validation], "o-", color="C3")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("held-out PSNR (dB)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


# =============================================================================================== checkpoints


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resolve_resume(args: argparse.Namespace) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(Path(args.output_dir))
        if not found:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting a new run.", args.output_dir
            )
            return None
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder.")
    return path


def _prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    # Keep limit - 1 so that the checkpoint about to be saved makes `limit`.
    if limit is None:
        return
    existing = _checkpoints(output_dir)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def _truncate_jsonl(path: Path, step: int) -> None:
    # Rows written after the checkpoint we resume from belong to a future that is being replayed.
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class _StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Stop requested: saving a checkpoint after this step (Ctrl-C again to stop at once).")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ===================================================================================================== train


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


def _noise(shape: tuple[int, ...], seed: int, step: int, micro_step: int, rank: int) -> torch.Tensor:
    # Posterior noise as a function of (seed, step, micro step, rank): resumed runs draw the same eps.
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1)[0])
    )
    return torch.randn(shape, generator=generator)


def train(args: argparse.Namespace) -> Path:
    """Run the training described by `args` (see `parse_args`); returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)"
            ) from err
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    # Our own messages at INFO; accelerate's per-file "saved in ..." lines only at WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    set_seed(args.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() < cores:
        # `accelerate launch --cpu` sets OMP_NUM_THREADS=1 for a single process, halving speed on 2 cores.
        logger.warning(
            "Training on %d of %d CPU threads; pass --num_cpu_threads_per_process %d to accelerate launch "
            "(or run the script with python) to use them all.",
            torch.get_num_threads(),
            cores,
            cores,
        )

    accelerator.print(
        f"Mixed precision {mixed_precision} ({args.mixed_precision}) on {describe_path(choose_path(accelerator.device))}"
    )

    # ---- data (fails before any model work on a missing or empty folder)
    train_images, validation_images, source = training_images(args)

    # ---- model, optional EMA, discriminator and LPIPS
    vae = load_vae(args)
    resolution = args.resolution or vae.config.sample_size
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    if resolution % vae.downsampling_factor:
        raise ValueError(f"--resolution {resolution} must be divisible by the VAE factor {vae.downsampling_factor}.")
    channels = vae.config.in_channels
    recipe = None
    if args.fp16_safe:  # teacher = the starting VAE; the student is rescaled, then trained to match it
        calibration = fp16_safe.calibration_pixels(train_images, resolution, channels, resize_to=args.resize_to)
        recipe = fp16_safe.FP16SafeRecipe.from_args(vae, args, calibration)
    vae.train()
    if args.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae_parameters = [p for p in vae.parameters() if p.requires_grad]

    ema = None
    if args.use_ema:
        ema = EMAModel(vae.parameters(), decay=args.ema_decay, model_cls=AutoencoderKL, model_config=vae.config)

    lpips = None
    if args.perceptual_weight > 0:
        lpips = losses.load_lpips(args.lpips_weights).to(accelerator.device)

    discriminator = None
    if args.disc_weight > 0:
        discriminator = losses.PatchGANDiscriminator(in_channels=vae.config.out_channels, num_layers=args.disc_layers)
        discriminator.train()

    # ---- optimisers and schedulers (steps counted per process, as in diffusers' examples)
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = torch.optim.AdamW(vae_parameters, lr=learning_rate, betas=betas, weight_decay=args.adam_weight_decay)
    scheduler_steps = dict(
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, **scheduler_steps)

    dataset = TrainingImageDataset(
        train_images,
        resolution,
        channels,
        random_crop=True,
        random_flip=args.random_flip,
        seed=args.seed,
        min_length=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        resize_to=args.resize_to,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=args.seed),
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    training_forward = VAETrainingForward(vae, args.train_decoder_only)
    if discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            discriminator.parameters(), lr=args.disc_learning_rate or learning_rate, betas=betas, weight_decay=0.0
        )
        disc_scheduler = get_scheduler(args.lr_scheduler, optimizer=disc_optimizer, **scheduler_steps)
        training_forward, discriminator, optimizer, disc_optimizer, dataloader, lr_scheduler, disc_scheduler = (
            accelerator.prepare(
                training_forward, discriminator, optimizer, disc_optimizer, dataloader, lr_scheduler, disc_scheduler
            )
        )
    else:
        training_forward, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            training_forward, optimizer, dataloader, lr_scheduler
        )
    if ema is not None:
        ema.to(accelerator.device)

        # EMA weights live in the checkpoint as a diffusers folder (safetensors), not as a pickled custom object.
        def save_ema(models, weights, checkpoint_dir):
            if accelerator.is_main_process:
                ema.save_pretrained(os.path.join(checkpoint_dir, "vae_ema"))

        def load_ema(models, checkpoint_dir):
            loaded = EMAModel.from_pretrained(os.path.join(checkpoint_dir, "vae_ema"), model_cls=AutoencoderKL)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)

        accelerator.register_save_state_pre_hook(save_ema)
        accelerator.register_load_state_pre_hook(load_ema)

    unwrapped_vae: AutoencoderKL = accelerator.unwrap_model(training_forward).vae
    unwrapped_disc = accelerator.unwrap_model(discriminator) if discriminator is not None else None
    last_layer = unwrapped_vae.decoder.conv_out.weight
    validation_pixels = validation_batch(
        validation_images, resolution, channels, args.num_validation_images, args.resize_to
    )
    num_pixels = channels * resolution * resolution
    d_loss_fn = losses.hinge_d_loss if args.disc_loss == "hinge" else losses.vanilla_d_loss

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if updates_per_epoch == 0:
        raise ValueError("The data loader yields no full batch: lower --train_batch_size.")
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if report_to:
            accelerator.init_trackers(
                "finetune_vae", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            )
    log_path, metrics_path = output_dir / "train_log.jsonl", output_dir / "metrics.jsonl"

    # ---- resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = _resolve_resume(args)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.split("-")[-1])
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
        if accelerator.is_main_process:
            _truncate_jsonl(log_path, global_step)
            _truncate_jsonl(metrics_path, global_step)
    elif accelerator.is_main_process:
        for stale in (log_path, metrics_path):  # a new run in an old folder starts new logs
            stale.unlink(missing_ok=True)

    accelerator.print(
        f"Training {'the decoder of ' if args.train_decoder_only else ''}a VAE with "
        f"{sum(p.numel() for p in vae_parameters) / 1e6:.2f}M trainable parameters on {source}, "
        f"{resolution}x{resolution}, batch {args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation, lr {learning_rate:g}, {args.max_train_steps} steps."
    )
    if accelerator.is_main_process and global_step == 0:
        before = validate(unwrapped_vae, validation_pixels, 0, args, accelerator)
        accelerator.print(f"Held-out PSNR before training: {before['psnr']:.2f} dB")

    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=args.no_progress or not accelerator.is_local_main_process,
    )
    nonfinite_in_a_row = 0
    micro_step = 0
    started = step_started = time.perf_counter()
    with _StopRequested() as stop:
        for epoch in range(first_epoch, num_epochs):
            dataloader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and skip_batches:
                batches = accelerator.skip_first_batches(dataloader, skip_batches)
            for batch in batches:
                pixels = batch["pixel_values"]
                step = global_step  # the optimisation step this micro-batch belongs to
                models = [training_forward] + ([discriminator] if discriminator is not None else [])
                with accelerator.accumulate(*models):
                    # ---------------- generator step
                    latent_shape = (pixels.shape[0], vae.config.latent_channels) + tuple(
                        s // vae.downsampling_factor for s in pixels.shape[-2:]
                    )
                    noise = _noise(latent_shape, args.seed, step, micro_step, accelerator.process_index)
                    reconstructions, moments = training_forward(pixels, noise.to(accelerator.device))
                    reconstructions = reconstructions.float()
                    posterior = DiagonalGaussianDistribution(moments.float())
                    rec = losses.reconstruction_loss(pixels.float(), reconstructions, args.rec_loss)
                    nll = rec
                    logs = {"rec_per_pixel": rec.item() / num_pixels}
                    if lpips is not None:
                        with accelerator.autocast():
                            perceptual = lpips(pixels, reconstructions).float().mean()
                        # LDM adds LPIPS to every pixel's loss, so it is summed over pixels like the rest.
                        nll = nll + args.perceptual_weight * perceptual * num_pixels
                        logs["lpips"] = perceptual.item()
                    kl = losses.kl_loss(posterior)
                    logs["kl"] = kl.item()
                    loss = nll
                    if not args.train_decoder_only:  # a frozen encoder makes KL a constant
                        loss = loss + losses.weighted_kl(
                            kl,
                            step,
                            args.kl_mode,
                            args.kl_weight,
                            beta=args.kl_beta,
                            gamma=args.kl_gamma,
                            capacity_max=args.capacity_max,
                            capacity_stop_steps=args.capacity_stop_steps,
                        )
                    adversarial = discriminator is not None and step >= args.disc_start
                    if adversarial:
                        unwrapped_disc.requires_grad_(False)
                        with accelerator.autocast():
                            g_loss = losses.generator_adversarial_loss(unwrapped_disc(reconstructions)).float()
                        unwrapped_disc.requires_grad_(True)
                        d_weight = losses.adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
                        loss = loss + d_weight * g_loss
                        logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())

                    if recipe is not None:
                        loss, recipe_logs = recipe.loss(pixels, noise, reconstructions, moments)
                        logs.update(recipe_logs)
                    finite = torch.isfinite(loss.detach()).float().reshape(1)
                    finite = bool(accelerator.gather(finite).min() > 0)  # every rank skips together
                    if finite:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(vae_parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    # ---------------- discriminator step: real images vs detached reconstructions
                    if adversarial and finite:
                        # One forward on both halves: DDP allows one forward per backward.
                        with accelerator.autocast():
                            logits = discriminator(torch.cat([pixels, reconstructions.detach().to(pixels.dtype)]))
                        logits_real, logits_fake = logits.float().chunk(2)
                        d_loss = d_loss_fn(logits_real, logits_fake)
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                        disc_optimizer.step()
                        disc_scheduler.step()
                        disc_optimizer.zero_grad(set_to_none=True)
                        logs["d_loss"] = d_loss.item()
                micro_step += 1

                if not finite:
                    nonfinite_in_a_row += 1
                    logger.warning("Non-finite loss at step %d: step skipped (%d in a row).", step, nonfinite_in_a_row)
                    if nonfinite_in_a_row >= args.max_nonfinite_steps:
                        raise RuntimeError(
                            f"The loss was NaN or Inf {nonfinite_in_a_row} steps in a row (last at step {step}); "
                            "aborting. Try a lower --learning_rate, --max_grad_norm 1.0, --mixed_precision bf16 "
                            "instead of fp16, or check the data. The last checkpoint is intact."
                        )
                else:
                    nonfinite_in_a_row = 0

                if not accelerator.sync_gradients:
                    continue
                micro_step = 0
                global_step += 1
                progress.update(1)
                if ema is not None and finite:
                    ema.step(unwrapped_vae.parameters())
                now = time.perf_counter()
                logs.update(step=global_step, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0], finite=finite)
                logs["seconds"] = round(now - step_started, 4)
                step_started = now
                progress.set_postfix(rec=f"{logs['rec_per_pixel']:.4f}", kl=f"{logs['kl']:.1f}")
                accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(logs) + "\n")

                stop_now = stop.requested
                if accelerator.num_processes > 1:
                    flag = torch.tensor([float(stop.requested)], device=accelerator.device)
                    stop_now = bool(accelerator.gather(flag).max() > 0)
                if global_step % args.checkpointing_steps == 0 or stop_now:
                    if accelerator.is_main_process:
                        _prune_checkpoints(output_dir, args.checkpoints_total_limit)
                    accelerator.wait_for_everyone()
                    accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
                if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    with _ema_weights(ema, unwrapped_vae):
                        metrics = validate(unwrapped_vae, validation_pixels, global_step, args, accelerator)
                    progress.write(f"step {global_step}: held-out PSNR {metrics['psnr']:.2f} dB")
                if stop_now:
                    accelerator.print(
                        f"Stopped at step {global_step}; checkpoint saved. Resume with --resume_from_checkpoint latest."
                    )
                    accelerator.end_training()
                    return output_dir
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
    progress.close()
    elapsed = time.perf_counter() - started

    # ---- final model: a plain diffusers VAE folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped_vae.parameters())
        if args.max_train_steps % args.validation_steps:
            validate(unwrapped_vae, validation_pixels, global_step, args, accelerator)
        unwrapped_vae.save_pretrained(output_dir, safe_serialization=True)
        if recipe is not None:
            recipe.finish(unwrapped_vae, validation_pixels, output_dir)
        if args.recompute_scaling_factor:
            _recompute_scaling_factor(unwrapped_vae, train_images, resolution, channels, args, output_dir)
        curve = plot_loss_curve(log_path, metrics_path, output_dir / "loss_curve.png")
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2) + "\n", encoding="utf-8")
        final = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line][-1]
        accelerator.print(
            f"Done: {global_step} steps in {elapsed:.0f} s. Held-out PSNR {final['psnr']:.2f} dB. "
            f"VAE saved to {output_dir}" + (f"; loss curve {curve}" if curve else "")
        )
    accelerator.end_training()
    return output_dir


class _ema_weights:
    """Swap EMA weights in for validation and back afterwards (no-op without EMA)."""

    def __init__(self, ema, model: nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


@torch.no_grad()
def _recompute_scaling_factor(vae, images, resolution, channels, args, output_dir: Path) -> None:
    from .scaling import estimate_latent_statistics, scaling_convention, write_latent_statistics

    vae.eval()
    dataset = TrainingImageDataset(images, resolution, channels, random_crop=False, resize_to=args.resize_to)
    pixels = [dataset[index]["pixel_values"] for index in range(len(dataset))]
    batches = (
        torch.stack(pixels[i : i + args.train_batch_size]) for i in range(0, len(pixels), args.train_batch_size)
    )
    stats = estimate_latent_statistics(
        vae, batches, generator=torch.Generator().manual_seed(args.seed), show_progress=False, total=len(pixels)
    )
    convention = scaling_convention(vae.config)
    changes = write_latent_statistics(output_dir, stats, convention=convention)
    summary = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items() if not isinstance(new, list))
    print(f"Latent statistics of {len(pixels)} training images written to the config ({convention}): {summary}")


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    return train(parse_args(argv, prog=prog))


__all__ = [
    "VAETrainingForward",
    "image_grid",
    "load_model_config",
    "load_vae",
    "main",
    "parse_args",
    "resolve_mixed_precision",
    "plot_loss_curve",
    "train",
    "training_images",
    "validate",
]
