"""What a diffusability regulariser does to a run: the same autoencoder trained from the same random start for the
same steps without and with the flag, then measured on fixed held-out crops.

`tests/test_training_regularisers.py` asserts on it and `benchmarks/bench_train.py --regularisers` prints its
table, so the two describe one setup (`SameStartSetup`). Measured per run (`regulariser_effect`):

- `eq`: `regularisers.equivariance_error` over EQ-VAE's transforms (rescale 0.5, 0.75, rotation 90);
- `down`: the same for 2x and 4x downsampling (what `--scale_equivariance` trains);
- `hf`: `high_frequency_energy` of the latents (`diffusability.latent_spectrum`; lower is smoother);
- `probe`: `probe_loss` of a short probe denoiser (`diffusability.measure_diffusability`; noisy at small budgets);
- `psnr`: held-out PSNR of the reconstructions of the same crops.

The held-out crops come from `coffee` (held out of the built-in training photos) and `camera` (not among them).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..diffusability import latent_spectrum, measure_diffusability
from ..metrics import psnr
from ..regularisers import EquivarianceTransform, equivariance_error
from .loop import main

# The tests' tiny AutoencoderKL (tests/autoencoder_configs.py): 8/16/16 channels, 4 latent channels, factor 4.
TINY_AUTOENCODER_KL = dict(
    _class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
)  # fmt: skip

# 2x and 4x downsampling: the transforms `--scale_equivariance` trains the decoder (and, through z, the encoder) on.
DOWNSAMPLING = {"down_2": EquivarianceTransform((0.5, 0.5)), "down_4": EquivarianceTransform((0.25, 0.25))}


@dataclass
class SameStartSetup:
    """One comparison's recipe (every run of it differs only in the regulariser's flags).

    The defaults are the test's: 1000 steps, because before the model has learned much (200 steps: held-out PSNR
    ~16 dB) the plain run's encoder is still the smooth one of early training and whether a regulariser lowers the
    equivariance error hangs on the seed and the photos (docs/training.md#measured has the numbers).

    Args:
        steps: optimisation steps of every run.
        learning_rate: constant (no warm-up) AdamW learning rate.
        seed: the trainer's `--seed`: the random start (weights), the data order, crops and every random draw.
        resolution: training crop size in pixels.
        resize_to: the built-in photos' short side before cropping (`None`: `--train_data_dir` is used as given).
        batch_size: training batch size.
        train_data_dir: a folder of images instead of the built-in photos (default: the built-in photos).
        model_config: the autoencoder's config, with `_class_name` (default: the tests' tiny AutoencoderKL).
        extra: more trainer arguments for every run.
    """

    steps: int = 1000
    learning_rate: float = 4e-3
    seed: int = 0
    resolution: int = 32
    resize_to: int | None = 256
    batch_size: int = 4
    train_data_dir: str | None = None
    model_config: dict = field(default_factory=lambda: dict(TINY_AUTOENCODER_KL))
    extra: Sequence[str] = ()

    def describe(self) -> str:
        data = self.train_data_dir or f"the built-in photos resized to {self.resize_to} px"
        return (
            f"{self.model_config['_class_name']} {self.model_config.get('block_out_channels', '')} from the same "
            f"random start (seed {self.seed}), {self.steps} steps, {self.resolution} px crops of {data}, batch "
            f"{self.batch_size}, lr {self.learning_rate:g}, fp32"
        )


def train_from_same_start(output_dir: str | Path, setup: SameStartSetup, flags: Sequence[str] = ()) -> Path:
    """Train `setup`'s model from scratch with the regulariser `flags` (e.g. `["--equivariance"]`) in this process;
    returns the output folder (a diffusers folder with `train_log.jsonl`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = output_dir / "model_config.json"
    config.write_text(json.dumps(setup.model_config))
    data = ["--train_data_dir", str(setup.train_data_dir)] if setup.train_data_dir else []
    if setup.resize_to is not None:
        data += ["--resize_to", str(setup.resize_to)]
    argv = [
        "--output_dir", str(output_dir), "--model_config", str(config), *data,
        "--resolution", str(setup.resolution), "--train_batch_size", str(setup.batch_size),
        "--max_train_steps", str(setup.steps), "--learning_rate", str(setup.learning_rate), "--lr_warmup_steps", "0",
        "--seed", str(setup.seed), "--mixed_precision", "no", "--no-recompute_scaling_factor",
        "--validation_steps", str(setup.steps), "--checkpointing_steps", str(10**9), "--report_to", "none",
        "--no_progress", *setup.extra, *flags,
    ]  # fmt: skip
    return main(argv)


def held_out_crops(count: int = 32, size: int = 64, seed: int = 0) -> torch.Tensor:
    """`count` fixed crops (half `coffee`, half `camera`, both resized to a 256 px short side) in [-1, 1]."""
    import numpy as np
    from skimage import data

    crops, generator = [], torch.Generator().manual_seed(seed)
    for name in ("coffee", "camera"):
        image = getattr(data, name)()
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1
        pixels = torch.nn.functional.interpolate(
            pixels, scale_factor=256 / min(pixels.shape[-2:]), mode="bilinear", antialias=True
        )[0]
        for _ in range(count // 2):
            y = int(torch.randint(0, pixels.shape[1] - size, (1,), generator=generator))
            x = int(torch.randint(0, pixels.shape[2] - size, (1,), generator=generator))
            crops.append(pixels[:, y : y + size, x : x + size])
    return torch.stack(crops)


def regulariser_effect(folder: str | Path, images: torch.Tensor, probe_steps: int = 40) -> dict[str, float]:
    """eq, down, hf, probe and psnr (see the module's docstring) of the trained AutoencoderKL in `folder` on
    `images`, plus `seconds`: the run's median s/step after its first quarter (from `train_log.jsonl`)."""
    from ..modeling import AutoencoderKL

    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder).eval()

    def encode(x):
        return vae.encode(x).latent_dist.mode()

    with torch.no_grad():
        latents = encode(images)
        reconstructions = vae.decode(latents).sample.clamp(-1, 1)
        result = {
            "eq": equivariance_error(encode, images),
            "down": equivariance_error(encode, images, transforms=DOWNSAMPLING),
            "hf": latent_spectrum(latents).high_frequency_energy,
            "psnr": float(psnr(images, reconstructions).mean()),
        }
    probe = measure_diffusability(latents, steps=probe_steps, batch_size=16, held_out=8, seed=0)
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {
        **result,
        "probe": probe.probe_loss,
        "seconds": statistics.median(row["seconds"] for row in rows[len(rows) // 4 :]),
    }
