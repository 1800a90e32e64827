"""The path choice of `diffusers_vae_ext.hardware` for every kind of machine (CPUs and GPUs faked), the dtype parser."""

from __future__ import annotations

import sys

import pytest
import torch

from diffusers_vae_ext import hardware
from diffusers_vae_ext.hardware import CPUInfo, choose_path, parse_dtype

SAPPHIRE_RAPIDS = CPUInfo("Intel Xeon Platinum 8480+", "AVX512", 2, amx_bf16=True, avx512_bf16=True,
                          avx512_fp16=True, avx512=True, avx2=True)  # fmt: skip
ZEN4 = CPUInfo("AMD EPYC 9654", "AVX512", 2, avx512_bf16=True, avx512=True, avx2=True)
SKYLAKE = CPUInfo("Intel Xeon Gold 6148", "AVX512", 2, avx512=True, avx2=True)
HASWELL = CPUInfo("Intel Xeon E5-2680 v3", "AVX2", 2, avx2=True)


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("FLOAT", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("auto", "auto"),
    ],
)
def test_parse_dtype_accepts_every_spelling(spelling, expected):
    assert parse_dtype(spelling) == expected


def test_parse_dtype_refuses_unknown_spellings_and_says_which_work():
    with pytest.raises(ValueError, match="bf16/bfloat16"):
        parse_dtype("bf32")
    with pytest.raises(ValueError, match="Unknown dtype 'auto'"):
        parse_dtype("auto", allow_auto=False)
    with pytest.raises(ValueError, match="Unsupported dtype"):
        parse_dtype(torch.int8)


@pytest.mark.parametrize(
    "cpu, dtype, autocast, reason",
    [
        (SAPPHIRE_RAPIDS, torch.bfloat16, "bf16", "AMX-BF16"),
        (ZEN4, torch.bfloat16, "bf16", "AVX512-BF16"),
        # bf16 is emulated without AMX-BF16/AVX512-BF16: slower than fp32, so never chosen.
        (SKYLAKE, torch.float32, "no", "no native bf16"),
        (HASWELL, torch.float32, "no", "no native bf16"),
    ],
    ids=["amx", "avx512-bf16", "avx512-only", "avx2-only"],
)
def test_cpu_path_follows_what_the_cpu_offers(cpu, dtype, autocast, reason):
    path = choose_path("cpu", cpu=cpu)
    assert path.dtype == dtype
    assert path.mixed_precision == autocast
    assert path.memory_format == torch.channels_last  # oneDNN's layout, whatever the dtype
    assert not path.cudnn_benchmark
    assert reason in path.reason
    line = hardware.describe_path(path)
    assert cpu.model in line and "\n" not in line
    assert ("no AMX" in line) != cpu.amx_bf16


@pytest.mark.parametrize(
    "capability, dtype, memory_format",
    [((9, 0), torch.bfloat16, torch.channels_last), ((8, 0), torch.bfloat16, torch.channels_last),
     ((7, 5), torch.float32, torch.contiguous_format)],
)  # fmt: skip
def test_cuda_path_dispatch(capability, dtype, memory_format):
    path = choose_path("cuda", cuda_capability=capability)
    assert path.device.type == "cuda"
    assert path.dtype == dtype
    assert path.autocast_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else None)
    assert path.memory_format == memory_format
    assert path.sdpa and path.cudnn_benchmark


def test_working_memory_format():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert hardware.working_memory_format(cpu, torch.float32) == torch.channels_last
    assert hardware.working_memory_format(cpu, torch.bfloat16) == torch.channels_last
    assert hardware.working_memory_format(cuda, torch.float16) == torch.channels_last
    assert hardware.working_memory_format(cuda, torch.bfloat16) == torch.channels_last
    # fp32 on CUDA: no tensor-core layout to gain, keep the caller's layout.
    assert hardware.working_memory_format(cuda, torch.float32) == torch.contiguous_format


def test_configure_backends_switches_cuda_flags_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cuda, "enable_flash_sdp", lambda on: calls.append(("flash", on)))
    monkeypatch.setattr(torch.backends.cuda, "enable_mem_efficient_sdp", lambda on: calls.append(("mem", on)))
    hardware.configure_backends(choose_path("cpu", cpu=ZEN4))
    assert torch.backends.cudnn.benchmark is False and calls == []
    hardware.configure_backends(choose_path("cuda", cuda_capability=(8, 6)))
    assert torch.backends.cudnn.benchmark is True
    assert calls == [("flash", True), ("mem", True)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_detected_cpu_matches_proc_cpuinfo():
    flags = hardware._cpu_flags()
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags here")
    info = hardware.cpu_info()
    assert info.avx512_bf16 == ("avx512_bf16" in flags)
    assert info.amx_bf16 == ("amx_bf16" in flags)
    assert info.avx2 == ("avx2" in flags)
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.threads == torch.get_num_threads()


def test_announce_path_prints_once_per_device_and_dtype(capsys, monkeypatch):
    monkeypatch.setattr(hardware, "_announced", set())
    monkeypatch.delenv("DIFFUSERS_VAE_EXT_QUIET", raising=False)
    monkeypatch.setattr(hardware, "cpu_info", lambda: SKYLAKE)
    hardware.announce_path("cpu", torch.bfloat16)
    hardware.announce_path("cpu", torch.bfloat16)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    # Asking for bf16 where it is emulated is allowed, with a word that it is the slower choice here.
    assert "bfloat16" in lines[0] and "slower than float32" in lines[0]
    hardware.announce_path("cpu", torch.float32)
    assert "(note:" not in capsys.readouterr().err
