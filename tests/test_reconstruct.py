"""`reconstruct_images` and `diffusers-vae reconstruct` on real photos with odd sizes and broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_vae
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffusers_vae_ext.cli import main
from diffusers_vae_ext.data import pil_to_tensor, tensor_to_pil, to_model_channels
from diffusers_vae_ext.reconstruct import fit_to_factor, reconstruct_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def photo_files(tmp_path, sample_images):
    """Two real photos (101x77: not divisible by the factor 4; 64x48: divisible) and two broken files."""
    folder = tmp_path / "images"
    folder.mkdir()
    sample_images["astronaut"].resize((101, 77), Image.Resampling.BICUBIC).save(folder / "astronaut.png")
    sample_images["coffee"].resize((64, 48), Image.Resampling.BICUBIC).save(folder / "coffee.jpg", quality=95)
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    full = (folder / "astronaut.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    return {p.stem: p for p in folder.iterdir()}


def halves(png_path) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(Image.open(png_path))
    width = array.shape[1] // 2
    return array[:, :width], array[:, width:]


def reference_reconstruction(vae, image: torch.Tensor) -> torch.Tensor:
    """The expected reconstruction of an image (C, H, W), computed without reconstruct.py: numpy's mirror padding
    to the next multiple of 4, the posterior mean through the VAE, the padding cut off again."""
    height, width = image.shape[-2:]
    padded = np.pad(image.numpy(), ((0, 0), (0, -height % 4), (0, -width % 4)), mode="reflect")
    with torch.no_grad():
        decoded = vae(torch.from_numpy(padded).unsqueeze(0)).sample[0]
    return decoded[:, :height, :width].clamp(-1, 1)


def test_pad_policy_reconstructs_odd_sizes_and_skips_broken_files(photo_files, tmp_path):
    vae = make_vae()
    paths = [photo_files[name] for name in ("astronaut", "corrupt", "coffee", "truncated")]
    results = reconstruct_images(vae, paths, output_dir=tmp_path / "out", progress=False)

    assert [r.ok for r in results] == [True, False, True, False]
    assert "not an image" in results[1].error
    assert "truncated" in results[3].error or "corrupt" in results[3].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "astronaut_reconstruction.png",
        "coffee_reconstruction.png",
    ]

    astronaut = results[0]
    assert (astronaut.width, astronaut.height) == (101, 77)
    assert (astronaut.processed_width, astronaut.processed_height, astronaut.fit) == (104, 80, "pad reflect")
    original = pil_to_tensor(Image.open(photo_files["astronaut"]))
    expected = reference_reconstruction(vae, original)
    left, right = halves(astronaut.output_path)
    assert left.shape == right.shape == (77, 101, 3)  # the padding is not in the PNG
    np.testing.assert_array_equal(left, np.asarray(Image.open(photo_files["astronaut"])))
    assert_same_uint8(right, tensor_to_pil(expected))

    # Metrics are over the original pixels only, as scikit-image computes them.
    ref01, rec01 = ((original.double() + 1) / 2).numpy(), ((expected.double() + 1) / 2).numpy()
    assert astronaut.psnr == pytest.approx(peak_signal_noise_ratio(ref01, rec01, data_range=1), abs=1e-4)
    assert astronaut.ssim == pytest.approx(structural_similarity(ref01, rec01, data_range=1, channel_axis=0), abs=1e-4)

    coffee = results[2]
    assert (coffee.processed_width, coffee.processed_height) == (coffee.width, coffee.height) == (64, 48)
    assert coffee.fit == "none"


def assert_same_uint8(image: np.ndarray, expected: Image.Image) -> None:
    """Equal up to rounding: a float a hair from a .5 boundary may round either way (a few pixels, by 1)."""
    difference = np.abs(image.astype(np.int16) - np.asarray(expected).astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_crop_policy_centre_crops_to_the_factor(photo_files, tmp_path):
    vae = make_vae()
    (result,) = reconstruct_images(
        vae, [photo_files["astronaut"]], output_dir=tmp_path, size_policy="crop", progress=False
    )
    assert (result.processed_width, result.processed_height, result.fit) == (100, 76, "crop")
    left, right = halves(result.output_path)
    assert left.shape == right.shape == (76, 100, 3)
    # 101 -> 100 drops no column on the left (odd remainder goes right), 77 -> 76 likewise on top.
    np.testing.assert_array_equal(left, np.asarray(Image.open(photo_files["astronaut"]))[0:76, 0:100])
    with torch.no_grad():
        expected = vae(pil_to_tensor(Image.fromarray(left)).unsqueeze(0)).sample[0].clamp(-1, 1)
    assert_same_uint8(right, tensor_to_pil(expected))


def test_fit_to_factor_pads_with_edge_values_when_too_small_to_mirror():
    image = torch.arange(6, dtype=torch.float32).view(1, 2, 3)
    padded, (rows, cols), how = fit_to_factor(image, 4, "pad")
    assert how == "pad replicate" and padded.shape == (1, 4, 4)
    assert torch.equal(padded[:, rows, cols], image)
    assert torch.equal(padded[:, 3, :3], image[:, 1])  # the last row repeated
    with pytest.raises(ValueError, match="smaller than the VAE's factor"):
        fit_to_factor(image, 4, "crop")
    with pytest.raises(ValueError, match="size_policy"):
        fit_to_factor(image, 4, "stretch")


def test_sample_posterior_is_seeded(photo_files):
    vae = make_vae()
    path = [photo_files["coffee"]]

    def run(**kwargs):
        return reconstruct_images(vae, path, sample_posterior=True, progress=False, **kwargs)[0].psnr

    mean_psnr = reconstruct_images(vae, path, progress=False)[0].psnr
    assert run(seed=1) == run(seed=1)
    assert len({run(seed=1), run(seed=2), mean_psnr}) == 3


def test_one_channel_vae_is_measured_on_luminance(photo_files, tmp_path):
    vae = make_vae(in_channels=1, out_channels=1)
    (result,) = reconstruct_images(vae, [photo_files["coffee"]], output_dir=tmp_path, progress=False)
    left, right = halves(result.output_path)
    assert left.ndim == 2  # grayscale PNG
    luminance = to_model_channels(pil_to_tensor(Image.open(photo_files["coffee"])), 1)
    np.testing.assert_array_equal(left, np.asarray(tensor_to_pil(luminance)))
    assert result.psnr == pytest.approx(
        peak_signal_noise_ratio(
            ((luminance + 1) / 2).double().numpy(),
            ((reference_reconstruction(vae, luminance) + 1) / 2).double().numpy(),
            data_range=1,
        ),
        abs=1e-4,
    )


def test_cli_prints_table_and_json_and_fails_when_nothing_was_read(photo_files, tmp_path, capsys):
    vae_dir = tmp_path / "pipeline"
    make_vae().save_pretrained(vae_dir / "vae")
    folder = photo_files["astronaut"].parent
    args = ["reconstruct", str(folder), "--vae", str(vae_dir), "--subfolder", "vae", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("size policy: pad")
    assert any(line.startswith("astronaut.png") and "101x77" in line and "104x80" in line for line in out)
    assert any(line.startswith("average (2)") for line in out)
    assert any(line.startswith("skipped") and "corrupt.png" in line for line in out)
    report = json.loads(out[-1])
    assert (report["num_images"], report["num_skipped"], report["size_policy"]) == (2, 2, "pad")
    psnrs = [image["psnr"] for image in report["images"] if image["error"] is None]
    assert report["mean_psnr"] == pytest.approx(sum(psnrs) / 2)
    assert (tmp_path / "astronaut_reconstruction.png").is_file()

    args = ["reconstruct", str(photo_files["corrupt"]), "--vae", str(vae_dir / "vae"), "--output-dir", str(tmp_path)]
    assert main([*args, "--size-policy", "crop"]) == 1
    captured = capsys.readouterr()
    assert "No image could be reconstructed" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["size_policy"] == "crop"
