"""Shared fixtures: small VAE configs, paired models with identical weights, real photos as tensors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from PIL import Image

from diffusers_vae_ext import AutoencoderKL
from diffusers_vae_ext.data import pil_to_tensor, resize_and_crop, sample_photos, write_sample_photos

torch.set_num_threads(2)

# Small but complete: 3 levels (factor 4), two layers per block, mid-block attention, GroupNorm with 4 groups.
SMALL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


# The trainer's tests: a 2-level, 8/16-channel AutoencoderKL config (factor 2) that trains in seconds.
TINY_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 1.0,
}


def make_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """Our VAE with random weights; the weights are perturbed so biases and norms are not all 0/1."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**SMALL_VAE_CONFIG, **overrides}).eval()
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return vae


def diffusers_twin(vae: AutoencoderKL) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL with the same config and a copy of `vae`'s weights (strict load)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    twin = DiffusersAutoencoderKL(**config).eval()
    twin.load_state_dict(vae.state_dict(), strict=True)
    return twin


@pytest.fixture
def small_vae() -> AutoencoderKL:
    return make_vae()


def photo_batch(size: int = 64, names: tuple[str, ...] = ("astronaut", "chelsea", "coffee")) -> torch.Tensor:
    """Real photographs (scikit-image), centre-cropped to size x size, in [-1, 1], shape (N, 3, size, size)."""
    photos = sample_photos()
    crops = [resize_and_crop(photos[name], (size, size))[0] for name in names]
    return torch.stack([pil_to_tensor(crop) for crop in crops])


@pytest.fixture(scope="session")
def photos64() -> torch.Tensor:
    return photo_batch(64)


@pytest.fixture(scope="session")
def sample_images() -> dict[str, Image.Image]:
    return sample_photos()


def cpu_launch(num_processes: int = 2, port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` argv prefix and env for `num_processes` real CPU processes.

    `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate >= 1.x starts several CPU processes
    only through mpirun); `--multi_gpu` with ACCELERATE_USE_CPU starts them through torchrun, on gloo.
    """
    import sys

    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        argv += ["--main_process_port", str(port)]
    return argv, {"ACCELERATE_USE_CPU": "true"}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's singletons reset around a test: each training run builds its own Accelerator, whose settings
    must not leak into the next (modules that train use it through `pytestmark`)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny models on a shared 2-core machine run 5-20x slower with 2 threads (they wait on each other), and runs that
    are compared with one another, or with launched processes given OMP_NUM_THREADS=1, must use the same kernels.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A folder holding the built-in sample photos (`data.write_sample_photos`), one per test module."""
    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """A folder for one test module's shared files (models, photos, caches, runs), named after the module."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def vae_dir(workdir) -> Path:
    """`make_vae(seed=0)` saved as a diffusers folder (safetensors) in `workdir`, once per module."""
    make_vae(seed=0).save_pretrained(workdir / "vae")
    return workdir / "vae"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (train_log.jsonl, metrics.jsonl, skipped.jsonl), blank lines passed over."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar file (a webdataset shard) of `(name, bytes)` members in this order, with fixed mtimes."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
