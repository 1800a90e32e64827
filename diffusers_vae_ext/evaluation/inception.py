"""The Inception-v3 of FID (pytorch-fid's "FID Inception", TensorFlow's 2015-12-05 graph), without torchvision.

Written from the published architecture so that `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's weights
file) loads with no missing or unexpected keys: module names follow torchvision's `Inception3` (`Conv2d_1a_3x3`,
`Mixed_5b.branch1x1.conv`, ...; `fc` with 1008 classes), with the FID variant's differences:

- `Mixed_5b..5d`, `Mixed_6b..6e`, `Mixed_7b`: the average-pool branch leaves padded zeros out of the mean
  (`count_include_pad=False`, as TensorFlow does);
- `Mixed_7c`: the pool branch is a max pool.

Features are pytorch-fid's default: the 2048-d output of the final average pool ("pool3"), for images resized
bilinearly to 299x299 and scaled to [-1, 1]. Weights load from safetensors only; `convert_inception_weights`
(`diffusers-vae convert-inception`) turns the `.pth` into one, once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..state_dicts import state_dict_differences

INCEPTION_WEIGHTS_ENV = "DIFFUSERS_VAE_INCEPTION_WEIGHTS"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """`pool="avg"` for Mixed_7b (padding left out of the mean), `pool="max"` for the FID graph's Mixed_7c."""

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in FID: `forward(images)` returns (N, 2048) pool3 features of images in [-1, 1].

    A frozen feature extractor (no gradients, always eval). `fc` (1008 classes) is kept only so the published
    weights load strictly; it is not used. Build it with `load_inception()`: `FIDInceptionV3()` alone is random.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always eval: BatchNorm must use the stored running statistics."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Pool3 features (N, 2048) in float32 of RGB images (N, 3, H, W) in [-1, 1], any size (resized to 299)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception expects RGB images (N, 3, H, W), got {tuple(images.shape)}.")
        weight = self.Conv2d_1a_3x3.conv.weight
        x = images.to(device=weight.device, dtype=weight.dtype).clamp(-1, 1)
        # pytorch-fid resizes [0, 1] images, then maps them to [-1, 1]; bilinear weights sum to 1, so resizing the
        # [-1, 1] images directly gives the same numbers.
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3)).float()


def _is_counter(key: str) -> bool:
    # BatchNorm's step counter: not a weight, absent from older files, irrelevant in eval.
    return key.endswith("num_batches_tracked")


def _check_state_dict(state: dict[str, Tensor], source: str, hint: str) -> None:
    with torch.device("meta"):
        expected = {k: v for k, v in FIDInceptionV3().state_dict().items() if not _is_counter(k)}
    state = {k: v for k, v in state.items() if not _is_counter(k)}
    missing, unexpected, wrong_shape = state_dict_differences(state, expected)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not hold the FID Inception weights: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, wrong shapes {wrong_shape[:5]}. {hint}"
        )


def _missing_weights_message(path: str) -> str:
    return (
        f"Inception weights not found at {path}. rFID needs pytorch-fid's {FID_WEIGHTS_NAME} converted once to "
        f"safetensors:\n  1. download {FID_WEIGHTS_URL}\n"
        f"  2. diffusers-vae convert-inception --input {FID_WEIGHTS_NAME} --output fid_inception.safetensors\n"
        f"then pass --inception_weights fid_inception.safetensors (or set {INCEPTION_WEIGHTS_ENV})."
    )


def load_inception(weights: str | os.PathLike | None = None) -> FIDInceptionV3:
    """A `FIDInceptionV3` with weights from a safetensors file (`weights`, else ${INCEPTION_WEIGHTS_ENV}).

    Raises FileNotFoundError (saying how to make the file) when there is none, ValueError for a file that is not
    safetensors or whose tensors do not match the FID Inception exactly.
    """
    from safetensors.torch import load_file

    if weights is None:
        weights = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not weights:
            raise FileNotFoundError(_missing_weights_message(f"${INCEPTION_WEIGHTS_ENV} (not set)"))
    path = Path(weights).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a .safetensors file; the Inception weights are only loaded from safetensors. Convert "
            f"pytorch-fid's {FID_WEIGHTS_NAME} once with `diffusers-vae convert-inception --input {path.name} "
            "--output fid_inception.safetensors`."
        )
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(str(path)))
    state = load_file(str(path))
    _check_state_dict(state, str(path), "Make the file with `diffusers-vae convert-inception`.")
    model = FIDInceptionV3()
    result = model.load_state_dict({k: v for k, v in state.items() if not _is_counter(k)}, strict=False)
    # Only the step counters may be absent; anything else was caught by _check_state_dict.
    assert not result.unexpected_keys and all(_is_counter(k) for k in result.missing_keys), result
    return model


def convert_inception_weights(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` to safetensors (float32), atomically.

    The `.pth` is read with `torch.load(weights_only=True)` (tensors and plain containers only) and checked
    against `FIDInceptionV3`'s keys and shapes before anything is written. Returns the written path.
    """
    from safetensors.torch import save_file

    input_path, output_path = Path(input_path).expanduser(), Path(output_path).expanduser()
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path} does not exist. Download it from {FID_WEIGHTS_URL}.")
    # An explicit one-time conversion of a file the user chose; weights_only=True still refuses arbitrary objects.
    state = torch.load(input_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor) and not _is_counter(k)}
    _check_state_dict(tensors, str(input_path), f"--input takes pytorch-fid's {FID_WEIGHTS_NAME}.")
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(
            tensors, temporary, metadata={"format": "pt", "model": "fid-inception-v3", "source": input_path.name}
        )
        os.replace(temporary, output_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return output_path
