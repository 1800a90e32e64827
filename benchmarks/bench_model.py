"""Model speed: `diffusers_vae_ext.AutoencoderKL` against diffusers and OpenVINO, one table, CPU named first.

Every model is the Stable Diffusion kl-f8 architecture (block_out_channels 128/256/512/512, four levels,
layers_per_block 2, latent_channels 4) with the same seeded random weights. The variants of each row:

- **ours**: `diffusers_vae_ext.AutoencoderKL` (bf16: the model cast with `.to(torch.bfloat16)`, bf16 input);
- **diffusers**: diffusers' AutoencoderKL, default (contiguous) layout, and **diffusers cl**: model and input in
  `channels_last` (the one-line change any user can make, the fairer peer);
- **OpenVINO**: diffusers' encoder (+ quant_conv) or decoder (+ post_quant_conv) converted in memory with
  `openvino.convert_model` at the row's fixed input shape, compiled for "CPU" with `INFERENCE_PRECISION_HINT` f32 or
  bf16 (what a person running SD on an Intel CPU picks instead). Skipped, with the reason, when `openvino` is not
  installed (`pip install "diffusers-vae-ext[bench]"`).

Rows: encode and decode, fp32 and bf16, each `--sizes` x `--batches`. After a warm-up call of each, every variant of
one (size, batch) runs once per round, in an order that flips every round, for `--rounds` rounds in this one process,
together with the chip's own peaks: a 512-channel 3x3 convolution at 64x64 (channels_last, oneDNN on packed weights;
the best of that and `F.conv2d`) and a 4096x4096 matmul, in fp32 and bf16. Times are medians over the rounds, and
every ratio is between medians measured side by side. Columns:

- milliseconds per call of each variant; ours / diffusers cl and ours / OpenVINO (lower is better);
- the achieved fraction of the same run's convolution peak in that dtype, counting the FLOPs each path executes
  (`FlopCounterMode`; ours counts its sub-pixel upsampling convolutions, 16/36 of diffusers' there, and in float32
  its Winograd layers' matrix products, 16/36 again; OpenVINO runs diffusers' graph, so its FLOPs are diffusers').
  Where ours executes fewer, its cell adds the direct-equivalent fraction: diffusers' FLOPs over our time;
- max abs difference from diffusers' default float32 output (fp32 rows: the README promises <= 1e-4);
- peak RSS of a fresh process that builds the model and runs the call twice (`VmHWM`, the high-water
  mark; OpenVINO's child reads the converted model from an IR file, so its conversion does not count). By default
  for decode rows only (`--rss all` for encode too, `--rss none` to skip).

The header names the CPU, its flags (AMX, AVX512-BF16, AVX512, AVX2), torch's CPU capability, the path
`diffusers_vae_ext.hardware` chooses and the load average. On a shared machine compare ratios, not seconds.

    python benchmarks/bench_model.py                       # quick: 256 px, batch 1 (a few minutes on 2 cores)
    python benchmarks/bench_model.py --full                # 256 and 512 px, batch 1 and 4
    python benchmarks/bench_model.py --sizes 512 1024 --batches 1 --rss decode --no-openvino
    python benchmarks/bench_model.py --sizes 512 --batches 4 --ops encode --dtypes fp32   # one cell of the matrix
    python benchmarks/bench_model.py --extras quality cache train   # + the bf16 quality, cache and training rows
    python benchmarks/bench_model.py --device cuda --sizes 512 1024  # on a GPU (no OpenVINO, no RSS there)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers_vae_ext import AutoencoderKL, blocks  # noqa: E402
from diffusers_vae_ext.data import (  # noqa: E402
    SAMPLE_PHOTO_NAMES,
    pil_to_tensor,
    resize_and_crop,
    sample_photos,
    tensor_to_pil,
)
from diffusers_vae_ext.hardware import choose_path, configure_backends, cpu_info, describe_path  # noqa: E402
from diffusers_vae_ext.metrics import psnr  # noqa: E402

KL_F8_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ helpers
def build_models(seed: int, device: torch.device, dtype: torch.dtype):
    """Ours with seeded random weights and diffusers' AutoencoderKL holding an exact copy of them."""
    torch.manual_seed(seed)
    ours = AutoencoderKL(**KL_F8_CONFIG).eval()
    theirs = DiffusersAutoencoderKL(**KL_F8_CONFIG).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if device.type == "cpu" and dtype == torch.float32:
        return ours, theirs
    return ours.to(device, dtype), theirs.to(device, dtype)


def half_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Parameter-wise, not `.to(dtype)`: diffusers' override warns about fp32-pinned modules even when there are none.
    twin = copy.deepcopy(model)
    for param in twin.parameters():
        param.data = param.data.to(dtype)
    return twin


def photo_batch(size: int, batch: int) -> torch.Tensor:
    """`batch` real photos (astronaut first, then the other scikit-image samples), centre-cropped to size x size."""
    photos = sample_photos()
    names = [SAMPLE_PHOTO_NAMES[i % len(SAMPLE_PHOTO_NAMES)] for i in range(batch)]
    return torch.stack([pil_to_tensor(resize_and_crop(photos[name], (size, size))[0]) for name in names])


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_conv_flops(*args, out_shape=None, **kwargs) -> int:
    # mkldnn::_convolution_pointwise(X, W, ...), its .binary(X, other, W, ...): the weight follows the tensors.
    x_shape, second, third = args[0], args[1], args[2]
    w_shape = third if isinstance(third, (tuple, list, torch.Size)) and len(third) == 4 else second
    return conv_flop_count(x_shape, w_shape, out_shape)


def _onednn_conv_inplace_flops(*args, out_shape=None, **kwargs) -> int:
    # mkldnn::_convolution_pointwise_.binary(other, X, W, ...), the residual-fused convolution.
    return conv_flop_count(args[1], args[2], out_shape)


def counted_flops(fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of the ops `fn` executes (convolutions, matmuls, attention; elementwise work is not counted)."""
    # FlopCounterMode knows the CUDA attention kernels but neither the CPU flash-attention op nor the oneDNN
    # convolutions on packed weights that our path runs.
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.mkldnn._convolution_pointwise: _onednn_conv_flops,
        torch.ops.mkldnn._convolution_pointwise_: _onednn_conv_inplace_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, row: str, value: str, goal: str = "", met: bool | None = None, note: str = "") -> None:
        verdict = "" if met is None else ("yes" if met else "no")
        if note:
            verdict = f"{verdict} ({note})" if verdict else note
        self.rows.append((row, value, goal, verdict))

    def print(self) -> None:
        print("| row | measured | goal | met |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


# ------------------------------------------------------------------------------------------------ peers
class _EncodeGraph(nn.Module):
    """diffusers' encoder + quant_conv as one module: the graph OpenVINO converts."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


class _DecodeGraph(nn.Module):
    """diffusers' post_quant_conv + decoder as one module."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def openvino_missing() -> str | None:
    """Why the OpenVINO column is empty, or None when it can run."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return 'openvino not installed (pip install "diffusers-vae-ext[bench]")'
    return None


def openvino_model(vae: nn.Module, op: str, example: torch.Tensor):
    """diffusers' encode or decode graph converted in memory by `openvino.convert_model`, at a fixed input shape."""
    import openvino as ov

    graph = (_EncodeGraph if op == "encode" else _DecodeGraph)(vae).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on diffusers' shape asserts
        return ov.convert_model(graph, example_input=example, input=[tuple(example.shape)])


def openvino_compile(model, dtype: torch.dtype):
    import openvino as ov

    hint = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(model, "CPU", config)


def openvino_call(compiled, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    array = x.float().contiguous().numpy()
    return lambda: torch.from_numpy(compiled(array)[0])


# ------------------------------------------------------------------------------------------------ peaks
def peak_calls(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> dict:
    """{(kind, dtype): (call, FLOPs)}: a 512-ch 3x3 conv at 64x64 (ours on packed weights, and F.conv2d) and a
    4096^2 matmul. Timed in the same rounds as the models, so they see the same load."""
    calls = {}
    for dtype in dtypes:
        conv = nn.Conv2d(512, 512, 3, padding=1).to(device, dtype)
        for param in conv.parameters():
            param.requires_grad_(False)
        x = torch.randn(1, 512, 64, 64, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        conv_flops = 2 * 512 * 512 * 9 * 64 * 64
        if device.type == "cpu" and dtype in blocks._onednn_dtypes():
            # The direct convolution on packed weights: the chip's convolution rate (ours runs this layer in
            # float32 as Winograd, whose fewer FLOPs would overstate the rate).
            conv_args = ([1, 1], [1, 1], [1, 1], 1)
            packed = blocks._onednn_pack(conv.weight, conv_args)
            direct = functools.partial(
                torch.ops.mkldnn._convolution_pointwise, x, packed, conv.bias, *conv_args, "none", [], ""
            )
            calls["conv packed", dtype] = (direct, conv_flops)
        calls["conv ours", dtype] = ((lambda c=conv, x=x: blocks.conv2d(c, x)), conv_flops)
        calls["conv F.conv2d", dtype] = ((lambda c=conv, x=x: c(x)), conv_flops)
        a, b = (torch.randn(4096, 4096, device=device).to(dtype) for _ in range(2))
        calls["matmul", dtype] = ((lambda a=a, b=b: a @ b), 2 * 4096**3)
    return calls


# ------------------------------------------------------------------------------------------------ peak RSS
def rss_child(spec: dict) -> None:
    """In a fresh process: build one variant, run its call twice, print the peak RSS (MiB) as JSON."""
    dtype = DTYPES[spec["dtype"]]
    shape = spec["shape"]
    torch.manual_seed(0)
    x = torch.randn(shape)
    if spec["variant"] == "OpenVINO":
        import openvino as ov

        compiled = openvino_compile(ov.Core().read_model(spec["ir"]), dtype)
        call = openvino_call(compiled, x)
    else:
        cls = AutoencoderKL if spec["variant"] == "ours" else DiffusersAutoencoderKL
        torch.manual_seed(spec["seed"])
        model = cls(**KL_F8_CONFIG).eval()
        if dtype != torch.float32:
            for param in model.parameters():
                param.data = param.data.to(dtype)
        x = x.to(dtype)
        if spec["variant"] == "diffusers cl":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if spec["op"] == "encode":
            call = lambda: model.encode(x).latent_dist.parameters  # noqa: E731
        else:
            call = lambda: model.decode(x).sample  # noqa: E731
    with torch.inference_mode():
        call()
        call()
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set: /proc's VmHWM (per address space, so a fresh exec starts from zero; the
    `getrusage` high-water mark survives exec and would report the parent's peak), else `ru_maxrss`."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(spec: dict, threads: int) -> float | None:
    env = {**os.environ, "DIFFUSERS_VAE_EXT_QUIET": "1", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, __file__, "--rss_child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_mib"]
    print(f"peak RSS of {spec} failed: {result.stderr[-500:]}", file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------ the matrix
VARIANTS = ("ours", "diffusers", "diffusers cl", "OpenVINO")


def matrix_rows(args, device: torch.device, size: int, batch: int, dtypes: tuple[torch.dtype, ...]) -> list[dict]:
    """Time every variant of every (op, dtype) at one size and batch, interleaved; return one dict per row."""
    ours, theirs = build_models(args.seed, device, torch.float32)
    if device.type != "cpu":
        ours, theirs = ours.to(device), theirs.to(device)
    models = {}
    for dtype in dtypes:
        ours_d = ours if dtype == torch.float32 else half_copy(ours, dtype)
        theirs_d = theirs if dtype == torch.float32 else half_copy(theirs, dtype)
        models["ours", dtype] = (ours_d, False)
        models["diffusers", dtype] = (theirs_d, False)
        models["diffusers cl", dtype] = (copy.deepcopy(theirs_d).to(memory_format=torch.channels_last), True)
    images = photo_batch(size, batch).to(device)
    with torch.inference_mode():
        latents = theirs.encode(images).latent_dist.mean
    inputs = {op: x for op, x in (("encode", images), ("decode", latents)) if op in args.ops}
    calls: dict = {}
    for (name, dtype), (model, channels_last) in models.items():
        for op, x in inputs.items():
            x = x.to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if op == "encode":
                calls[op, dtype, name] = lambda m=model, x=x: m.encode(x).latent_dist.parameters
            else:
                calls[op, dtype, name] = lambda m=model, x=x: m.decode(x).sample
    skipped = openvino_missing() if device.type == "cpu" and not args.no_openvino else "not run (--no-openvino)"
    if device.type != "cpu":
        skipped = "CPU only"
    ov_models = {}
    if skipped is None:
        for op, x in inputs.items():
            ov_models[op] = openvino_model(theirs, op, x)
            for dtype in dtypes:
                calls[op, dtype, "OpenVINO"] = openvino_call(openvino_compile(ov_models[op], dtype), x)
    peaks = peak_calls(device, dtypes)
    for key, (fn, _) in peaks.items():
        calls[key] = fn
    times: dict = {key: [] for key in calls}
    outputs: dict = {}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up: oneDNN/OpenVINO pick and build their kernels on the first call
            fn()
        keys = list(calls)
        for round_index in range(args.rounds):
            for key in keys if round_index % 2 == 0 else keys[::-1]:
                seconds, outputs[key] = timed(calls[key], device)
                times[key].append(seconds)
        flops = {}
        for op in inputs:
            flops[op, "diffusers"] = counted_flops(calls[op, torch.float32, "diffusers"])
            for dtype in dtypes:  # ours executes fewer FLOPs where it runs Winograd (float32 only)
                flops[op, dtype, "ours"] = counted_flops(calls[op, dtype, "ours"])
    median = {key: statistics.median(values) for key, values in times.items()}
    conv_peak = {
        dtype: max(
            flop / median[kind, dtype]
            for (kind, d), (_, flop) in peaks.items()
            if d == dtype and kind in ("conv packed", "conv F.conv2d")
        )
        for dtype in dtypes
    }
    matmul_peak = {dtype: peaks["matmul", dtype][1] / median["matmul", dtype] for dtype in dtypes}
    # Our own call on the same layer, in direct-convolution FLOPs per second (above the peak where it is Winograd).
    ours_layer = {dtype: peaks["conv ours", dtype][1] / median["conv ours", dtype] for dtype in dtypes}
    rows = []
    for op in inputs:
        reference = outputs[op, torch.float32, "diffusers"]
        for dtype in dtypes:
            row = dict(op=op, size=size, batch=batch, dtype=dtype, ms={}, diff={}, peak_fraction={}, rss={})
            row["conv_peak"], row["matmul_peak"] = conv_peak[dtype], matmul_peak[dtype]
            row["ours_layer"] = ours_layer[dtype]
            row["openvino_skipped"] = skipped
            for name in VARIANTS:
                if (op, dtype, name) not in median:
                    continue
                row["ms"][name] = 1e3 * median[op, dtype, name]
                row["diff"][name] = max_diff(outputs[op, dtype, name], reference)
                executed = flops[op, dtype, "ours"] if name == "ours" else flops[op, "diffusers"]
                row["peak_fraction"][name] = executed / median[op, dtype, name] / conv_peak[dtype]
                if name == "ours":  # the same work counted as direct convolutions, as diffusers executes it
                    row["direct_fraction"] = flops[op, "diffusers"] / median[op, dtype, name] / conv_peak[dtype]
            if args.rss == "all" or (args.rss == "decode" and op == "decode"):
                if device.type == "cpu":
                    shape = tuple(inputs[op].shape)
                    for name in row["ms"]:
                        spec = dict(variant=name, op=op, dtype=str(dtype).removeprefix("torch."), shape=shape)
                        spec["seed"] = args.seed
                        if name == "OpenVINO":
                            import openvino as ov

                            spec["ir"] = str(Path(args.workdir, f"{op}_{size}_{batch}.xml"))
                            if not Path(spec["ir"]).exists():
                                ov.save_model(ov_models[op], spec["ir"], compress_to_fp16=False)
                        row["rss"][name] = measure_rss(spec, args.threads)
            rows.append(row)
    return rows


def print_matrix(rows: list[dict]) -> None:
    def ms(row, name):
        return f"{row['ms'][name]:.0f}" if name in row["ms"] else "-"

    def ratio(row, name):
        return f"{row['ms']['ours'] / row['ms'][name]:.2f}" if name in row["ms"] else "-"

    def fraction(row, name):
        if name not in row["peak_fraction"]:
            return "-"
        executed = f"{100 * row['peak_fraction'][name]:.0f}%"
        if name == "ours" and abs(row["direct_fraction"] - row["peak_fraction"][name]) > 0.005:
            executed += f" ({100 * row['direct_fraction']:.0f}% direct-equivalent)"
        return executed

    def rss(row):
        if not row["rss"]:
            return "-"
        return " / ".join(f"{row['rss'][n]:.0f}" if row["rss"].get(n) else "-" for n in VARIANTS if n in row["ms"])

    print(
        "| op | px | batch | dtype | ours ms | diffusers ms | diffusers cl ms | OpenVINO ms | ours / diffusers cl "
        "| ours / OpenVINO | % of conv peak: ours / diffusers cl / OpenVINO | max abs diff vs diffusers fp32: ours / "
        "OpenVINO | peak RSS MiB: " + " / ".join(n for n in VARIANTS if n in rows[0]["ms"]) + " |"
    )
    print("|---" * 13 + "|")
    for row in rows:
        diff = f"{row['diff']['ours']:.1e} / " + (
            f"{row['diff']['OpenVINO']:.1e}" if "OpenVINO" in row["diff"] else "-"
        )
        fractions = " / ".join(fraction(row, name) for name in ("ours", "diffusers cl", "OpenVINO"))
        cells = [
            row["op"], str(row["size"]), str(row["batch"]), {torch.float32: "fp32"}.get(row["dtype"], "bf16"),
            ms(row, "ours"), ms(row, "diffusers"), ms(row, "diffusers cl"), ms(row, "OpenVINO"),
            ratio(row, "diffusers cl"), ratio(row, "OpenVINO"), fractions, diff, rss(row),
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    peaks = {}
    for row in rows:
        peaks.setdefault(row["dtype"], []).append((row["conv_peak"], row["matmul_peak"], row["ours_layer"]))
    for dtype, values in peaks.items():
        conv = ", ".join(f"{c / 1e9:.0f}" for c, _, _ in values)
        matmul = ", ".join(f"{m / 1e9:.0f}" for _, m, _ in values)
        layer = ", ".join(f"{o / 1e9:.0f}" for _, _, o in values)
        name = str(dtype).removeprefix("torch.")
        print(
            f"\n{name} peaks in each row's rounds, GFLOP/s: 512-ch 3x3 conv at 64x64 {conv}; 4096^2 matmul {matmul}; "
            f"ours on that conv, direct-convolution FLOPs per second (Winograd in float32) {layer}"
        )
    skipped = rows[0]["openvino_skipped"]
    if skipped:
        print(f"OpenVINO column: skipped, {skipped}")


def print_header(args, device: torch.device) -> None:
    cpu = cpu_info()
    flags = ", ".join(
        f"{name} {'yes' if present else 'no'}"
        for name, present in (
            ("AMX-BF16", cpu.amx_bf16),
            ("AVX512-BF16", cpu.avx512_bf16),
            ("AVX512", cpu.avx512),
            ("AVX2", cpu.avx2),
        )
    )
    print(f"CPU: {cpu.model}; {flags}; torch capability {cpu.capability}; {args.threads} threads")
    versions = f"torch {torch.__version__}"
    try:
        import openvino

        versions += f", openvino {openvino.__version__}"
    except ImportError:
        pass
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {versions}")
    print(f"path: {describe_path(choose_path(device))}")


# ------------------------------------------------------------------------------------------------ extra sections
def quality_rows(args, device: torch.device, table: Table, vae: AutoencoderKL, label: str, size: int) -> None:
    """bf16 vs fp32 round trips on the photos, and decodes of posterior draws from bf16 vs fp32 moments."""
    vae = vae.to(device).eval()
    low = torch.bfloat16 if device.type == "cpu" else choose_path(device).dtype
    vae_low = half_copy(vae, low)
    images = photo_batch(size, len(SAMPLE_PHOTO_NAMES)).to(device)
    names = ", ".join(SAMPLE_PHOTO_NAMES)
    with torch.inference_mode():
        post32 = vae.encode(images).latent_dist
        post16 = vae_low.encode(images.to(low)).latent_dist
        round32 = vae.decode(post32.mean).sample
        round16 = vae_low.decode(post16.mean).sample
        # A bf16 latent cache stores mean and logvar in bf16; a training loop draws mean + std * eps from them.
        noise = torch.randn(post32.mean.shape, generator=torch.Generator().manual_seed(0)).to(device)
        draw32 = post32.mean + post32.std * noise
        draw16 = post16.mean.float() + torch.exp(0.5 * post16.logvar.float()) * noise
        cached32, cached16 = vae.decode(draw32).sample, vae.decode(draw16).sample
    low_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[low]
    for what, a, b in (("round trip", round32, round16), ("decoded posterior draws", cached32, cached16)):
        values = psnr(a.float().cpu(), b.float().cpu())
        table.add(
            f"{low_name} vs fp32 {what}, {label}, {size} px",
            f"min {values.min():.1f} dB, mean {values.mean():.1f} dB ({len(values)} photos: {names})",
            ">= 40 dB",
            bool(values.min() >= 40),
        )


def cache_rows(args, device: torch.device, table: Table) -> None:
    from diffusers_vae_ext.cache import precompute_latents

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**KL_F8_CONFIG).eval().to(device)
    workdir = Path(tempfile.mkdtemp(prefix="bench_model_cache_"))
    try:
        photos = workdir / "photos"
        photos.mkdir()
        for index, image in enumerate(photo_batch(args.cache_size, args.cache_images)):
            tensor_to_pil(image).save(photos / f"{index:03d}.png")

        def run(dtype: str) -> float:
            start = time.perf_counter()
            precompute_latents(
                vae,
                workdir / f"cache_{dtype}",
                train_data_dir=photos,
                resolution=args.cache_size,
                center_crop=True,
                dtype=dtype,
                batch_size=args.batch_size,
                num_workers=0,
                overwrite=True,
                progress=False,
            )
            return time.perf_counter() - start

        run("bf16")  # warm-up: kernels for both dtypes
        run("fp32")
        times = {"fp32": float("inf"), "bf16": float("inf")}
        for round_index in range(args.rounds):
            for dtype in ("fp32", "bf16") if round_index % 2 == 0 else ("bf16", "fp32"):
                times[dtype] = min(times[dtype], run(dtype))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rates = {dtype: args.cache_images / seconds for dtype, seconds in times.items()}
    ratio = rates["bf16"] / rates["fp32"]
    amx = getattr(choose_path(device).cpu, "amx_bf16", False)
    table.add(
        f"`diffusers-vae cache --dtype bf16` / fp32 images/s, {args.cache_size} px",
        f"{ratio:.2f} ({rates['bf16']:.2f} / {rates['fp32']:.2f} images/s, {args.cache_images} photos, "
        f"batch {args.batch_size})",
        ">= 2.5 on an AMX CPU",
        ratio >= 2.5 if amx else None,
        note="" if amx else "no AMX here: not measurable",
    )


def train_rows(args, table: Table) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import run_demo, run_variant

    amx = getattr(choose_path("cpu").cpu, "amx_bf16", False)
    if args.train == "demo":
        runs = {mode: run_demo(mode, args.threads) for mode in ("auto", "no")}
        ratio = runs["auto"]["seconds_per_step"] / runs["no"]["seconds_per_step"]
        gap = runs["auto"]["psnr"] - runs["no"]["psnr"]
        table.add(
            "README command 1 (600 steps): default (auto) / --mixed_precision no, s/step",
            f"{ratio:.2f} ({runs['auto']['wall']:.0f} s vs {runs['no']['wall']:.0f} s wall; "
            f"{runs['auto']['mixed_precision']} vs no)",
            "<= 0.5 on an AMX CPU; default <= 180 s",
            ratio <= 0.5 if amx else runs["auto"]["wall"] <= 180,
            note="" if amx else "no AMX: checked the 180 s only",
        )
        table.add(
            "README command 1: held-out PSNR, default - fp32",
            f"{gap:+.2f} dB ({runs['auto']['psnr']:.2f} vs {runs['no']['psnr']:.2f})",
            "within 0.3 dB",
            abs(gap) <= 0.3,
        )
        return
    steps = {
        mode: run_variant(["--mixed_precision", mode], args.train_steps, 64, 8, args.threads)
        for mode in ("auto", "no")
    }
    ratio = steps["auto"]["seconds"] / steps["no"]["seconds"]
    table.add(
        f"training s/step (small_rgb 64 px, batch 8, {args.train_steps} steps): default / --mixed_precision no",
        f"{ratio:.2f} ({steps['auto']['seconds']:.3f} / {steps['no']['seconds']:.3f} s)",
        "<= 0.5 on an AMX CPU",
        ratio <= 0.5 if amx else None,
        note="" if amx else "no AMX here: not measurable",
    )


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="image sides (multiples of 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="images per call")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=("encode", "decode"))
    parser.add_argument("--full", action="store_true", help="the whole matrix: 256 and 512 px, batch 1 and 4")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--rss", choices=("decode", "all", "none"), default="decode", help="peak RSS rows")
    parser.add_argument("--no-openvino", dest="no_openvino", action="store_true", help="leave OpenVINO out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extras", nargs="*", default=[], choices=("quality", "cache", "train"), help="extra sections, own table"
    )
    parser.add_argument("--quality_size", type=int, default=256, help="photo size of the bf16 quality rows")
    parser.add_argument("--demo_vae", default=str(REPO / "runs" / "demo"), help="a trained VAE folder, if present")
    parser.add_argument("--cache_images", type=int, default=16)
    parser.add_argument("--cache_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4, help="cache batch size")
    parser.add_argument("--train", choices=("steps", "demo"), default="steps", help="short runs, or full demos")
    parser.add_argument("--train_steps", type=int, default=24)
    parser.add_argument("--rss_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return 0
    if args.full:
        args.sizes, args.batches, args.rounds = [256, 512], [1, 4], max(args.rounds, 5)
    if any(size % 8 for size in args.sizes):
        parser.error(f"--sizes must be multiples of 8 (the kl-f8 downsampling factor), got {args.sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    configure_backends(choose_path(device))
    if device.type != "cpu":
        args.rss = "none"
    low = torch.bfloat16 if device.type == "cpu" else choose_path(device).dtype
    dtypes = tuple({"fp32": torch.float32, "bf16": low}[name] for name in args.dtypes)

    print_header(args, device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as workdir:
        args.workdir = workdir
        for size in args.sizes:
            for batch in args.batches:
                rows += matrix_rows(args, device, size, batch, dtypes)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average before {load_before}, after {load_after}; median of {args.rounds} interleaved rounds\n")
    print_matrix(rows)

    if args.extras:
        table = Table()
        if "quality" in args.extras:
            ours, _ = build_models(args.seed, torch.device("cpu"), torch.float32)
            quality_rows(args, device, table, ours, "kl-f8 random weights", args.quality_size)
            if Path(args.demo_vae, "config.json").is_file():
                demo = AutoencoderKL.from_pretrained(args.demo_vae)
                quality_rows(args, device, table, demo, f"trained {Path(args.demo_vae).name} VAE", args.quality_size)
            else:
                table.add("bf16 quality on the trained demo VAE", f"skipped: no VAE at {args.demo_vae}")
        if "cache" in args.extras:
            cache_rows(args, device, table)
        if "train" in args.extras and device.type == "cpu":
            train_rows(args, table)
        print()
        table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
