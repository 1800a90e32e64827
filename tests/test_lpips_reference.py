"""Our torchvision-free LPIPS against the `lpips` package itself, built from the same VGG16 weights (random: the
formula is what is compared) and lpips' own shipped linear heads (`weights/v0.1/vgg.pth`), on real photos.

`lpips` imports torchvision, which cannot be installed here (it pulls a CUDA build of torch); a minimal stand-in
module whose `models.vgg16()` returns torchvision's VGG16 layout (`features`, 31 layers) lets lpips' own code run.
The reference is installed with `pip install --no-deps lpips` (.ci/run does).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import photo_batch
from torch import nn

from diffusers_vae_ext.losses import convert_lpips_weights, load_lpips

# torchvision's vgg16 "D" configuration; `features` ends with a max-pool at index 30.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> nn.Sequential:
    layers, channels = [], 3
    for entry in VGG16_CFG:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = entry
    return nn.Sequential(*layers)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reference_lpips(monkeypatch):
    """The real `lpips` package, imported against a stand-in torchvision; skipped when lpips is not installed."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the reference `lpips` package is not installed (pip install --no-deps lpips; .ci/run does)")
    torch.manual_seed(0)
    features = vgg16_features()
    with torch.no_grad():
        for module in features:
            if isinstance(module, nn.Conv2d):
                # He-style scale keeps activations alive through 13 random layers.
                module.weight.normal_(0, (2.0 / (module.in_channels * 9)) ** 0.5)
                module.bias.normal_(0, 0.01)
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}

    def vgg16(pretrained=False, **kwargs):
        model = types.SimpleNamespace(features=vgg16_features())
        model.features.load_state_dict(features.state_dict())
        return model

    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.ModuleType("torchvision.models")
    torchvision.models.vgg16 = vgg16
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", torchvision.models)
    # A fresh import against the stand-in, undone afterwards (monkeypatch deletes the keys that were absent).
    for name in ("lpips", "lpips.lpips", "lpips.pretrained_networks", "lpips.trainer"):
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    lpips = importlib.import_module("lpips")
    model = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    return model, state, lin_path


def test_lpips_matches_the_reference_package(reference_lpips, tmp_path):
    reference, vgg_state, lin_path = reference_lpips
    # Our loading path end to end: torchvision-style VGG file + lpips' vgg.pth -> safetensors -> load_lpips.
    vgg_path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg_state, vgg_path)
    ours = load_lpips(convert_lpips_weights(vgg_path, lin_path, tmp_path / "lpips_vgg.safetensors"))

    photos = photo_batch(64, ("astronaut", "chelsea", "coffee", "rocket"))
    others = photo_batch(64, ("chelsea", "coffee", "rocket", "astronaut"))
    noisy = (photos + 0.1 * torch.randn_like(photos)).clamp(-1, 1)
    with torch.no_grad():
        for x, y in ((photos, others), (photos, noisy)):
            expected = reference(x, y).flatten()
            got = ours(x, y)
            assert expected.abs().min() > 1e-3  # a real distance, not 0 == 0
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert ours(photos, photos).abs().max() < 1e-6
