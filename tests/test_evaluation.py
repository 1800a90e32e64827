"""`diffusers-vae eval`: Frechet distance against closed forms and scipy, the FID Inception's weight layout and
loading path, the per-image rows against direct computations, crash safety, the report files and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from autoencoder_configs import build_tiny, own_reconstruction
from conftest import make_vae
from PIL import Image
from safetensors.torch import save_file

from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.cli import main
from diffusers_vae_ext.data import load_image_rgb, pil_to_tensor, resize_and_crop, write_sample_photos
from diffusers_vae_ext.evaluation import EvalVAE, evaluate, write_report
from diffusers_vae_ext.evaluation.fid import feature_statistics, frechet_distance, frechet_distance_of_features
from diffusers_vae_ext.evaluation.inception import FIDInceptionV3, load_inception
from diffusers_vae_ext.evaluation.inputs import parse_vae_spec
from diffusers_vae_ext.evaluation.patches import worst_patch
from diffusers_vae_ext.evaluation.results import summarize_metric
from diffusers_vae_ext.losses import LPIPS
from diffusers_vae_ext.metrics import psnr, ssim

RESOLUTION = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder)
    (folder / "broken.png").write_bytes(b"not a png")  # must be skipped with its reason, not crash the run
    return folder


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Random weights in the exact layout of pytorch-fid's .pth (torch.save of a state dict), and its conversion."""
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bn.bias")):
                tensor.normal_(0, 0.1)
    pth = folder / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), pth)
    output = folder / "fid_inception.safetensors"
    assert main(["convert-inception", "--input", str(pth), "--output", str(output)]) == 0
    return model, pth, output


# ---------------------------------------------------------------------------------------------------------- FID


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    # Same covariance, shifted mean: only the mean term remains; identical Gaussians: 0.
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-9
    # Scaled covariance s^2 S: tr(S) (1 - s)^2.
    assert frechet_distance(mu1, sigma, mu1, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-9)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu1, sigma, mu2[:3], sigma)


def test_frechet_distance_matches_scipy_sqrtm_also_for_singular_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    for samples, dims in ((200, 16), (10, 32)):  # full rank, then fewer samples than dimensions (singular)
        x = rng.normal(size=(samples, dims))
        y = rng.normal(size=(samples, dims)) * 1.3 + 0.2
        mu1, s1 = feature_statistics(x)
        mu2, s2 = feature_statistics(y)
        covmean = scipy_linalg.sqrtm(s1 @ s2)
        covmean = covmean.real if np.iscomplexobj(covmean) else covmean
        reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        ours = frechet_distance_of_features(x, y)  # the low-rank path for (10, 32)
        assert ours == pytest.approx(reference, rel=1e-6, abs=1e-6)
        # The covariance path: its square roots of round-off eigenvalues (~1e-16 -> 1e-8) cost it a few digits.
        assert ours == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
        assert ours >= 0


def test_inception_has_the_fid_weight_layout():
    model = FIDInceptionV3()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # torchvision's Inception3 with 1008 classes and no aux head (what pytorch-fid's file holds).
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert len(state) == 472
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_inception_loads_from_the_converted_file(inception_files):
    original, pth, converted = inception_files
    loaded = load_inception(converted)
    for key, value in original.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    features = loaded(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    torch.testing.assert_close(features, original(images))
    # Pickles are never loaded at run time; a file of the wrong network is refused with what is wrong.
    with pytest.raises(ValueError, match="convert-inception"):
        load_inception(pth)
    bad = converted.with_name("bad.safetensors")
    save_file({"fc.weight": torch.zeros(1008, 2048)}, str(bad))
    with pytest.raises(ValueError, match="missing keys"):
        load_inception(bad)
    with pytest.raises(FileNotFoundError, match="convert-inception"):
        load_inception(converted.with_name("absent.safetensors"))


# ---------------------------------------------------------------------------------------------------------- runner


def test_helpers():
    assert parse_vae_spec("base=/tmp/x") == ("base", "/tmp/x")
    assert parse_vae_spec("/tmp/no_label") == (None, "/tmp/no_label")
    error = torch.zeros(32, 48)
    error[20:28, 30:38] = 1.0
    top, left = worst_patch(error, 8)
    assert (top, left) == (20, 28) or error[top : top + 8, left : left + 8].mean() >= 0.75
    values = [1.0, 2.0, 4.0, 7.0]
    summary = summarize_metric(values + [None, float("nan")])
    scipy_stats = pytest.importorskip("scipy.stats")
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert summary.count == 4 and summary.mean == pytest.approx(3.5)
    assert summary.ci95 == pytest.approx((high - low) / 2)


def reference_crops(photo_dir, names):
    return torch.stack(
        [pil_to_tensor(resize_and_crop(load_image_rgb(photo_dir / n), (RESOLUTION, RESOLUTION))[0]) for n in names]
    )


def test_rows_match_direct_computation_and_report_is_written(tmp_path, photo_dir, inception_files):
    torch.manual_seed(0)
    lpips = LPIPS()
    for head in lpips.heads:
        torch.nn.init.uniform_(head.model[1].weight, 0.0, 0.1)
    lpips_file = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(lpips_file))
    base, other = make_vae(0), make_vae(1, scaling_factor=0.5)
    out = tmp_path / "eval"
    result = evaluate(
        [EvalVAE("base", as_autoencoder(base)), EvalVAE("other v2", as_autoencoder(other))],
        out,
        train_data_dir=photo_dir,
        resolution=RESOLUTION,
        num_images=3,  # readable ones: broken.png (second in order) is skipped and not counted
        batch_size=2,  # two batches: 2 + 1
        lpips_weights=lpips_file,
        inception_weights=inception_files[2],
        show_progress=False,
    )
    names = sorted(p.name for p in photo_dir.glob("*.png") if p.name != "broken.png")[:3]
    assert result.skipped == [{"image": "broken.png", "reason": "not an image file PIL can read"}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(names) and {r["image"] for r in rows} == set(names)

    pixels = reference_crops(photo_dir, names)
    for label, vae in (("base", base), ("other v2", other)):
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        mine = sorted((r for r in rows if r["vae"] == label), key=lambda r: r["image"])
        torch.testing.assert_close(torch.tensor([r["psnr"] for r in mine]), psnr(pixels, reconstruction).float())
        torch.testing.assert_close(torch.tensor([r["ssim"] for r in mine]), ssim(pixels, reconstruction).float())
        torch.testing.assert_close(torch.tensor([r["kl"] for r in mine]), posterior.kl(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            torch.tensor([r["lpips"] for r in mine]), lpips(pixels, reconstruction), rtol=1e-4, atol=1e-6
        )
        channel_means = torch.tensor([[r[f"latent_mean_{c}"] for c in range(4)] for r in mine])
        torch.testing.assert_close(channel_means, posterior.mean.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
        vae_result = next(v for v in result.vaes if v.label == label)
        assert vae_result.metrics["psnr"].mean == pytest.approx(float(psnr(pixels, reconstruction).mean()), rel=1e-6)
        if label == "base":  # rFID: the Frechet distance of the Inception features of crops and reconstructions
            model = inception_files[0]
            expected = frechet_distance_of_features(
                model(pixels).double().numpy(), model(reconstruction).double().numpy()
            )
            assert vae_result.rfid == pytest.approx(expected, rel=1e-3)
        assert vae_result.rfid is not None and vae_result.rfid > 0
        # The suggested factor is 1 / std of the latents; the current config scales them to std sf * std.
        latent = vae_result.latent
        assert latent["suggested_scaling_factor"] == pytest.approx(1 / latent["std"])
        assert latent["scaled_std"] == pytest.approx(vae.config.scaling_factor * latent["std"], rel=1e-6)

    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("image,vae,index,psnr,ssim,lpips,kl,latent_mean_0")
    assert len(csv_lines) == 1 + len(rows)
    paths = write_report(result)
    page = paths["html"].read_text()
    for name in names:
        assert name in page
    assert 'id="summary"' in page and 'id="images"' in page and "other v2" in page
    for patch in result.patches:
        for path in [patch["original"]] + [v[k] for v in patch["vaes"].values() for k in ("crop", "error")]:
            assert Image.open(out / path).size == (patch["size"], patch["size"])
    markdown = paths["markdown"].read_text()
    assert "| base |" in markdown and "| other v2 |" in markdown and "LPIPS" in markdown and "rFID" in markdown


def test_a_crash_keeps_the_rows_done(tmp_path, photo_dir):
    vae = make_vae(0)
    adapter = as_autoencoder(vae)
    calls = {"n": 0}
    decode = adapter.decode

    def failing_decode(latents):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return decode(latents)

    adapter.decode = failing_decode
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate([EvalVAE("base", adapter)], tmp_path, train_data_dir=photo_dir, resolution=RESOLUTION,
                 batch_size=2, show_progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["psnr"]) for r in rows)
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3


def test_bad_settings_fail_clearly(tmp_path):
    vae = make_vae(0)  # factor 4
    with pytest.raises(ValueError, match="not divisible"):
        evaluate([EvalVAE("a", as_autoencoder(vae))], tmp_path, resolution=30, show_progress=False)
    with pytest.raises(ValueError, match="unique"):
        evaluate([EvalVAE("a", as_autoencoder(vae)), EvalVAE("a", as_autoencoder(vae))], tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="input channels"):
        gray = make_vae(1, in_channels=1, out_channels=1)
        evaluate(
            [EvalVAE("a", as_autoencoder(vae)), EvalVAE("b", as_autoencoder(gray))], tmp_path, show_progress=False
        )


def test_cli_eval_with_fp16_check(tmp_path, photo_dir, capsys):
    make_vae(0).save_pretrained(tmp_path / "base")
    make_vae(2).save_pretrained(tmp_path / "tuned")
    out = tmp_path / "report"
    argv = ["eval", "--vae", str(tmp_path / "base"), "--vae", f"tuned={tmp_path / 'tuned'}",
            "--train_data_dir", str(photo_dir), "--output_dir", str(out), "--resolution", str(RESOLUTION),
            "--num_images", "3", "--check_fp16", "--fp16_images", "2", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| tuned |" in printed
    assert "base float16: safe" in printed and "tuned bfloat16: safe" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["num_images"] == 3 and summary["settings"]["fp16_images"] == 2
    assert [r["dtype"] for r in summary["vaes"][0]["half_precision"]] == ["float16", "bfloat16"]
    for name in ("report.html", "report.md", "metrics.csv", "metrics.jsonl"):
        assert (out / name).is_file()
    assert main(["eval", "--vae", str(tmp_path / "absent"), "--output_dir", str(out)]) == 2


def test_cli_eval_mixes_classes_by_class_name(tmp_path, photo_dir):
    """Our AutoencoderKL, a deterministic AutoencoderTiny and a 5-D AutoencoderKLWan (images as one-frame clips),
    loaded from folders by `_class_name`, in one report; each row equals the class's own reconstruction."""
    kl, tiny, wan = make_vae(0), build_tiny("AutoencoderTiny"), build_tiny("AutoencoderKLWan")
    for name, model in (("kl", kl), ("tiny", tiny), ("wan", wan)):
        model.save_pretrained(tmp_path / name)
    out = tmp_path / "report"
    argv = ["eval", "--vae", str(tmp_path / "kl"), "--vae", f"taesd={tmp_path / 'tiny'}", "--vae",
            f"wan={tmp_path / 'wan'}", "--train_data_dir", str(photo_dir), "--output_dir", str(out),
            "--resolution", str(RESOLUTION), "--num_images", "3", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(v["label"], v["class_name"]) for v in summary["vaes"]] == [
        ("kl", "AutoencoderKL"), ("taesd", "AutoencoderTiny"), ("wan", "AutoencoderKLWan")
    ]  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sum(r["vae"] == label for r in rows) for label in ("kl", "taesd", "wan")] == [3, 3, 3]
    names = sorted(p.name for p in photo_dir.glob("*.png") if p.name != "broken.png")[:3]
    pixels = reference_crops(photo_dir, names)
    with torch.no_grad():
        expected = {
            "kl": own_reconstruction(kl, pixels),
            "taesd": own_reconstruction(tiny, pixels),
            "wan": own_reconstruction(wan, pixels.unsqueeze(2)).squeeze(2),
        }
    for label, reconstruction in expected.items():
        mine = sorted((r for r in rows if r["vae"] == label), key=lambda r: r["image"])
        torch.testing.assert_close(
            torch.tensor([r["psnr"] for r in mine]), psnr(pixels, reconstruction.clamp(-1, 1)).float(), rtol=1e-4,
            atol=1e-4,
        )  # fmt: skip
        # No posterior, no KL: missing (null / empty), never 0.
        assert all((r["kl"] is None) == (label == "taesd") for r in mine)
    csv_rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert all(",," in line for line in csv_rows if line.split(",")[1] == "taesd")
    lines = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    table = {line.split("|")[1].strip(): line for line in lines}
    assert set(table) >= {"kl", "taesd", "wan"}
    kl_column = [h.strip() for h in table["VAE"].split("|")].index("KL (nats / image)")
    assert table["taesd"].split("|")[kl_column].strip() == "n/a"
    assert float(table["kl"].split("|")[kl_column].split("±")[0]) > 0
    assert summary["vaes"][1]["metrics"]["kl"] is None and summary["vaes"][2]["latent"]["convention"] == "per_channel"
    page = (out / "report.html").read_text()
    assert "AutoencoderTiny" in page and "AutoencoderKLWan" in page


def test_a_class_that_cannot_take_one_frame_is_refused(tmp_path):
    adapter = as_autoencoder(build_tiny("AutoencoderKLWan"))
    adapter.valid_num_frames = lambda num_frames: num_frames > 1  # as a class with clips of 4k + 1, k >= 1 would
    with pytest.raises(ValueError, match="cannot evaluate single images"):
        evaluate([EvalVAE("clips only", adapter)], tmp_path, resolution=RESOLUTION, show_progress=False)


def test_webdataset_shards_give_the_same_rows_as_the_folder(tmp_path, photo_dir):
    """Any input the latent cache takes: webdataset tars (no count up front) read through the cache's sources."""
    import tarfile

    names = sorted(p.name for p in photo_dir.glob("*.png") if p.name != "broken.png")[:3]
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for name in names:
            tar.add(photo_dir / name, arcname=name)  # webdataset key = the name without its extension
    vae = as_autoencoder(make_vae(0))
    options = dict(resolution=RESOLUTION, num_images=3, save_patches=False, show_progress=False)
    from_tars = evaluate([EvalVAE("a", vae)], tmp_path / "tars", train_data_dir=shards, **options)
    from_folder = evaluate([EvalVAE("a", vae)], tmp_path / "folder", train_data_dir=photo_dir, **options)
    assert [r["image"] for r in from_tars.rows] == [f"000000.tar/{Path(n).stem}" for n in names]
    assert [r["psnr"] for r in from_tars.rows] == [r["psnr"] for r in from_folder.rows]
