"""Where users pick a precision: the CLI's `--dtype` (every spelling, `auto`), `diffusers-vae info`, and the trainer's
`--mixed_precision auto` default (bf16 autocast where bf16 is native, fp32 elsewhere, weights fp32 either way)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_vae
from PIL import Image

from diffusers_vae_ext import AutoencoderKL, hardware, training
from diffusers_vae_ext.cli import main
from diffusers_vae_ext.hardware import CPUInfo

NATIVE_BF16 = CPUInfo("AMD EPYC 9654", "AVX512", 2, avx512_bf16=True, avx512=True, avx2=True)
NO_BF16 = CPUInfo("Intel Xeon E5-2680 v3", "AVX2", 2, avx2=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vae_folder(tmp_path):
    make_vae(seed=21).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.fixture
def photo_folder(tmp_path, sample_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea"):
        sample_images[name].resize((48, 48), Image.Resampling.BICUBIC).save(folder / f"{name}.png")
    return folder


def fake_cpu(monkeypatch, cpu: CPUInfo) -> None:
    monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_reconstruct_dtype_bf16_matches_fp32_and_says_which_path(vae_folder, photo_folder, tmp_path, capsys):
    psnrs = {}
    for dtype in ("float32", "bf16"):
        out = tmp_path / dtype
        assert main(["reconstruct", str(photo_folder), "--vae", str(vae_folder), "--output-dir", str(out),
                     "--dtype", dtype]) == 0  # fmt: skip
        captured = capsys.readouterr()
        report = json.loads(captured.out.strip().splitlines()[-1])
        psnrs[dtype] = [row["psnr"] for row in report["images"]]
        assert len(list(out.glob("*.png"))) == 2
    assert "running bfloat16 on cpu" in captured.err
    assert psnrs["bf16"] == pytest.approx(psnrs["float32"], abs=0.5)


def test_reconstruct_dtype_reaches_other_autoencoder_classes(tmp_path, photo_folder, capsys):
    """Non-KL classes load through the adapter in the requested dtype: AutoencoderTiny in bf16 reconstructs like
    the same weights in fp32 (not a silent fp32 run: the loaded model's dtype is checked)."""
    from autoencoder_configs import build_tiny

    from diffusers_vae_ext import autoencoders

    build_tiny("AutoencoderTiny", seed=3).save_pretrained(tmp_path / "taesd")
    loaded = []
    load = autoencoders.load_autoencoder

    def recording_load(*args, **kwargs):
        adapter = load(*args, **kwargs)
        loaded.append(adapter.dtype)
        return adapter

    psnrs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoencoders, "load_autoencoder", recording_load)
        for dtype in ("fp32", "bfloat16"):
            argv = ["reconstruct", str(photo_folder), "--vae", str(tmp_path / "taesd"), "--output-dir",
                    str(tmp_path / dtype), "--dtype", dtype]  # fmt: skip
            assert main(argv) == 0
            report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            psnrs[dtype] = [row["psnr"] for row in report["images"]]
    assert loaded == [torch.float32, torch.bfloat16]
    assert psnrs["bfloat16"] == pytest.approx(psnrs["fp32"], abs=0.5)


@pytest.mark.parametrize(
    "command, given, expected",
    [("cache", "bfloat16", "bf16"), ("cache", "fp16", "fp16"), ("stats", "bf16", "bfloat16"),
     ("stats", "fp32", "float32")],
)  # fmt: skip
def test_cache_and_stats_accept_both_spellings(monkeypatch, tmp_path, command, given, expected):
    seen = {}
    if command == "cache":
        import diffusers_vae_ext.cache as module

        monkeypatch.setattr(module, "precompute_latents", lambda *a, **kw: seen.update(kw))
        argv = ["cache", "--vae", "v", "--train_data_dir", "d", "--output_dir", str(tmp_path), "--dtype", given]
    else:
        import diffusers_vae_ext.stats as module

        monkeypatch.setattr(module, "run_stats", lambda *a, **kw: seen.update(kw))
        argv = ["stats", "--vae", "v", "--train_data_dir", "d", "--dtype", given]
    assert main(argv) == 0
    # Each function gets its own spelling: the cache "bf16", the statistics "bfloat16".
    assert seen["dtype"] == expected


def test_dtype_auto_follows_the_cpu(monkeypatch, tmp_path):
    import diffusers_vae_ext.cache as module

    seen = {}
    monkeypatch.setattr(module, "precompute_latents", lambda *a, **kw: seen.update(kw))
    argv = ["cache", "--vae", "v", "--train_data_dir", "d", "--output_dir", str(tmp_path), "--dtype", "auto"]
    fake_cpu(monkeypatch, NATIVE_BF16)
    assert main(argv) == 0 and seen["dtype"] == "bf16"
    fake_cpu(monkeypatch, NO_BF16)
    assert main(argv) == 0 and seen["dtype"] == "fp32"


def test_bad_dtype_is_refused_with_the_accepted_spellings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "x.png", "--vae", "v", "--output-dir", "o", "--dtype", "bfloat"])
    assert exit_info.value.code == 2
    assert "fp32/float32, bf16/bfloat16, fp16/float16 or auto" in capsys.readouterr().err


def test_info_shows_the_execution_path(vae_folder, capsys, monkeypatch):
    fake_cpu(monkeypatch, NATIVE_BF16)
    assert main(["info"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("execution path: cpu AMD EPYC 9654") and "training autocast bf16" in line
    assert main(["info", str(vae_folder)]) == 0
    assert "execution path:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize(
    "cpu, env, expected",
    [(NATIVE_BF16, None, "bf16"), (NO_BF16, None, "no"),
     # `accelerate launch` writes "no" when nothing was configured: not a choice, auto still decides.
     (NATIVE_BF16, "no", "bf16"),
     # A configured fp16/bf16 (accelerate config, or launch --mixed_precision) wins.
     (NO_BF16, "fp16", "fp16"), (NATIVE_BF16, "fp16", "fp16")],
)  # fmt: skip
def test_mixed_precision_auto(monkeypatch, cpu, env, expected):
    fake_cpu(monkeypatch, cpu)
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert training.resolve_mixed_precision("auto") == expected
    assert training.resolve_mixed_precision("no") == "no"  # an explicit choice is kept


@pytest.mark.parametrize("mixed_precision, autocast", [("auto", True), ("no", False)])
def test_trainer_default_autocasts_bf16_with_fp32_weights(
    monkeypatch, tmp_path, photo_folder, fresh_accelerate_state, capsys, mixed_precision, autocast
):
    fake_cpu(monkeypatch, NATIVE_BF16)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    seen = []
    forward = training.VAETrainingForward.forward

    def recording_forward(self, pixels, noise=None, **regularisers):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        output = forward(self, pixels, noise, **regularisers)
        seen.append(output.reconstructions.dtype)
        return output

    monkeypatch.setattr(training.VAETrainingForward, "forward", recording_forward)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in dict(make_vae().config).items() if not k.startswith("_")}))
    out = tmp_path / "run"
    argv = ["--model_config", str(config), "--train_data_dir", str(photo_folder), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none",
            "--no_progress", "--no-recompute_scaling_factor", "--validation_steps", "2"]  # fmt: skip
    if mixed_precision != "auto":
        argv += ["--mixed_precision", mixed_precision]
    training.main(argv)
    expected = "bf16 (auto)" if autocast else "no (no)"
    assert f"Mixed precision {expected} on cpu AMD EPYC 9654" in capsys.readouterr().out
    assert seen[0] == ((True, torch.bfloat16) if autocast else (False, seen[0][1]))
    assert seen[1] == (torch.bfloat16 if autocast else torch.float32)
    saved = AutoencoderKL.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in saved.parameters())  # weights stay fp32
