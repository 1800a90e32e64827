"""Validation and pictures: held-out PSNR/SSIM with a reconstruction grid (images) or a side-by-side mp4 (clips)
per validation step, the loss curve."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..autoencoders import AutoencoderAdapter, as_autoencoder
from ..data import tensor_to_pil
from ..metrics import psnr, ssim
from ..modeling import AutoencoderKL
from ..video.writing import write_video
from .objective import frames_as_images


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior mode (or deterministic latents) decoded and clamped, for any class; images given to a 5-D
    class (Qwen-Image) are one-frame clips."""
    if isinstance(vae, AutoencoderKL):  # our fast path, as before
        return vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    adapter = as_autoencoder(vae)
    one_frame = adapter.is_video and pixels.ndim == 4
    inputs = pixels.unsqueeze(2) if one_frame else pixels
    latents = adapter.latents_from_moments(adapter.encode_moments(inputs), sample=False)
    decoded = adapter.decode(latents).float().clamp(-1, 1)
    return decoded.squeeze(2) if one_frame else decoded


@torch.no_grad()
def validate(
    vae: torch.nn.Module,
    pixels: torch.Tensor,
    step: int,
    args: argparse.Namespace,
    accelerator,
    teacher: AutoencoderAdapter | None = None,
) -> dict:
    """Reconstruct the held-out images or clips (posterior mode), write a picture, append metrics to metrics.jsonl.

    Images: a grid PNG (originals over reconstructions). Clips (N, C, T, H, W): an mp4 with the clips side by side,
    originals over reconstructions, and `psnr_per_clip`. With a distillation `teacher`, also the PSNR of the
    student's decode of the teacher's latents against the teacher's own decode (`psnr_teacher_decode`) and against
    the images (`psnr_teacher_latents`).
    """
    was_training = vae.training
    vae.eval()
    pixels = pixels.to(next(vae.parameters()).device)
    reconstructions = reconstruct(vae, pixels)
    per_clip = psnr(pixels.flatten(1, -3), reconstructions.flatten(1, -3))  # one value per image or clip
    frames, frames_rec = frames_as_images(pixels), frames_as_images(reconstructions)
    metrics = {
        "step": step,
        "psnr": float(per_clip.mean()),
        "ssim": float(ssim(frames, frames_rec).mean()) if min(pixels.shape[-2:]) >= 7 else None,
        "num_images": pixels.shape[0],
    }
    if pixels.ndim == 5:
        metrics["psnr_per_clip"] = [round(float(value), 3) for value in per_clip]
    if teacher is not None:
        student = as_autoencoder(vae)
        teacher_raw = teacher.latents_from_moments(teacher.encode_moments(pixels), sample=False)
        teacher_decode = teacher.decode(teacher_raw).float().clamp(-1, 1)
        student_latents = student.unscale(teacher.scale(teacher_raw).float().cpu()).to(pixels)
        student_decode = student.decode(student_latents).float().clamp(-1, 1)
        metrics["psnr_teacher_decode"] = float(
            psnr(teacher_decode.flatten(1, -3), student_decode.flatten(1, -3)).mean()
        )
        metrics["psnr_teacher_latents"] = float(psnr(pixels.flatten(1, -3), student_decode.flatten(1, -3)).mean())
    vae.train(was_training)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 5:
        side_by_side = torch.cat(
            [torch.cat(list(pixels.cpu()), dim=-1), torch.cat(list(reconstructions.cpu()), -1)], -2
        )
        write_video(folder / f"step_{step:06d}.mp4", side_by_side, fps=getattr(args, "fps", None) or 8.0)
        grid = image_grid([frames[:: pixels.shape[2]].cpu(), frames_rec[:: pixels.shape[2]].cpu()])
    else:
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
    if any("kl" in row for row in rows):
        axes[1].plot(steps, [row.get("kl", np.nan) for row in rows], lw=0.8, color="C2", label="KL (per image)")
    if any("latent_mse" in row for row in rows):
        axes[1].plot(steps, [row.get("latent_mse", np.nan) for row in rows], lw=0.8, color="C1", label="latent MSE")
    axes[1].set_xlabel("step")
    if axes[1].lines:  # deterministic classes have no KL
        axes[1].set_yscale("log")
        axes[1].legend()
    if validation:
        axes[2].plot([m["step"] for m in validation], [m["psnr"] for m in validation], "o-", color="C3")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("held-out PSNR (dB)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
