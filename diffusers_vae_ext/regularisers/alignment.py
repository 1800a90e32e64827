"""VA-VAE / LightningDiT (Yao et al., CVPR 2025, arXiv:2501.01423; `--align_to PATH`, `--align_weight`): the VF
loss between projected latents and a frozen vision model's features, its adaptive weight, and the loading of that
vision model (e.g. DINOv2) from a local transformers folder, safetensors only."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import adaptive_weight
from .transforms import fold_frames, resize_spatial

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionFoundationAlignment(nn.Module):
    """VA-VAE's "VF loss": latents, mapped by a 1x1 conv to the vision model's width, are pulled towards its
    features (arXiv:2501.01423; hustvl/LightningDiT `vavae/ldm/modules/losses/contperceptual.py`).

        z'   = proj(z)                                    (1x1 conv, no bias: LightningDiT's `reverse_proj`)
        cos  = mean_{n,i} relu(1 - cos_margin - cos(z'_{n,:,i}, f_{n,:,i}))
        dist = mean_{n,i,j} relu(|S(z')_{n,i,j} - S(f)_{n,i,j}| - distmat_margin),  S = cosine-similarity matrix
               of the positions of one sample
        loss = cos_weight * cos + distmat_weight * dist

    Defaults are LightningDiT's `vavae/configs/f16d32_vfdinov2.yaml` (margins 0.5 / 0.25, vf_weight 0.1 with the
    adaptive weight, see `vf_adaptive_weight`); its first long stage uses margins 0 and weight 0.5.

    Grids: DINOv2's patch 14 rarely gives the latent grid (stride 8 or 16). We resize the *foundation features* to
    the latent grid (bilinear, antialiased when shrinking), never the latents: every latent position is then
    constrained and the encoder's gradient is not blurred by a resize; the features are frozen targets, so their
    resize costs nothing backward. (LightningDiT instead feeds DINOv2 224 px images so that its 16x16 grid equals
    an f16 latent of a 256 px image; `VisionFeatureExtractor(images, grid=...)` does that when asked.)

    Memory: S has (h * w)^2 entries per sample (1 GiB in float32 for a 128x128 latent), so above
    `distmat_max_positions` positions the distance-matrix term compares average-pooled maps (the cosine term stays at
    full resolution). LightningDiT's f16 latents of 256 px images have 256 positions; the default 4096 (a 64x64
    latent) keeps the exact formula up to 512 px at f8.

    Videos: latents (N, C, T, h, w) against features (N, D, T, h', w') of the frames matching the latent frames
    (e.g. `x[:, :, ::temporal_factor]` for causal video VAEs); positions are compared within each frame.

    The projection is trained with the autoencoder: put `parameters()` in the generator's optimizer and save them
    with the training checkpoints (they are not part of the exported diffusers folder).
    """

    def __init__(
        self,
        latent_channels: int,
        feature_dim: int,
        *,
        cos_margin: float = 0.5,
        distmat_margin: float = 0.25,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        distmat_max_positions: int = 4096,
    ):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)
        self.cos_margin = cos_margin
        self.distmat_margin = distmat_margin
        self.cos_weight = cos_weight
        self.distmat_weight = distmat_weight
        self.distmat_max_positions = distmat_max_positions

    def project(self, z: Tensor) -> Tensor:
        """proj(z), frame by frame for 5-D latents; same layout as `z` with `feature_dim` channels."""
        folded, unfold = fold_frames(z)
        return unfold(self.proj(folded.to(self.proj.weight.dtype)))

    def forward(self, z: Tensor, features: Tensor, return_terms: bool = False) -> Tensor | tuple[Tensor, dict]:
        """The VF loss (a float32 scalar) of latents `z` against frozen `features` (N, D, h', w') / (N, D, T, h', w').

        With `return_terms=True` also returns {"vf_cos": ..., "vf_distmat": ...} (detached) for logging.
        """
        if (
            z.ndim != features.ndim
            or z.shape[0] != features.shape[0]
            or (z.ndim == 5 and z.shape[2] != features.shape[2])
        ):
            raise ValueError(
                f"Latents {tuple(z.shape)} and vision features {tuple(features.shape)} must have the same batch "
                "(and, for videos, frame) count; for causal video VAEs pick the frames x[:, :, ::temporal_factor]."
            )
        if features.shape[1] != self.proj.out_channels:
            raise ValueError(
                f"Vision features have {features.shape[1]} channels but the projection maps to "
                f"{self.proj.out_channels}; build VisionFoundationAlignment(feature_dim=vision.feature_dim)."
            )
        projected, _ = fold_frames(self.project(z))
        target, _ = fold_frames(features.detach())
        projected = projected.float()
        target = resize_spatial(target.float(), projected.shape[-2:], antialias=True)
        cos_zf = F.cosine_similarity(projected, target, dim=1)  # (B, h, w)
        cos = F.relu(1.0 - self.cos_margin - cos_zf).mean()
        positions = projected.shape[-2] * projected.shape[-1]
        if positions > self.distmat_max_positions:
            stride = math.ceil(math.sqrt(positions / self.distmat_max_positions))
            projected = F.avg_pool2d(projected, stride, ceil_mode=True)
            target = F.avg_pool2d(target, stride, ceil_mode=True)
        projected = F.normalize(projected.flatten(2), dim=1)  # (B, D, positions), unit vectors
        target = F.normalize(target.flatten(2), dim=1)
        similarity_z = projected.transpose(1, 2) @ projected
        similarity_f = target.transpose(1, 2) @ target
        distmat = F.relu((similarity_z - similarity_f).abs() - self.distmat_margin).mean()
        loss = self.cos_weight * cos + self.distmat_weight * distmat
        if return_terms:
            return loss, {"vf_cos": cos.detach(), "vf_distmat": distmat.detach()}
        return loss


def vf_adaptive_weight(nll_loss: Tensor, vf_loss: Tensor, last_layer: Tensor, vf_weight: float = 0.1) -> Tensor:
    """VA-VAE's weight of the VF loss: ||d nll/d W|| / (||d vf/d W|| + 1e-4), clamped to [0, 1e8], detached,
    times `vf_weight` (`--align_weight`); W is the encoder's last layer (`encoder_last_layer(vae)`).

    The trainer adds `vf_adaptive_weight(nll, vf, W, align_weight) * vf` to the generator loss, nll being its
    reconstruction (+ perceptual) term. Both losses must depend on W (the encoder must be trained).
    """
    return adaptive_weight(nll_loss, vf_loss, last_layer, vf_weight, max_weight=1e8)


def encoder_last_layer(vae: nn.Module) -> Tensor:
    """The weight of the last convolution of `vae.encoder`: where VA-VAE balances its VF loss.

    `encoder.conv_out` for our AutoencoderKL and diffusers' AutoencoderKL, AutoencoderKLFlux2, AutoencoderDC and
    AutoencoderKLWan / QwenImage (a Conv2d/Conv3d), its inner `.conv` for the causal-conv wrappers of HunyuanVideo,
    LTX and CogVideoX; the last Conv2d of `encoder.layers` for AutoencoderTiny. (LightningDiT uses
    `encoder.conv_out.weight`, before `quant_conv`.)
    """
    encoder = getattr(vae, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(vae).__name__} has no `encoder` module; cannot find its last layer.")
    conv_out = getattr(encoder, "conv_out", None)
    search = encoder if conv_out is None else conv_out
    convs = [m for m in search.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"No convolution found in {type(vae).__name__}.encoder; pass its last layer explicitly.")
    return convs[-1].weight


class VisionFeatureExtractor(nn.Module):
    """A frozen transformers vision model as a feature map: images in [-1, 1] -> patch features (N, D, h, w).

    Build it with `load_vision_model(path)`. Images are mapped to [0, 1], normalised with the folder's
    preprocessor mean/std (ImageNet's when it has none) and resized (bilinear, antialiased) to a multiple of the
    patch size; the CLS and register tokens are dropped from `last_hidden_state`. Always in eval mode, no parameter
    requires grad, and features are computed without a graph: they are targets, never trained through.
    """

    def __init__(self, model: nn.Module, patch_size: int, mean, std, source: str = ""):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.patch_size = int(patch_size)
        self.feature_dim = int(model.config.hidden_size)
        self.source = source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._takes_interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def train(self, mode: bool = True) -> VisionFeatureExtractor:
        """Always eval: a trainer's `.train()` on a parent module must not switch on dropout in the frozen model."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Features (N, D, h, w) of images (N, 3, H, W) in [-1, 1]; videos (N, 3, T, H, W) give (N, D, T, h, w).

        `grid=(h, w)` resizes the images to (h * patch, w * patch) so the features come out on exactly that grid
        (LightningDiT's choice); by default the images are resized down to the nearest multiple of the patch size.
        """
        folded, unfold = fold_frames(images)
        if folded.shape[1] != self.mean.shape[1]:
            raise ValueError(f"The vision model takes {self.mean.shape[1]}-channel images, got {tuple(images.shape)}.")
        patch = self.patch_size
        if grid is None:
            grid = (folded.shape[-2] // patch, folded.shape[-1] // patch)
            if min(grid) < 1:
                raise ValueError(f"Images {tuple(images.shape)} are smaller than one {patch}px patch.")
        h, w = int(grid[0]), int(grid[1])
        pixels = resize_spatial(folded.float(), (h * patch, w * patch), antialias=True)
        pixels = ((pixels + 1) / 2 - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        kwargs = {"interpolate_pos_encoding": True} if self._takes_interpolate else {}
        tokens = self.model(pixel_values=pixels.to(dtype), **kwargs).last_hidden_state
        prefix = tokens.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"The vision model returned {tokens.shape[1]} tokens for a {h}x{w} patch grid.")
        features = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return unfold(features)


def _refuse(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"--align_to {path}: {problem}. It must be a local folder holding a transformers vision model saved with "
        "safetensors (config.json with a patch_size, model.safetensors, optionally preprocessor_config.json), e.g. "
        "DINOv2: on a machine with network run `huggingface-cli download facebook/dinov2-base --local-dir DIR` "
        "(or `Dinov2Model.from_pretrained(...).save_pretrained(DIR)`) and pass --align_to DIR."
    )


def load_vision_model(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> VisionFeatureExtractor:
    """Load a frozen vision model (e.g. DINOv2) from a LOCAL transformers folder as a `VisionFeatureExtractor`.

    Only local files (`local_files_only=True`) and only safetensors weights (`use_safetensors=True`) are read;
    the mean/std come from the folder's `preprocessor_config.json` (`image_mean`, `image_std`), ImageNet's when it
    has none. Raises ValueError saying what to put where for a missing folder, a folder without a transformers
    config or safetensors weights, or a model that is not a patch-based vision model taking `pixel_values`.
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path).expanduser()
    if not path.is_dir():
        raise _refuse(path, "no such folder")
    if not (path / "config.json").is_file():
        raise _refuse(path, "no config.json in it, so it is not a transformers model folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise _refuse(path, "no .safetensors weights in it (other weight formats are never loaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise _refuse(path, f"transformers cannot read its config.json ({error})") from error
    patch_size = getattr(config, "patch_size", None)
    if not isinstance(patch_size, int) or not hasattr(config, "hidden_size"):
        kind = getattr(config, "model_type", "unknown")
        raise _refuse(
            path, f"its model (model_type={kind!r}) is not a patch-based vision model (no integer patch_size)"
        )
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(dtype)
    parameters = inspect.signature(model.forward).parameters
    needs_text = "input_ids" in parameters and parameters["input_ids"].default is inspect.Parameter.empty
    if "pixel_values" not in parameters or needs_text:
        raise _refuse(path, f"{type(model).__name__} does not take images alone (pixel_values)")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    channels = int(getattr(config, "num_channels", 3))
    if len(mean) != channels or len(std) != channels:
        raise _refuse(path, f"its preprocessor mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    extractor = VisionFeatureExtractor(model, patch_size, mean, std, source=str(path))
    return extractor.to(device) if device is not None else extractor
