"""Validation and pictures: held-out PSNR/SSIM with a reconstruction grid per validation step, the loss curve."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import tensor_to_pil
from ..metrics import psnr, ssim
from ..modeling import AutoencoderKL


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
