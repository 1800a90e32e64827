"""Training losses for the VAE: reconstruction, KL (plain, beta-VAE H and B), PatchGAN adversarial, LPIPS.

The formulas follow latent diffusion's `LPIPSWithDiscriminator` (CompVis/latent-diffusion,
`ldm/modules/losses/contperceptual.py`) so that its hyper-parameters keep their meaning here:

    rec    = sum_{C,H,W} |x - x_hat|            (or (x - x_hat)^2), averaged over the batch
    kl     = mean_batch 0.5 * sum_{C,H,W} (mu^2 + sigma^2 - 1 - log sigma^2)
    kl term:  plain  kl_weight * kl
              "H"    beta * kl_weight * kl                         (beta-VAE, Higgins et al. 2017)
              "B"    gamma * kl_weight * |kl - C(step)|,           (Burgess et al. 2018, capacity annealing)
                     C(step) = clamp(capacity_max / capacity_stop_steps * step, 0, capacity_max)
    d loss:   hinge    0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))
              vanilla  0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))
    g loss:   -mean D(x_hat),  weighted by adaptive_weight = clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4)
              * disc_weight, both gradients taken at the decoder's last layer.

LDM has a learned scalar `logvar` with nll = rec / exp(logvar) + logvar, but it is initialised to 0 and is never
passed to its optimizer (only the autoencoder's parameters are), so nll == rec throughout; we leave it out.

LDM adds the per-image LPIPS value to the per-pixel rec term *before* the sum over C, H, W, so its effective weight
there is `perceptual_weight * C * H * W` relative to `LPIPS()(x, x_hat).mean()`; a trainer reproducing LDM's balance
must scale accordingly.

LPIPS is implemented here rather than imported: the `lpips` package imports torchvision, which on CPU-only machines
pulls in a multi-GB CUDA build of torch. Weights come from one safetensors file made by `diffusers-vae convert-lpips`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .state_dicts import state_dict_differences

LPIPS_WEIGHTS_ENV = "DIFFUSERS_VAE_LPIPS_WEIGHTS"
DEFAULT_LPIPS_PATH = Path("~/.cache/diffusers_vae_ext/lpips_vgg.safetensors")

RECONSTRUCTION_KINDS = ("l1", "l2")
KL_MODES = ("plain", "H", "B")

# ----------------------------------------------------------------------------------------------------------------
# Reconstruction and KL
# ----------------------------------------------------------------------------------------------------------------


def reconstruction_loss(inputs: Tensor, reconstructions: Tensor, kind: str = "l1") -> Tensor:
    """Per-pixel L1 or L2 error summed over C, H, W and averaged over the batch (LDM's convention); a scalar."""
    if kind not in RECONSTRUCTION_KINDS:
        raise ValueError(
            f"Unknown reconstruction loss kind {kind!r}; choose one of {', '.join(RECONSTRUCTION_KINDS)}."
        )
    if inputs.shape != reconstructions.shape:
        # Broadcasting would silently give a wrong (and much larger) loss.
        raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ.")
    # A sum over C*H*W (about 2e5 terms at 256 px) in half precision loses most of its digits: sum in float32.
    diff = inputs.float() - reconstructions.float()
    per_pixel = diff.abs() if kind == "l1" else diff.square()
    return per_pixel.sum() / inputs.shape[0]


def kl_loss(posterior) -> Tensor:
    """Batch mean of `posterior.kl()` (diffusers' DiagonalGaussianDistribution sums over C, H, W); a scalar."""
    kl = posterior.kl()
    # A deterministic posterior returns a CPU tensor([0.]) whatever its device; keep the result on the model's device.
    return kl.to(posterior.mean.device).float().mean()


def kl_capacity(step: int, capacity_max: float, capacity_stop_steps: int) -> float:
    """The capacity C(step) of Burgess et al.: linear from 0 to `capacity_max` over `capacity_stop_steps` steps."""
    if capacity_stop_steps <= 0:
        return float(capacity_max)
    return float(min(max(capacity_max / capacity_stop_steps * step, 0.0), capacity_max))


def weighted_kl(
    kl: Tensor,
    step: int,
    mode: str = "plain",
    kl_weight: float = 1e-6,
    beta: float = 4.0,
    gamma: float = 1000.0,
    capacity_max: float = 25.0,
    capacity_stop_steps: int = 10000,
) -> Tensor:
    """The KL term of the loss: `plain`, beta-VAE `"H"` (beta * kl) or capacity-annealed `"B"` (gamma * |kl - C|).

    All three are multiplied by `kl_weight` so the LDM default (1e-6) sets the scale in every mode.
    """
    if mode == "plain":
        return kl_weight * kl
    if mode == "H":
        return beta * kl_weight * kl
    if mode == "B":
        return gamma * kl_weight * (kl - kl_capacity(step, capacity_max, capacity_stop_steps)).abs()
    raise ValueError(f"Unknown KL mode {mode!r}; choose one of {', '.join(KL_MODES)}.")


# ----------------------------------------------------------------------------------------------------------------
# Adversarial
# ----------------------------------------------------------------------------------------------------------------


class _PatchGAN(nn.Module):
    """taming's `NLayerDiscriminator` layout in 2-D or 3-D: `conv(c_in, c_out, stride, bias)` makes each
    convolution, `norm` is the BatchNorm class of the same dimensionality. Layers live in `main.N`."""

    def __init__(
        self,
        conv: Callable[[int, int, int, bool], nn.Module],
        norm: type[nn.Module],
        in_channels: int,
        base_channels: int,
        num_layers: int,
    ):
        super().__init__()
        layers: list[nn.Module] = [conv(in_channels, base_channels, 2, True), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                # No bias: BatchNorm's shift would cancel it.
                conv(base_channels * prev, base_channels * mult, 2, False),
                norm(base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [
            conv(base_channels * prev, base_channels * mult, 1, False),
            norm(base_channels * mult),
            nn.LeakyReLU(0.2, inplace=True),
            conv(base_channels * mult, 1, 1, True),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix's "normal" init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), all biases 0."""
        convs, norms = (nn.Conv2d, nn.Conv3d), (nn.BatchNorm2d, nn.BatchNorm3d)
        for module in self.modules():
            if isinstance(module, convs):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, norms):
                nn.init.normal_(module.weight, 1.0, 0.02)
            if isinstance(module, convs + norms) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits: (N, 1, h, w) for images, (N, 1, T, h, w) for clips."""
        return self.main(x)


def _conv2d(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)


def _conv3d(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv3d:
    # Kernel 3 in time, stride 1: each logit sees neighbouring frames and the clip keeps its length.
    return nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, stride, stride), padding=(1, 1, 1), bias=bias)


class PatchGANDiscriminator(_PatchGAN):
    """pix2pix / taming `NLayerDiscriminator`: a grid of real/fake logits, one per overlapping patch.

    Layer indices (`main.N`) match taming's, so its discriminator checkpoints load into this module.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__(_conv2d, nn.BatchNorm2d, in_channels, base_channels, num_layers)


class PatchGAN3DDiscriminator(_PatchGAN):
    """A PatchGAN over clips (N, C, T, H, W): `PatchGANDiscriminator`'s layout with 3-D convolutions that stride
    in space only (kernel 3 in time), so each logit judges a patch across neighbouring frames (temporal flicker).

    Same init as the 2-D one; used by the trainer's `--disc_3d` for video autoencoders.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__(_conv3d, nn.BatchNorm3d, in_channels, base_channels, num_layers)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator non-saturating GAN loss: 0.5 * (mean softplus(-real) + mean softplus(fake))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """The generator's adversarial loss, -mean(D(x_hat)) (LDM uses it with both discriminator losses)."""
    return -logits_fake.mean()


def adaptive_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float, max_weight: float = 1e4
) -> Tensor:
    """LDM's balance of the adversarial term: ||d nll/d W|| / (||d g/d W|| + 1e-4), clamped to [0, max_weight],
    detached, times `disc_weight`; W is the decoder's last layer weight (e.g. `vae.decoder.conv_out.weight`).

    The same balance weighs other auxiliary terms: VA-VAE's alignment loss takes it at the encoder's last layer
    with `max_weight=1e8` (see `diffusers_vae_ext.regularisers.vf_adaptive_weight`).
    The graph is retained so the caller can still backpropagate the total loss.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------

# torchvision's vgg16().features up to relu5_3 (index 29): channel counts, "M" for a 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (in `features`) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the outputs LPIPS compares.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _LinearHead(nn.Module):
    """lpips' NetLinLayer: a 1x1 conv from C channels to 1, stored at `model.1` as in lpips' weight files."""

    def __init__(self, channels: int):
        super().__init__()
        # lpips has Dropout at model.0; it has no weights and LPIPS only runs in eval mode, where it is the identity.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (Zhang et al. 2018), VGG16 variant, numerically the `lpips`
    package's `LPIPS(net="vgg", version="0.1")` without torchvision.

    A frozen metric: all parameters have `requires_grad=False` and the module stays in eval mode, but gradients
    flow to its inputs, so it can be used as a loss. Build it with `load_lpips()`; `LPIPS()` alone has random weights.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in _VGG16_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.ReLU()]
                in_channels = entry
        self.features = nn.Sequential(*layers)
        assert len(self.features) == LPIPS_TAPS[-1] + 1
        for k, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))
        # lpips' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones. Constants, not weights.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: a trainer's `model.train()` on a parent module must not change the metric."""
        return super().train(False)

    @property
    def heads(self) -> list[_LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(len(LPIPS_CHANNELS))]

    def _taps(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance per image, shape (N,), between images `x` and `y` in [-1, 1] of shape (N, C, H, W), C in {1, 3}."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        features = self.features_of(torch.cat([x, y]))
        return self.distance([f.chunk(2)[0] for f in features], [f.chunk(2)[1] for f in features])

    def features_of(self, x: Tensor) -> list[Tensor]:
        """The unit-normalised VGG features LPIPS compares, for images in [-1, 1] (N, 1 or 3, H, W).

        With `distance`, lets an evaluation compute a reference image's features once and compare several
        reconstructions against them; `forward(x, y)` equals `distance(features_of(x), features_of(y))`.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects (N, 1 or 3, H, W) images, got {tuple(x.shape)}.")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        dtype = self.features[0].weight.dtype
        x = (x.to(dtype) - self.shift.to(dtype)) / self.scale.to(dtype)
        return [_unit_normalize(tap) for tap in self._taps(x)]

    def distance(self, features_x: list[Tensor], features_y: list[Tensor]) -> Tensor:
        """Distance per image (N,) between two lists of `features_of` outputs."""
        distance = 0
        for tap_x, tap_y, head in zip(features_x, features_y, self.heads):
            distance = distance + head((tap_x - tap_y).square()).mean(dim=(1, 2, 3))
        return distance


def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """lpips' normalize_tensor: divide each feature vector by its L2 norm over channels (eps added to the norm)."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


def _missing_weights_message(looked_at: list[str]) -> str:
    default = DEFAULT_LPIPS_PATH
    return (
        f"LPIPS weights not found (looked at: {'; '.join(looked_at)}). The trainer never trains silently without "
        "its perceptual loss: provide the weights, or set the perceptual (LPIPS) weight to 0 explicitly.\n"
        "To make the weights file once (no torchvision or lpips install needed), get two files:\n"
        "  1. torchvision's ImageNet VGG16 weights `vgg16-397923af.pth` (often already in "
        "~/.cache/torch/hub/checkpoints/; or https://download.pytorch.org/models/vgg16-397923af.pth)\n"
        "  2. the lpips package's linear heads `lpips/weights/v0.1/vgg.pth` (inside the installed `lpips` package, "
        "or github.com/richzhang/PerceptualSimilarity)\n"
        "then run:\n"
        f"  diffusers-vae convert-lpips --vgg vgg16-397923af.pth --lin vgg.pth --output {default}\n"
        f"and either keep that default location or point {LPIPS_WEIGHTS_ENV} at the file."
    )


def resolve_lpips_weights(weights: str | os.PathLike | None = None) -> Path:
    """Where the LPIPS weights are: `weights`, else ${LPIPS_WEIGHTS_ENV}, else the default cache file."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message([str(path)]))
        return path
    looked_at = []
    from_env = os.environ.get(LPIPS_WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if path.is_file():
            return path
        looked_at.append(f"${LPIPS_WEIGHTS_ENV}={path} (no such file)")
    else:
        looked_at.append(f"${LPIPS_WEIGHTS_ENV} (not set)")
    path = DEFAULT_LPIPS_PATH.expanduser()
    if path.is_file():
        return path
    looked_at.append(str(path))
    raise FileNotFoundError(_missing_weights_message(looked_at))


def load_lpips(weights: str | os.PathLike | None = None) -> LPIPS:
    """An `LPIPS` with weights from one safetensors file (see `resolve_lpips_weights` for where it is looked for).

    Raises FileNotFoundError (saying how to make the file) when none is found, ValueError for a non-safetensors
    file or one whose tensors do not match the model.
    """
    from safetensors.torch import load_file

    if weights is not None and Path(weights).suffix != ".safetensors":
        raise ValueError(
            f"{weights} is not a .safetensors file; LPIPS weights are only loaded from safetensors. Convert the "
            "torchvision VGG16 and lpips vgg.pth files once with `diffusers-vae convert-lpips --vgg ... --lin ... "
            "--output lpips_vgg.safetensors`."
        )
    path = resolve_lpips_weights(weights)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; make one with `diffusers-vae convert-lpips`.")
    state = load_file(str(path))
    model = LPIPS()
    _check_state_dict(state, model.state_dict(), str(path), "Make the file with `diffusers-vae convert-lpips`.")
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval()


def _check_state_dict(state: dict[str, Tensor], expected: dict[str, Tensor], source: str, hint: str) -> None:
    missing, unexpected, wrong_shape = state_dict_differences(state, expected)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not hold LPIPS VGG16 weights: missing keys {missing}, unexpected keys {unexpected}, "
            f"wrong shapes {wrong_shape}. {hint}"
        )


def convert_lpips_weights(
    vgg_path: str | os.PathLike, lin_path: str | os.PathLike, output_path: str | os.PathLike
) -> Path:
    """Combine torchvision's `vgg16-397923af.pth` and lpips' `weights/v0.1/vgg.pth` into one safetensors file.

    Keeps the VGG `features.*` tensors up to relu5_3 (index 29) and the `lin{k}.model.1.weight` heads, checks
    them against `LPIPS`'s shapes and writes `output_path` atomically. Returns the written path.
    """
    from safetensors.torch import save_file

    vgg_path, lin_path = Path(vgg_path).expanduser(), Path(lin_path).expanduser()
    output_path = Path(output_path).expanduser()
    for path in (vgg_path, lin_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist.")
    # An explicit user action on trusted files; weights_only=True still refuses anything but tensors and containers.
    vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    vgg_state = vgg_state.get("state_dict", vgg_state)

    tensors: dict[str, Tensor] = {}
    for key, value in vgg_state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) <= LPIPS_TAPS[-1]:
            tensors[key] = value
    for key, value in lin_state.items():
        # lpips files may also hold `lins.{k}...` aliases of the same tensors; keep the canonical `lin{k}` keys.
        if re.fullmatch(r"lin\d+\.model\.1\.weight", key):
            tensors[key] = value

    with torch.device("meta"):
        expected = LPIPS().state_dict()
    hint = "--vgg takes torchvision's vgg16-397923af.pth, --lin the lpips package's weights/v0.1/vgg.pth."
    _check_state_dict(tensors, expected, f"{vgg_path} + {lin_path}", hint)
    tensors = {key: value.detach().to(torch.float32).contiguous() for key, value in tensors.items()}

    output_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        metadata = {
            "format": "pt",
            "model": "lpips-vgg16-v0.1",
            "vgg_source": vgg_path.name,
            "lin_source": lin_path.name,
        }
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, output_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return output_path
