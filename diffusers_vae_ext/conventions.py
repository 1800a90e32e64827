"""How each autoencoder class's pipelines scale latents, and writing measured statistics where they read them.

diffusers' pipelines do not agree on one convention: SD/SDXL/SD3/FLUX read `AutoencoderKL`'s config keys
(`diffusers_vae_ext.scaling`), Wan and Qwen-Image read per-channel `latents_mean`/`latents_std` from the config
with no `scaling_factor`, LTX-Video reads per-channel buffers stored in the weights, and FLUX.2 normalises
2x2-patchified latents with the running statistics of a BatchNorm layer in the weights. `pipeline_convention`
names the convention per class; `pipeline_statistics_updates` turns measured `LatentStatistics` into the config
keys and weight tensors that class's pipelines read, and `write_pipeline_statistics` writes them (config.json and
safetensors files, each replaced atomically; every new file is written and flushed before the first one replaces its
old version, so a kill leaves the old folder, or the new one, or at worst for the few renames between, new weights
with the old config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text, fsync_dir, remove_stale_temporaries
from .scaling import CONVENTIONS, LatentStatistics, scaling_convention
from .scaling.apply import _get


@dataclass(frozen=True)
class PipelineConvention:
    """How diffusers' pipelines scale the latents of one autoencoder class (read from `pipelines/<family>/`).

    Attributes:
        convention: `"scale"`, `"shift"` or `"per_channel"` (the formulas of `scale_latents`).
        statistics_in: where the per-channel mean/std live: `"config"` (`latents_mean`/`latents_std` keys) or
            `"weights"` (buffers in the state dict: LTX-Video's `latents_mean`/`latents_std`, FLUX.2's
            `bn.running_mean`/`bn.running_var`); None when the convention has none.
        latents_patch_size: the statistics are per channel of p x p patchified latents (FLUX.2: 2).
        reads_scaling_factor: False where the pipelines ignore `scaling_factor` (Wan, Qwen-Image, FLUX.2).
    """

    convention: str
    statistics_in: str | None = None
    latents_patch_size: int = 1
    reads_scaling_factor: bool = True


def pipeline_convention(class_name: str, config: Any) -> PipelineConvention:
    """The scaling convention diffusers' pipelines apply to latents of `class_name` with this `config`.

    | class | pipelines compute before `vae.decode` | convention |
    |---|---|---|
    | AutoencoderKL | from its config keys (module table) | `scaling_convention(config)` |
    | AutoencoderKLFlux2 | `patchify(z) * sqrt(bn.running_var + eps) + bn.running_mean`, unpatchify | per_channel, 2x2, weights |
    | AutoencoderDC, AutoencoderKLHunyuanVideo, AutoencoderKLCogVideoX | `z / scaling_factor` | scale |
    | AutoencoderTiny | `z / scaling_factor (+ shift_factor in FLUX pipelines)` | shift if shift_factor else scale |
    | AutoencoderKLWan, AutoencoderKLQwenImage | `z / (1 / latents_std) + latents_mean` | per_channel, config |
    | AutoencoderKLLTXVideo | `z * latents_std / scaling_factor + latents_mean` (buffers) | per_channel, weights |

    Unknown class names fall back to `scaling_convention(config)`.
    """
    if class_name == "AutoencoderKLFlux2":
        return PipelineConvention("per_channel", "weights", latents_patch_size=2, reads_scaling_factor=False)
    if class_name in ("AutoencoderDC", "AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX"):
        return PipelineConvention("scale")
    if class_name == "AutoencoderTiny":
        # Its config always has shift_factor (default 0.0); SD pipelines ignore it, FLUX pipelines add it.
        return PipelineConvention("shift" if _get(config, "shift_factor") else "scale")
    if class_name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        return PipelineConvention("per_channel", "config", reads_scaling_factor=False)
    if class_name == "AutoencoderKLLTXVideo":
        return PipelineConvention("per_channel", "weights")
    convention = scaling_convention(config)
    return PipelineConvention(convention, "config" if convention == "per_channel" else None)


def allowed_conventions(class_name: str, config: Any) -> tuple[str, ...]:
    """Conventions whose keys some pipeline of `class_name` reads (the first is the default)."""
    default = pipeline_convention(class_name, config).convention
    if class_name not in _FIXED:  # AutoencoderKL (and unknown classes): whichever keys the config gets
        return (default, *(c for c in CONVENTIONS if c != default))
    if class_name == "AutoencoderTiny":  # SD pipelines read scaling_factor, FLUX pipelines also shift_factor
        return (default, *(c for c in ("scale", "shift") if c != default))
    return (default,)


_FIXED = (
    "AutoencoderKLFlux2",
    "AutoencoderDC",
    "AutoencoderTiny",
    "AutoencoderKLWan",
    "AutoencoderKLQwenImage",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKLLTXVideo",
    "AutoencoderKLCogVideoX",
)


def pipeline_statistics_updates(
    class_name: str, config: Any, stats: LatentStatistics, convention: str | None = None
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The config keys and weight tensors that make `class_name`'s pipelines see unit-variance latents.

    Args:
        class_name: the autoencoder class (`config["_class_name"]`).
        config: its config.
        stats: statistics of its raw latents; for FLUX.2 of the 2x2-patchified latents (4C channels).
        convention: one of `allowed_conventions(class_name, config)`; default: the pipelines' own.

    Returns `(config_updates, weight_updates)`:

    | class | config | weights |
    |---|---|---|
    | AutoencoderKL | `stats.config_updates(convention)` | - |
    | AutoencoderDC, HunyuanVideo, CogVideoX | `scaling_factor = 1 / std` | - |
    | AutoencoderTiny | `scaling_factor`, `shift_factor` (0.0 for "scale") | - |
    | Wan, Qwen-Image | `latents_mean`, `latents_std` | - |
    | LTX-Video | `scaling_factor = 1.0` | `latents_mean`, `latents_std` |
    | FLUX.2 | - | `bn.running_mean = mean_c`, `bn.running_var = std_c^2 - batch_norm_eps` |
    """
    allowed = allowed_conventions(class_name, config)
    convention = convention or allowed[0]
    if convention not in allowed:
        raise ValueError(
            f"{class_name}'s pipelines apply the {allowed[0]!r} convention"
            + (f" (or {', '.join(repr(c) for c in allowed[1:])})" if len(allowed) > 1 else "")
            + f"; --convention {convention} would write keys they do not read. Drop --convention."
        )
    mean, std = stats.channel_mean.tolist(), stats.channel_std.tolist()
    if class_name == "AutoencoderKLFlux2":
        eps = _get(config, "batch_norm_eps") or 1e-4
        return {}, {"bn.running_mean": mean, "bn.running_var": [max(s * s - eps, 0.0) for s in std]}
    if class_name == "AutoencoderKLLTXVideo":
        return {"scaling_factor": 1.0}, {"latents_mean": mean, "latents_std": std}
    if class_name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        return {"latents_mean": mean, "latents_std": std}, {}
    if class_name in ("AutoencoderDC", "AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX"):
        return {"scaling_factor": stats.scaling_factor}, {}
    if class_name == "AutoencoderTiny":
        shift = stats.shift_factor if convention == "shift" else 0.0
        return {"scaling_factor": stats.scaling_factor, "shift_factor": shift}, {}
    return stats.config_updates(convention), {}


def write_weight_statistics(folder: str | os.PathLike, updates: dict[str, list[float]]) -> dict[str, tuple]:
    """Replace tensors (by state-dict key) in every safetensors file of `folder` that holds them, atomically.

    Each file is rewritten next to itself (same metadata, same dtypes and shapes) and flushed; only when all are
    written are they moved over the old ones with `os.replace`, one after the other: a crash leaves every file old
    or new, never partial. Temporaries left by an earlier interrupted call are removed first. A key found in no file, or a value of another
    size than the stored tensor, raises `ValueError` before anything is written. Returns `{key: (old, new)}`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights to write the statistics into.")
    plan: list[tuple[Path, list[str], dict[str, str]]] = []
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            hits = [key for key in updates if key in handle.keys()]
            for key in hits:
                stored = handle.get_slice(key).get_shape()
                if int(torch.tensor(stored).prod()) != len(updates[key]):
                    raise ValueError(
                        f"{file.name}: {key} has shape {stored}, the statistics have {len(updates[key])} values."
                    )
            if hits:
                plan.append((file, hits, handle.metadata() or {}))
                found.update(hits)
    missing = sorted(set(updates) - found)
    if missing:
        raise ValueError(f"{folder}: no safetensors file holds {missing}; is this the right autoencoder folder?")
    changes: dict[str, tuple] = {}
    staged: list[tuple[str, Path]] = []
    try:
        for file, keys, metadata in plan:
            remove_stale_temporaries(folder, file.name)
            tensors = load_file(str(file))
            for key in keys:
                old = tensors[key]
                tensors[key] = torch.tensor(updates[key], dtype=torch.float64).to(old.dtype).view(old.shape)
                changes[key] = (old.flatten().tolist(), tensors[key].flatten().tolist())
            temporary = _temporary_sibling(folder, file.name)
            staged.append((temporary, file))
            save_file(tensors, temporary, metadata=metadata)
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
            os.chmod(temporary, file.stat().st_mode & 0o7777)
        for temporary, file in staged:
            os.replace(temporary, file)
    except BaseException:
        for temporary, _ in staged:
            Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return changes


def _temporary_sibling(folder: Path, name: str) -> str:
    # A unique hidden sibling that `remove_stale_temporaries(folder, name)` recognises.
    import tempfile

    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    return temporary


def write_pipeline_statistics(
    folder: str | os.PathLike, class_name: str, stats: LatentStatistics, convention: str | None = None
) -> dict[str, tuple[Any, Any]]:
    """Write `pipeline_statistics_updates` into an autoencoder folder: config.json keys and weight tensors.

    Config keys are written as `scaling.write_latent_statistics` does (other keys and their order kept, atomic
    replace); weights with `write_weight_statistics`. Returns `{key: (old, new)}` of everything that changed.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --vae must be a local autoencoder folder to write into.")
    config = json.loads(path.read_text(encoding="utf-8"))
    config_updates, weight_updates = pipeline_statistics_updates(class_name, config, stats, convention)
    changes: dict[str, tuple[Any, Any]] = {}
    if weight_updates:
        changes.update(write_weight_statistics(folder, weight_updates))
    for key, value in config_updates.items():
        if config.get(key) != value and not (value is None and key not in config):
            changes[key] = (config.get(key), value)
            config[key] = value
    if config_updates:
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")
    return changes
