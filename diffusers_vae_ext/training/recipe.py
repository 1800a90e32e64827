"""The run's recipe (`training_recipe.json`): what it takes to reproduce, resume or restart a run elsewhere.

Written into every checkpoint and into the final folder:

- `arguments`: every argument of the run (`vars(args)`, after the defaults that depend on others were filled);
- `autoencoder`: its class name and full config (a checkpoint holds weights but no config.json);
- `discriminator`: its class, config and file (`discriminator.safetensors` in the final folder; `model_1.safetensors`
  in a checkpoint, as accelerate names the second prepared model), or null without one;
- `data`: where the images came from and how they are read (`data.describe_training_data`), how many held out;
- `run`: seed, step, processes, mixed precision, gradient accumulation;
- `versions`: Python, torch, diffusers, accelerate, safetensors and this package.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from typing import Any

import torch

from .data import redacted_storage_options

RECIPE_NAME = "training_recipe.json"
PACKAGES = ("torch", "diffusers", "accelerate", "safetensors", "numpy", "diffusers-vae-ext")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def discriminator_description(discriminator: Any) -> dict[str, Any] | None:
    """Class and constructor config of a PatchGAN, 2-D or 3-D (read back from its layers), or None."""
    if discriminator is None:
        return None
    convs = [m for m in discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    return {
        "class": type(discriminator).__name__,
        "config": {
            "in_channels": convs[0].in_channels,
            "base_channels": convs[0].out_channels,
            "num_layers": len(convs) - 2,
        },
    }


def training_recipe(
    args: argparse.Namespace,
    vae: Any,
    discriminator: Any,
    data: dict[str, Any],
    accelerator: Any,
) -> dict[str, Any]:
    """The recipe as a JSON-able dict (see the module docstring); `step` is added when it is written.

    `data` describes the input (`data.describe_training_data`: never credentials); `--storage_options` is redacted
    in `arguments` too.
    """
    arguments = {**vars(args), "storage_options": redacted_storage_options(getattr(args, "storage_options", None))}
    return {
        "arguments": arguments,
        "autoencoder": {"class": type(vae).__name__, "config": json.loads(json.dumps(dict(vae.config), default=str))},
        "discriminator": discriminator_description(discriminator),
        "data": data,
        "run": {
            "seed": args.seed,
            "num_processes": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        },
        "versions": package_versions(),
    }


def recipe_json(recipe: dict[str, Any], step: int, discriminator_file: str | None) -> str:
    """The recipe at `step`, naming where the discriminator's weights are in this folder."""
    record = {"step": step, **recipe}
    if record.get("discriminator") is not None:
        record["discriminator"] = {**record["discriminator"], "file": discriminator_file}
    return json.dumps(record, indent=2, default=str) + "\n"
