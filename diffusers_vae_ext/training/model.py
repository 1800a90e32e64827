"""What is trained: the VAE (from a folder or a config), the forward the optimiser sees, and its EMA weights."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..modeling import AutoencoderKL
from .arguments import BUILTIN_CONFIGS, CONFIG_DIR


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


def prepare_for_training(vae: AutoencoderKL, args: argparse.Namespace) -> list[nn.Parameter]:
    """Training mode, `--train_decoder_only` freezing and `--gradient_checkpointing`; returns the trained parameters."""
    vae.train()
    if args.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return [p for p in vae.parameters() if p.requires_grad]


@contextmanager
def ema_weights(ema, model: nn.Module) -> Iterator[None]:
    """Swap EMA weights in for validation and back afterwards (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())
