"""Seconds per training step and peak memory of `scripts/finetune_vae.py`, and the loop's overhead over a bare step.

Each variant runs the real training script in a subprocess on the built-in photos (so the peak RSS is the
process's own) and reports the median of the logged per-step times after warm-up. The "bare step" row times
the minimal fine-tuning step (encode, sample, decode, L1 + KL, backward, AdamW) with diffusers' own
AutoencoderKL on the same config and batch, in this process: the ratio ours / bare is what the loop's extras
(logging, non-finite checks, EMA, accelerate) cost. The loop's variants run in fp32 (`--mixed_precision no`);
the last rows are bf16 autocast and the default (`auto`: bf16 autocast where bf16 is native, see
`diffusers_vae_ext/hardware.py`).

    python benchmarks/bench_train.py                # small_rgb, 64x64, batch 8
    python benchmarks/bench_train.py --steps 40 --resolution 128
    python benchmarks/bench_train.py --demo         # README command 1 in full: default vs --mixed_precision no
    python benchmarks/bench_train.py --classes      # s/step per autoencoder class: the loop vs the bare step
    python benchmarks/bench_train.py --regularisers # each diffusability regulariser: cost per step and effect

`--classes` trains every class the trainer takes (small configs, `CLASS_CONFIGS`; images at 64x64 batch 4 from the
built-in photos, clips of 9 frames at 64x64 batch 2 from pan-and-zoom mp4s) with the real script, fp32, and times
the bare diffusers step of the same class, config, batch and seed in this process: encode, draw the posterior
(deterministic classes: the latents), decode, L1 (+ 1e-6 KL), backward, clip, AdamW, written plainly. The goal:
the loop costs at most 10% over the bare step (its extras: data loading and decoding of clips, logging,
non-finite checks, accelerate). The bare step runs before and after the loop and is averaged, since the load of a
shared machine drifts.

`--regularisers` runs the same-start comparison that tests/test_training_regularisers.py asserts on
(`diffusers_vae_ext.training.same_start`, `SameStartSetup`: the tests' tiny AutoencoderKL, 8/16/16 channels,
4 latent channels, factor 4, trained from scratch from the same random start, `--seed`, on 32 px crops of the
built-in photos, fp32) once without and once with each regulariser at its paper defaults (`--align_to`: a tiny
*random* DINOv2 built here, so its row shows the cost and the mechanics, not what real DINOv2 features do), and
measures on 32 fixed held-out 64x64 crops (`coffee`, `camera`; never trained on): the encoder's equivariance error
(`regularisers.equivariance_error`: EQ-VAE's transforms, and 2x/4x downsampling for scale equivariance), the
latents' `high_frequency_energy` (`diffusability.latent_spectrum`), `probe_loss` (`diffusability.measure_diffusability`
with a short budget, `--probe_steps`, default the test's 40) and the PSNR of their reconstructions; s/step is each
run's median (`--timing_only`: round-robin short runs, robust to load drift). Its last lines say whether the test's
assertions hold at this setup; `--seed`, `--steps`, `--learning_rate`, `--resize_to` and `--only` check other setups:

    python benchmarks/bench_train.py --regularisers --threads 1 --seed 1 --only equivariance scale_equivariance
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "plain (L1 + KL), fp32": ["--mixed_precision", "no"],
    "+ EMA": ["--mixed_precision", "no", "--use_ema"],
    "+ discriminator from step 0": ["--mixed_precision", "no", "--disc_start", "0"],
    "+ gradient checkpointing": ["--mixed_precision", "no", "--gradient_checkpointing"],
    "bf16 autocast": ["--mixed_precision", "bf16"],
    "default (--mixed_precision auto)": [],
}


def run_variant(
    extra: list[str], steps: int, resolution: int, batch: int, threads: int, output_dir: Path | None = None
) -> dict:
    """Run the training script; `output_dir` keeps its output (default: a temporary folder, removed)."""
    with tempfile.TemporaryDirectory() if output_dir is None else nullcontext(str(output_dir)) as out:
        argv = [
            sys.executable, str(REPO / "scripts" / "finetune_vae.py"), "--output_dir", out,
            "--max_train_steps", str(steps), "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--validation_steps", str(10**9), "--checkpointing_steps", str(10**9), "--report_to", "none",
            "--no_progress", "--no-recompute_scaling_factor", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        # Run the script in a wrapper that reports the process's own peak RSS when it is done.
        code = (
            "import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        result = subprocess.run([sys.executable, "-c", code, *argv[1:]], env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        rows = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines() if line]
        peak = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    times = [row["seconds"] for row in rows[max(1, len(rows) // 4) :]]  # skip warm-up steps
    return {"seconds": statistics.median(times), "peak_mib": peak / 1024}


def run_demo(mixed_precision: str, threads: int) -> dict:
    """README command 1 in full (`accelerate launch --num_cpu_threads_per_process N scripts/finetune_vae.py`),
    with `--mixed_precision` set; returns its wall time, median s/step, end held-out PSNR and the mixed precision
    it reported using."""
    with tempfile.TemporaryDirectory() as out:
        argv = [
            sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", str(threads),
            str(REPO / "scripts" / "finetune_vae.py"), "--output_dir", out, "--mixed_precision", mixed_precision,
            "--no_progress",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        rows = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines() if line]
        metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
    used = next((line for line in result.stdout.splitlines() if line.startswith("Mixed precision")), "")
    return {
        "wall": wall,
        "seconds_per_step": statistics.median(row["seconds"] for row in rows[len(rows) // 4 :]),
        "psnr": metrics[-1]["psnr"],
        "mixed_precision": used.split()[2] if used else mixed_precision,
    }


def bare_step_seconds(steps: int, resolution: int, batch: int, threads: int) -> float:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from diffusers_vae_ext.training import load_model_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = {k: v for k, v in load_model_config("small_rgb").items() if not k.startswith("_")}
    vae = DiffusersAutoencoderKL(**config).train()
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    return timed_bare_steps(vae, pixels, steps)


def timed_bare_steps(vae: torch.nn.Module, pixels: torch.Tensor, steps: int) -> float:
    """The minimal fine-tuning step of a diffusers autoencoder, written plainly: encode, draw the posterior
    (deterministic classes: the latents), decode, L1 (+ 1e-6 KL), backward, clip, AdamW. Median seconds after
    warm-up."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        encoded = vae.encode(pixels)
        if hasattr(encoded, "latent_dist"):
            posterior = encoded.latent_dist
            latents, kl = posterior.sample(), posterior.kl().mean()
        else:
            latents, kl = (encoded.latent if hasattr(encoded, "latent") else encoded.latents), 0.0
        reconstruction = vae.decode(latents).sample
        loss = (pixels - reconstruction).abs().flatten(1).sum(1).mean() + 1e-6 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[max(1, steps // 4) :])


# Small configs per class (a few hundred thousand parameters): big enough that the step is not all overhead.
CLASS_CONFIGS: dict[str, dict] = {
    "AutoencoderKL": dict(
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ),
    "AutoencoderKLFlux2": dict(
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=8, norm_num_groups=8,
    ),
    "AutoencoderDC": dict(
        latent_channels=8, attention_head_dim=8, encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
        decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"], encoder_block_out_channels=[16, 32, 32],
        decoder_block_out_channels=[16, 32, 32], encoder_qkv_multiscales=[[], [], [5]],
        decoder_qkv_multiscales=[[], [], [5]], encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    ),
    "AutoencoderTiny": dict(
        encoder_block_out_channels=[32, 32, 32, 32], decoder_block_out_channels=[32, 32, 32, 32],
        num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1],
    ),
    "AutoencoderKLWan": dict(
        base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ),
    "AutoencoderKLHunyuanVideo": dict(
        latent_channels=8, down_block_types=["HunyuanVideoDownBlock3D"] * 4,
        up_block_types=["HunyuanVideoUpBlock3D"] * 4, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
        norm_num_groups=8,
    ),
    "AutoencoderKLCogVideoX": dict(
        down_block_types=["CogVideoXDownBlock3D"] * 4, up_block_types=["CogVideoXUpBlock3D"] * 4,
        block_out_channels=[16, 16, 32, 32], latent_channels=8, layers_per_block=1, norm_num_groups=8,
        temporal_compression_ratio=4,
    ),
}  # fmt: skip


def bare_class_step_seconds(name: str, pixels: torch.Tensor, steps: int) -> float:
    """The bare diffusers training step of class `name` on `pixels`, median seconds after warm-up."""
    import diffusers

    torch.manual_seed(0)
    return timed_bare_steps(getattr(diffusers, name)(**CLASS_CONFIGS[name]).train(), pixels, steps)


def run_classes(steps: int, threads: int) -> None:
    from diffusers_vae_ext.autoencoders import as_autoencoder
    from diffusers_vae_ext.training.data import centre_cropped_clip
    from diffusers_vae_ext.training.model import model_from_config
    from diffusers_vae_ext.video import pan_zoom_frames, write_pan_zoom_video

    torch.set_num_threads(threads)
    resolution, frames = 64, 9
    print(
        f"images {resolution}x{resolution} batch 4 (built-in photos); clips {frames} x {resolution}x{resolution} "
        f"batch 2 (pan-zoom mp4s); fp32, {threads} threads, median of steps {steps // 4 + 1}-{steps}"
    )
    print(f"{'class':28s} {'params':>7s} {'bare s/step':>12s} {'loop s/step':>12s} {'loop/bare':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        for photo in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
            write_pan_zoom_video(videos / f"{photo}.mp4", photo, num_frames=frames + 3, size=(96, 96))
        for name, config in CLASS_CONFIGS.items():
            model = model_from_config({"_class_name": name, **config})
            video = as_autoencoder(model).is_video
            params = sum(p.numel() for p in model.parameters()) / 1e6
            if video:
                batch = 2
                pixels = torch.stack(
                    [
                        centre_cropped_clip(pan_zoom_frames(p, frames, (96, 96)), resolution)
                        for p in ("astronaut", "rocket")
                    ]
                )
            else:
                batch = 4
                pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
            # Bare step before and after the loop, averaged: on a shared machine the load drifts between them.
            bare_before = bare_class_step_seconds(name, pixels, steps)
            config_path = Path(tmp) / f"{name}.json"
            config_path.write_text(json.dumps({"_class_name": name, **config}))
            extra = ["--model_config", str(config_path), "--mixed_precision", "no"]
            if video:
                extra += ["--train_data_dir", str(videos), "--num_frames", str(frames), "--resize_to", "96"]
            loop = run_variant(extra, steps, resolution, batch, threads)["seconds"]
            bare = (bare_before + bare_class_step_seconds(name, pixels, steps)) / 2
            print(f"{name:28s} {params:6.2f}M {bare:12.3f} {loop:12.3f} {loop / bare:10.2f}")


def regulariser_costs(variants: dict[str, list[str]], config: Path, threads: int, rounds: int = 3) -> dict:
    """s/step of each variant, timed round-robin (`rounds` short runs each, the fastest kept) so that a machine
    whose load drifts over minutes weighs on every variant alike."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, flags in variants.items():
            extra = ["--model_config", str(config), "--mixed_precision", "no", "--lr_warmup_steps", "0", *flags]
            seconds = run_variant(extra, 40, 32, 4, threads)["seconds"]
            best[name] = min(best.get(name, float("inf")), seconds)
    return best


def tiny_dinov2(folder: Path) -> Path:
    """A tiny *random* DINOv2 (patch 4, width 16) saved as a transformers folder, as the tests build it."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=4, image_size=32
    )
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    return folder


def run_regularisers(
    setup, threads: int, probe_steps: int, timing_only: bool = False, only: tuple[str, ...] = ()
) -> None:
    from diffusers_vae_ext.training.same_start import held_out_crops, regulariser_effect, train_from_same_start

    torch.set_num_threads(threads)
    images = held_out_crops()
    print(
        f"{setup.describe()}; {threads} thread(s); effects on {len(images)} held-out 64x64 crops, probe "
        f"{probe_steps} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dinov2 = tiny_dinov2(Path(tmp) / "dinov2")
        variants = {
            "none (L1 + KL)": [],
            "--equivariance": ["--equivariance"],
            "--scale_equivariance": ["--scale_equivariance"],
            "--align_to (random DINOv2)": ["--align_to", str(dinov2)],
            "--latent_noise (0.1)": ["--latent_noise"],
        }
        if only:
            variants = {
                name: flags
                for name, flags in variants.items()
                if name.split()[0].strip("-") in only or name == "none (L1 + KL)"
            }
        if timing_only:
            config = Path(tmp) / "tiny.json"
            config.write_text(json.dumps(setup.model_config))
            costs = regulariser_costs(variants, config, threads)
            base = costs["none (L1 + KL)"]
            print(f"{'regulariser':26s} {'s/step':>7s} {'x none':>7s}  (round-robin, fastest of 3 runs of 40 steps)")
            for name, seconds in costs.items():
                print(f"{name:26s} {seconds:7.3f} {seconds / base:7.2f}")
            return
        print(
            f"{'regulariser':26s} {'s/step':>7s} {'x none':>7s} {'EQ err':>7s} {'down err':>9s} {'HF share':>9s} "
            f"{'probe':>7s} {'PSNR dB':>8s}"
        )
        base, effects = None, {}
        for name, flags in variants.items():
            out = train_from_same_start(Path(tmp) / name.split()[0].strip("-"), setup, flags)
            effect = effects[name] = regulariser_effect(out, images, probe_steps)
            base = base or effect
            print(
                f"{name:26s} {effect['seconds']:7.3f} {effect['seconds'] / base['seconds']:7.2f} {effect['eq']:7.3f} "
                f"{effect['down']:9.3f} {effect['hf']:9.3f} {effect['probe']:7.3f} {effect['psnr']:8.2f}",
                flush=True,
            )
    # What tests/test_training_regularisers.py asserts, at this setup: EQ err -30 % or more and a lower HF share.
    for name in ("--equivariance", "--scale_equivariance"):
        if name in effects:
            eq, hf = effects[name]["eq"] / base["eq"] - 1, effects[name]["hf"] / base["hf"] - 1
            holds = eq <= -0.3 and hf < 0
            print(
                f"{name} vs none: EQ err {eq:+.0%}, HF share {hf:+.0%}: the test's assertions {'hold' if holds else 'FAIL'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--demo", action="store_true", help="instead: README command 1 in full, default vs --mixed_precision no"
    )
    parser.add_argument("--classes", action="store_true", help="instead: s/step per autoencoder class vs bare step")
    parser.add_argument(
        "--regularisers", action="store_true", help="instead: each regulariser's cost per step and effect"
    )
    parser.add_argument("--probe_steps", type=int, default=40, help="--regularisers: probe budget (the test's 40)")
    parser.add_argument("--seed", type=int, default=0, help="--regularisers: the random start (the test's 0)")
    parser.add_argument("--learning_rate", type=float, default=None, help="--regularisers: default the test's")
    parser.add_argument(
        "--resize_to", type=int, default=None, help="--regularisers: built-in photos' short side (default the test's)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        help="--regularisers: these flags only (and none), e.g. --only equivariance scale_equivariance",
    )
    parser.add_argument(
        "--timing_only", action="store_true", help="--regularisers: only s/step, round-robin (robust to load drift)"
    )
    args = parser.parse_args()
    from diffusers_vae_ext.hardware import cpu_info, describe_path

    if args.regularisers:
        torch.set_num_threads(args.threads)  # before describing the path, which reports the thread count

    print(f"CPU: {cpu_info().model}; torch {torch.__version__}")
    print(f"path: {describe_path()}; load average {os.getloadavg()}")
    if args.classes:
        run_classes(args.steps, args.threads)
        return
    if args.regularisers:
        from diffusers_vae_ext.training.same_start import SameStartSetup

        setup = SameStartSetup(seed=args.seed)
        setup.steps = args.steps if args.steps != 24 else setup.steps
        setup.learning_rate = args.learning_rate or setup.learning_rate
        setup.resize_to = args.resize_to or setup.resize_to
        run_regularisers(setup, args.threads, args.probe_steps, args.timing_only, tuple(args.only))
        return
    if args.demo:
        runs = {mode: run_demo(mode, args.threads) for mode in ("auto", "no")}
        print(f"{'README command 1':32s} {'wall s':>8s} {'s/step':>8s} {'PSNR dB':>8s}")
        for mode, run in runs.items():
            name = f"--mixed_precision {mode} ({run['mixed_precision']})"
            print(f"{name:32s} {run['wall']:8.1f} {run['seconds_per_step']:8.3f} {run['psnr']:8.2f}")
        ratio = runs["auto"]["seconds_per_step"] / runs["no"]["seconds_per_step"]
        print(
            f"default / fp32 s/step {ratio:.2f}; PSNR difference {runs['auto']['psnr'] - runs['no']['psnr']:+.2f} dB"
        )
        return

    bare = bare_step_seconds(args.steps, args.resolution, args.batch, args.threads)
    print(
        f"small_rgb config (2.7M parameters), {args.resolution}x{args.resolution}, batch {args.batch}, "
        f"{args.threads} threads, median of steps {args.steps // 4 + 1}-{args.steps}"
    )
    print(f"{'variant':32s} {'s/step':>8s} {'x bare':>7s} {'peak RSS MiB':>13s}")
    print(f"{'bare step (diffusers VAE)':32s} {bare:8.3f} {1.0:7.2f} {'-':>13s}")
    for name, extra in VARIANTS.items():
        result = run_variant(extra, args.steps, args.resolution, args.batch, args.threads)
        print(f"{name:32s} {result['seconds']:8.3f} {result['seconds'] / bare:7.2f} {result['peak_mib']:13.0f}")


if __name__ == "__main__":
    main()
