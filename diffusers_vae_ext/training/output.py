"""The final folder: written completely aside, then swapped in, so that a kill never leaves one that looks finished.

`--output_dir` holds the final files (`config.json` + weights, `training_args.json`, `training_recipe.json`,
`loss_curve.png`, `discriminator.safetensors`, the latent statistics in the config or weights, `fp16_check.json`)
next to checkpoints and logs, and a reused folder holds the previous run's final files. The rule:

1. `begin_final_save` makes an empty staging folder `--output_dir/.final.tmp`; everything is written there.
2. `publish_final` flushes it and writes the marker `training_complete.json` into it LAST (step and every file
   with size and sha256).
3. The swap: the previous final files (those its marker lists, and any file of a final folder's name) are moved
   into `.final.previous/`, marker first, `config.json` second, so that from the first rename on the folder no
   longer looks finished; then the new files are moved in, `config.json` (what `from_pretrained` needs) last but
   one and the marker last; then `.final.previous/` and the staging folder are deleted.

So a kill while the files are written (the long part) leaves the previous final folder untouched; a kill during
the swap (a few renames) leaves no `config.json` in `--output_dir`, the previous final files whole in
`.final.previous/` and the new ones whole in `.final.tmp/`; a folder whose `config.json` loads is complete. The
next run in the folder (`clear_interrupted_final_save`, called at start) finishes an interrupted swap whose staging
folder is complete, and otherwise deletes the staging folder and puts previous files back where they were.
`final_folder_problem` checks a final folder, also one copied elsewhere, against its marker.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import folder_files, fsync_dir, marker_problem, pause_point, read_marker, sync_tree, write_marker
from ..data import TrainingImageDataset
from ..modeling import AutoencoderKL
from .recipe import RECIPE_NAME, discriminator_description, recipe_json

MARKER = "training_complete.json"
STAGING = ".final.tmp"
PREVIOUS = ".final.previous"
DISCRIMINATOR_FILE = "discriminator.safetensors"
# Names of a final folder's files, so that those of a run written before markers existed are swapped out too.
FINAL_FILE_PATTERNS = (
    MARKER,
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "training_args.json",
    RECIPE_NAME,
    "loss_curve.png",
    "fp16_check.json",
    DISCRIMINATOR_FILE,
)


@torch.no_grad()
def recompute_scaling_factor(
    vae: AutoencoderKL,
    images: Sequence,
    resolution: int,
    channels: int,
    args: argparse.Namespace,
    output_dir: Path,
) -> None:
    """Measure the trained VAE's latent statistics on centre crops of `images`; write them where its class's
    pipelines read them (`conventions.write_pipeline_statistics`: config keys, or weights for LTX-Video/FLUX.2)."""
    import json

    from ..conventions import write_pipeline_statistics
    from ..scaling import estimate_latent_statistics

    vae.eval()
    dataset = TrainingImageDataset(images, resolution, channels, random_crop=False, resize_to=args.resize_to)
    pixels = [dataset[index]["pixel_values"] for index in range(len(dataset))]
    batches = (
        torch.stack(pixels[i : i + args.train_batch_size]) for i in range(0, len(pixels), args.train_batch_size)
    )
    stats = estimate_latent_statistics(
        vae, batches, generator=torch.Generator().manual_seed(args.seed), show_progress=False, total=len(pixels)
    )
    class_name = json.loads((output_dir / "config.json").read_text(encoding="utf-8"))["_class_name"]
    changes = write_pipeline_statistics(output_dir, class_name, stats)
    summary = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items() if not isinstance(new, list))
    print(
        f"Latent statistics of {len(pixels)} training images written where {class_name}'s pipelines read them: "
        f"{summary or 'per-channel values'}"
    )


def begin_final_save(output_dir: Path) -> Path:
    """An empty staging folder for the final files (after finishing or clearing an interrupted final save)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_interrupted_final_save(output_dir)
    staging = output_dir / STAGING
    staging.mkdir()
    return staging


def save_discriminator(discriminator: torch.nn.Module | None, folder: Path) -> None:
    """`discriminator.safetensors` with its class and config in the metadata (also in `training_recipe.json`)."""
    if discriminator is None:
        return
    import json

    from safetensors.torch import save_file

    description = discriminator_description(discriminator)
    state = {key: value.detach().cpu().contiguous() for key, value in discriminator.state_dict().items()}
    save_file(state, str(folder / DISCRIMINATOR_FILE), metadata={"discriminator": json.dumps(description)})


def load_discriminator(discriminator: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `discriminator.safetensors` (or a final folder holding it) into `discriminator`, strictly; a file
    written for another discriminator config raises `ValueError` naming the arguments to change."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / DISCRIMINATOR_FILE
    if not path.is_file() or path.suffix != ".safetensors":
        raise FileNotFoundError(f"--discriminator_weights {path}: no such .safetensors file.")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    wanted = discriminator_description(discriminator)
    if "discriminator" in metadata:
        saved = json.loads(metadata["discriminator"])
        if saved != wanted:
            raise ValueError(
                f"--discriminator_weights {path} is a {saved}, this run builds a {wanted}: pass "
                f"--disc_layers {saved['config']['num_layers']} (and the same autoencoder channels)."
            )
    try:
        discriminator.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(f"--discriminator_weights {path} does not fit this run's discriminator: {err}") from err


def write_recipe(folder: Path, recipe: dict[str, Any], step: int) -> None:
    has_discriminator = recipe.get("discriminator") is not None
    text = recipe_json(recipe, step, DISCRIMINATOR_FILE if has_discriminator else None)
    (folder / RECIPE_NAME).write_text(text, encoding="utf-8")


def publish_final(staging: Path, output_dir: Path, step: int) -> None:
    """Flush the staging folder, mark it complete, and swap its files into `output_dir` (module docstring)."""
    sync_tree(staging)
    pause_point("final:written", step)
    write_marker(staging, MARKER, folder_files(staging, exclude=(MARKER,)), step=step)
    _swap_in(staging, output_dir)


def _previous_final_files(output_dir: Path, new_names: Sequence[str]) -> list[str]:
    record = read_marker(output_dir, MARKER)
    listed = set(record["files"]) if record else set()
    names = {
        p.name
        for p in output_dir.iterdir()
        if p.name in listed or p.name in new_names or any(fnmatch.fnmatch(p.name, pat) for pat in FINAL_FILE_PATTERNS)
    }
    # Marker first, config.json second: from the first rename on, nothing looks finished.
    return sorted(names, key=lambda n: (n != MARKER, n != "config.json", n))


def _swap_in(staging: Path, output_dir: Path) -> None:
    record = read_marker(staging, MARKER)
    new_names = [name for name in record["files"] if "/" not in name]
    new_names += sorted({name.split("/")[0] for name in record["files"] if "/" in name})
    previous = output_dir / PREVIOUS
    already_in = [name for name in new_names if not (staging / name).exists()]
    if not already_in:  # the previous files are not (all) aside yet
        previous.mkdir(exist_ok=True)
        for name in _previous_final_files(output_dir, new_names):
            os.replace(output_dir / name, previous / name)
        fsync_dir(previous)
        fsync_dir(output_dir)
    pause_point("final:swapping")
    order = sorted(new_names, key=lambda n: (n == "config.json", n)) + [MARKER]
    for name in order:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
    fsync_dir(output_dir)
    shutil.rmtree(staging)
    shutil.rmtree(previous, ignore_errors=True)
    fsync_dir(output_dir)


def clear_interrupted_final_save(output_dir: Path) -> list[str]:
    """Finish a final save killed during its swap, or undo one killed before (see the module docstring); returns
    one line per action."""
    staging, previous = output_dir / STAGING, output_dir / PREVIOUS
    actions = []
    if staging.is_dir():
        record = read_marker(staging, MARKER)
        moved = record is not None and any(not (staging / n).exists() for n in record["files"])
        if record is not None and (moved or marker_problem(staging, MARKER, verify_hashes=True) is None):
            _swap_in(staging, output_dir)
            return [f"finished the interrupted swap of the final files of step {record.get('step')}"]
        shutil.rmtree(staging)
        actions.append(f"removed {STAGING}, an interrupted final save")
    if previous.is_dir():
        if (output_dir / MARKER).is_file():
            shutil.rmtree(previous)
        else:  # put the previous final files back where they were
            for item in previous.iterdir():
                if not (output_dir / item.name).exists():
                    os.replace(item, output_dir / item.name)
            shutil.rmtree(previous)
            actions.append("restored the previous final files")
        fsync_dir(output_dir)
    return actions


def final_folder_problem(folder: Path, verify_hashes: bool = True) -> str | None:
    """Why `folder` is not a complete final folder (None when it is): its marker and every file it lists."""
    return marker_problem(folder, MARKER, verify_hashes=verify_hashes)
