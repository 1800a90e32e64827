r"""The latent-diffusion probe: how well does a small, fixed denoiser learn this latent space in a fixed budget?

Protocol (every number is a default of `measure_diffusability`):

1. Split the latents into a training and a held-out set (a seeded permutation).
2. Standardise **per element**: subtract the mean and divide by the std, over the training samples, at every
   (channel, [frame,] y, x). Per-channel standardisation alone is not enough: a fixed pattern per position (e.g.
   the mean of a sign-scrambled latent space, `docs/diffusability.md`) is something the denoiser learns and the
   Gaussian reference below ignores, which would make rough latent spaces look easy.
3. Train the denoiser (`denoiser.build_denoiser`: a small diffusers `UNet2DModel`) with rectified-flow matching:
   `x_t = (1 - t) x_0 + t eps`, target velocity `v = eps - x_0`, `t = sigmoid(N(0, 1))` (logit-normal, as SD3
   and FLUX train), MSE, AdamW, fixed steps and batch.
   The network predicts a correction to the Gaussian-optimal linear predictor (`predict_velocity`), starting at 0.
4. On the held-out set, at each t of a fixed grid, with fixed noise: the MSE of the predicted velocity, divided by
   the MSE of the best per-element linear (= Gaussian) predictor at that t, which for standardised data is

       L*(t) = Var(v) - Cov(v, x_t)^2 / Var(x_t) = 2 - (2t - 1)^2 / ((1 - t)^2 + t^2)

   (each element: `Var(x_0) = Var(eps) = 1`, independent, mean 0: `Var(v) = 2`, `Cov(v, x_t) = t - (1 - t)`,
   `Var(x_t) = (1 - t)^2 + t^2`; the best predictor is `Cov / Var * x_t`). If the latents were i.i.d. Gaussian this
   would be the best any denoiser can do, so they score about 1.0; whatever structure the denoiser learns to use
   (across positions, channels, frames) brings the ratio below 1.
5. `probe_loss` is the mean of that ratio over the t grid, weighted by the logit-normal density the probe trains
   with (`logit_normal_density`): the middle of the noise range, where a denoiser must use structure, counts most;
   near t = 0 and t = 1 every latent space scores close to 1. Lower is easier to diffuse.

Raw diffusion losses are not comparable across VAEs: scale, per-channel statistics and how much of the latent is
predictable from the noise level alone all change the loss without any change in what a generator can learn.
Standardising removes the scale, and dividing by `L*(t)` removes what a per-element linear denoiser gets for free.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .denoiser import DENOISER_CONFIG, build_denoiser
from .sources import load_latents
from .spectrum import LatentSpectrum, latent_spectrum

__all__ = ["DiffusabilityResult", "gaussian_optimum_loss", "measure_diffusability"]

T_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def logit_normal_density(t: float) -> float:
    """Density of `sigmoid(N(0, 1))` at t: the t-distribution the probe trains with (SD3 / FLUX train the same)."""
    logit = math.log(t / (1 - t))
    return math.exp(-0.5 * logit**2) / (t * (1 - t) * math.sqrt(2 * math.pi))


def gaussian_optimum_loss(t: float | torch.Tensor) -> float | torch.Tensor:
    """MSE of the best per-element linear velocity predictor at time t for standardised data (module docstring)."""
    return 2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t**2)


def predict_velocity(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The probe's velocity: the Gaussian-optimal linear prediction plus the network's correction.

    Preconditioned as in EDM (Karras et al. 2022): the network sees `x_t` at unit variance and its output is scaled
    by the Gaussian optimum's error `sqrt(L*(t))`. Its last layer starts at zero, so the untrained probe *is* the
    per-element Gaussian predictor (ratio 1.0 at every t) and the budget goes into learning structure, not into
    learning the identity at small t.
    """
    t = t.view(-1, *([1] * (x_t.ndim - 1)))
    variance = (1 - t) ** 2 + t**2
    linear = (2 * t - 1) / variance * x_t
    correction = model(x_t / variance.sqrt(), 1000.0 * t.flatten())
    return linear + gaussian_optimum_loss(t).sqrt() * correction


@dataclass
class DiffusabilityResult:
    """What `measure_diffusability` measured.

    Attributes:
        probe_loss: held-out flow-matching loss relative to the per-element Gaussian optimum, mean over the t grid
            weighted by the logit-normal training density (`t_weights`).
            ~1.0: the denoiser found nothing to use beyond per-element statistics; lower: easier to diffuse.
        high_frequency_energy: share of the per-channel standardised latents' spectral power in the upper half of
            radial frequencies (`spectrum` has the definition); white noise gives `spectrum.high_frequency_area`.
        t_grid / loss_curve: the held-out loss ratio at each t; `raw_loss_curve`: the MSE itself.
        train_loss_curve: (step, mean training loss over the last `log_every` steps).
        spectrum: the full `LatentSpectrum` (with the images' spectrum when images were given).
        settings: everything that decided the numbers (steps, batch, lr, split, seed, denoiser config, source).
        seconds: wall time of the whole measurement; `train_seconds` of the training alone.
        samples: decoded samples (N, 3, H, W) in [-1, 1] when a VAE and `num_samples` were given, else None;
            `sample_latents`: the probe's samples in the raw latent space. Neither goes into `to_dict`.
    """

    probe_loss: float
    high_frequency_energy: float
    t_grid: list[float]
    t_weights: list[float]
    loss_curve: list[float]
    raw_loss_curve: list[float]
    train_loss_curve: list[list[float]]
    spectrum: LatentSpectrum
    settings: dict[str, Any]
    seconds: float
    train_seconds: float
    samples: torch.Tensor | None = field(default=None, repr=False)
    sample_latents: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (no tensors)."""
        return {
            "probe_loss": self.probe_loss,
            "high_frequency_energy": self.high_frequency_energy,
            "image_high_frequency_energy": self.spectrum.image_high_frequency_energy,
            "t_grid": self.t_grid,
            "t_weights": self.t_weights,
            "loss_curve": self.loss_curve,
            "raw_loss_curve": self.raw_loss_curve,
            "train_loss_curve": self.train_loss_curve,
            "spectrum": self.spectrum.to_dict(),
            "settings": self.settings,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
        }


def _check_latents(latents: torch.Tensor, held_out: int, min_train: int) -> None:
    if latents.ndim not in (4, 5):
        raise ValueError(
            f"measure_diffusability takes a batch of latents (N, C, h, w) or (N, C, T, h, w), got shape "
            f"{tuple(latents.shape)}. For one latent add the batch axis, but the probe needs many samples."
        )
    if latents.shape[-1] < 4 or latents.shape[-2] < 4:
        raise ValueError(f"Latents of {tuple(latents.shape[-2:])} positions are too small for the probe (>= 4x4).")
    bad = (~torch.isfinite(latents)).flatten(1).any(1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(latents)} latents contain NaN or Inf (first: sample {int(bad.nonzero()[0])}). "
            "Drop them, or re-encode those images in float32 (half precision overflows in some VAEs)."
        )
    if latents.shape[0] < held_out + min_train:
        raise ValueError(
            f"The probe needs at least {held_out + min_train} latents ({held_out} held out + {min_train} to train "
            f"on), got {latents.shape[0]}. Give more samples (e.g. more images, or --num_images), or lower "
            "held_out / min_train (the numbers get noisier)."
        )


def _even(latents: torch.Tensor) -> torch.Tensor:
    # The UNet halves and doubles h and w once: an odd side loses its last row/column.
    height, width = latents.shape[-2:]
    return latents[..., : height - height % 2, : width - width % 2]


@torch.no_grad()
def _held_out_losses(model: nn.Module, data: torch.Tensor, t_grid: tuple[float, ...], seed: int, batch_size: int):
    generator = torch.Generator().manual_seed(seed + 1)
    raw = []
    for t in t_grid:
        total, count = 0.0, 0
        for start in range(0, len(data), batch_size):
            x0 = data[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=generator)
            x_t = (1 - t) * x0 + t * noise
            prediction = predict_velocity(model, x_t, torch.full((len(x0),), t))
            total += float((prediction - (noise - x0)).double().square().sum())
            count += x0.numel()
        raw.append(total / count)
    return raw


@torch.no_grad()
def euler_samples(model: nn.Module, shape: tuple[int, ...], num_steps: int, seed: int) -> torch.Tensor:
    """Samples of the probe in its standardised space: Euler steps of dx/dt = v from t = 1 (noise) to t = 0."""
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape, generator=generator)
    times = torch.linspace(1.0, 0.0, num_steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * predict_velocity(model, x, torch.full((shape[0],), float(t)))
    return x


def measure_diffusability(
    latents: Any,
    *,
    images: torch.Tensor | None = None,
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    held_out: int | float = 0.125,
    min_train: int = 16,
    t_grid: tuple[float, ...] = T_GRID,
    seed: int = 0,
    vae: Any = None,
    num_samples: int = 0,
    sample_steps: int = 10,
    max_latents: int | None = 4096,
    log_every: int = 25,
    show_progress: bool = False,
) -> DiffusabilityResult:
    """Train the probe denoiser on `latents` for a fixed budget and measure how well it denoises held-out ones.

    Args:
        latents: (N, C, h, w) or (N, C, T, h, w) raw latents (any scaling: the probe standardises per element), a
            `LatentCacheDataset`, or a latent cache folder or URL (read with `sources.load_latents`).
        images: the images those latents encode ((N, 3, H, W) or (N, 3, T, H, W)), for the images' spectrum at
            latent resolution beside the latents'; optional.
        steps: training steps (the budget). More steps lower every score; compare only at equal budget.
        batch_size: training batch size.
        learning_rate: AdamW learning rate (constant after a 10 % linear warm-up).
        held_out: held-out samples, a count or a fraction of N (at least 8 either way).
        min_train: fewest training samples accepted.
        t_grid: times at which the held-out loss is measured (each in (0, 1)).
        seed: seeds the split, the denoiser's initialisation, the batches, t and noise, the held-out noise and
            the samples: the same seed and inputs give the same numbers (on the same machine and thread count).
        vae: the VAE (model or `AutoencoderAdapter`) whose latents these are; needed to decode samples, and a
            cache made by another VAE is refused.
        num_samples: with `vae`, draw this many samples from the probe and decode them (`result.samples`).
        sample_steps: Euler steps per sample.
        max_latents: read at most this many samples from a cache.
        log_every: steps per point of `train_loss_curve`.
        show_progress: a tqdm bar over training steps.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    data, source = load_latents(latents, vae, max_latents, seed)
    if data.ndim not in (4, 5):
        _check_latents(data, 8, min_train)
    num_held_out = max(8, int(held_out) if held_out >= 1 else math.ceil(held_out * data.shape[0]))
    _check_latents(data, num_held_out, min_train)
    if images is not None and images.shape[0] != data.shape[0]:
        raise ValueError(f"images has {images.shape[0]} samples, the latents {data.shape[0]}: give one per latent.")
    spectrum = latent_spectrum(data, images)
    data = _even(data)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=generator)
    train, test = data[order[num_held_out:]], data[order[:num_held_out]]
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp_min(1e-6 * float(train.std()) + 1e-12)
    train, test = (train - mean) / std, (test - mean) / std

    model = build_denoiser(tuple(train.shape[1:]), seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    train_curve, running = [], []
    tick = time.perf_counter()
    with torch.enable_grad():  # callers (e.g. the evaluation) may run under no_grad
        for step in tqdm(range(steps), desc="diffusability probe", unit="step", disable=not show_progress):
            index = torch.randint(0, train.shape[0], (batch_size,), generator=generator)
            x0 = train[index]
            t = torch.sigmoid(torch.randn(batch_size, generator=generator))  # logit-normal, as SD3 trains
            noise = torch.randn(x0.shape, generator=generator)
            t_b = t.view(-1, *([1] * (x0.ndim - 1)))
            x_t = (1 - t_b) * x0 + t_b * noise
            loss = (predict_velocity(model, x_t, t) - (noise - x0)).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            if len(running) == log_every or step == steps - 1:
                train_curve.append([step + 1, sum(running) / len(running)])
                running = []
    train_seconds = time.perf_counter() - tick

    model.eval()
    raw = _held_out_losses(model, test, tuple(t_grid), seed, batch_size=64)
    curve = [loss / gaussian_optimum_loss(t) for loss, t in zip(raw, t_grid)]
    density = [logit_normal_density(t) for t in t_grid]
    weights = [d / sum(density) for d in density]

    samples = sample_latents = None
    if num_samples and vae is not None:
        from .samples import decode_latents

        standard = euler_samples(model, (num_samples, *train.shape[1:]), sample_steps, seed)
        sample_latents = standard * std + mean
        samples = decode_latents(vae, sample_latents)

    settings = {
        **source,
        "num_latents": int(data.shape[0]),
        "num_train": int(train.shape[0]),
        "num_held_out": int(num_held_out),
        "probe_shape": list(train.shape[1:]),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "t_grid": list(t_grid),
        "seed": seed,
        "standardisation": "per element (mean/std over training samples at each channel and position)",
        "objective": "rectified flow, v = eps - x0, t = sigmoid(N(0, 1)); velocity = Gaussian optimum + UNet",
        "denoiser": {"class": "UNet2DModel" + (" per frame + temporal conv" if data.ndim == 5 else ""),
                     **{k: list(v) if isinstance(v, tuple) else v for k, v in DENOISER_CONFIG.items()}},
        "num_samples": 0 if samples is None else num_samples,
        "sample_steps": sample_steps,
    }  # fmt: skip
    return DiffusabilityResult(
        probe_loss=sum(w * r for w, r in zip(weights, curve)),
        high_frequency_energy=spectrum.high_frequency_energy,
        t_grid=list(t_grid),
        t_weights=weights,
        loss_curve=curve,
        raw_loss_curve=raw,
        train_loss_curve=train_curve,
        spectrum=spectrum,
        settings=settings,
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        samples=samples,
        sample_latents=sample_latents,
    )
