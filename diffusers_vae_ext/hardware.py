"""What the machine offers, and which execution path (dtype, memory format, autocast, backend flags) fits it.

One place decides, from what the processor reports, how the package runs a VAE:

* **CPU.** oneDNN runs bfloat16 convolutions and matmuls natively on AMX-BF16 (Intel Sapphire Rapids and later)
  and on AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later): there bf16 is 2-4x faster than fp32, so the
  trainer autocasts to bf16 and `--dtype auto` picks bfloat16. Without them (AVX2, plain AVX512) bf16 is emulated
  and slower than fp32, so fp32 stays the default. float16 is never picked automatically: the Stable Diffusion VAEs
  overflow in float16 (`force_upcast`). Activations are channels_last (oneDNN's fastest layout) in every dtype.
* **CUDA.** bfloat16 on GPUs that support it (compute capability 8.0+), else fp32; channels_last for half-precision
  convolutions (cuDNN's tensor-core kernels are NHWC), attention through `scaled_dot_product_attention` (flash or
  memory-efficient kernels), and `cudnn.benchmark` so cuDNN times its algorithms once per shape.

`describe_path()` is the one-line summary the CLI (`diffusers-vae info`), the trainer and the benchmarks print.
`parse_dtype()` is the one parser of dtype spellings (`fp32`/`float32`, `bf16`/`bfloat16`, `fp16`/`float16`/`half`,
`auto`) used by every command.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass, field

import torch

__all__ = [
    "CPUInfo",
    "ExecutionPath",
    "announce_path",
    "choose_path",
    "configure_backends",
    "cpu_info",
    "describe_path",
    "dtype_name",
    "parse_dtype",
    "resolve_dtype",
    "working_memory_format",
]

# ------------------------------------------------------------------------------------------------ dtypes
_DTYPE_SPELLINGS = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_CHOICES = "fp32/float32, bf16/bfloat16, fp16/float16 or auto"


def parse_dtype(value: str | torch.dtype, allow_auto: bool = True) -> torch.dtype | str:
    """A dtype from any of its spellings: `fp32`/`float32`/`float`, `bf16`/`bfloat16`, `fp16`/`float16`/`half`,
    a `torch.dtype`, or (with `allow_auto`) `"auto"`, returned as the string `"auto"` for `resolve_dtype` to settle.

    Args:
        value (`str` or `torch.dtype`): the spelling, case-insensitive; `torch.` prefixes are accepted.
        allow_auto (`bool`, defaults to `True`): whether `"auto"` is accepted.

    Raises `ValueError` naming the accepted spellings for anything else.
    """
    if isinstance(value, torch.dtype):
        if value not in _SHORT_NAMES:
            raise ValueError(f"Unsupported dtype {value}: use float32, bfloat16 or float16.")
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key == "auto" and allow_auto:
        return "auto"
    if key not in _DTYPE_SPELLINGS:
        accepted = DTYPE_CHOICES if allow_auto else DTYPE_CHOICES.replace(" or auto", "")
        raise ValueError(f"Unknown dtype {value!r}: use {accepted}.")
    return _DTYPE_SPELLINGS[key]


def dtype_name(dtype: torch.dtype, short: bool = False) -> str:
    """`"float32"`-style name of `dtype`, or with `short=True` the `"fp32"`-style one."""
    return _SHORT_NAMES[dtype] if short else str(dtype).removeprefix("torch.")


def resolve_dtype(value: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """`parse_dtype(value)`, with `"auto"` settled to the dtype `choose_path(device)` picks for inference."""
    dtype = parse_dtype(value)
    return choose_path(device).dtype if dtype == "auto" else dtype


# ------------------------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class CPUInfo:
    """What the CPU offers to PyTorch's kernels.

    Args:
        model (`str`): the processor's name (`/proc/cpuinfo`'s "model name" on Linux).
        capability (`str`): `torch.backends.cpu.get_cpu_capability()`, the widest vector ISA PyTorch's own kernels
            use: `"AVX512"`, `"AVX2"`, `"DEFAULT"`, or an ARM/POWER name.
        threads (`int`): `torch.get_num_threads()`.
        amx_bf16, avx512_bf16, avx512_fp16, amx_fp16, avx512, avx2 (`bool`): instruction-set extensions.
    """

    model: str
    capability: str
    threads: int
    amx_bf16: bool = False
    avx512_bf16: bool = False
    avx512_fp16: bool = False
    amx_fp16: bool = False
    avx512: bool = False
    avx2: bool = False

    @property
    def native_bf16(self) -> bool:
        """Whether oneDNN has native bf16 kernels here (AMX-BF16 tiles or AVX512-BF16 dot products)."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def native_fp16(self) -> bool:
        """Whether float16 arithmetic is native here (AMX-FP16 or AVX512-FP16)."""
        return self.amx_fp16 or self.avx512_fp16

    def isa(self) -> str:
        """The extensions that matter for the path choice, e.g. `"AVX512, AVX512-BF16, no AMX"`."""
        parts = [
            name for name, present in (("AVX512", self.avx512), ("AVX2", self.avx2 and not self.avx512)) if present
        ]
        parts += [name for name, present in (("AMX-BF16", self.amx_bf16), ("AMX-FP16", self.amx_fp16)) if present]
        parts += [
            n for n, present in (("AVX512-BF16", self.avx512_bf16), ("AVX512-FP16", self.avx512_fp16)) if present
        ]
        if not (self.amx_bf16 or self.amx_fp16):
            parts.append("no AMX")
        return ", ".join(parts) or self.capability


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_cpu_check(name: str) -> bool | None:
    # torch.cpu._is_*_supported() ask the cpuinfo library (works off Linux too); private, so optional.
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if check is not None else None
    except Exception:  # noqa: BLE001 - a probe that fails means "unknown", not an error
        return None


@functools.lru_cache(maxsize=1)
def _detect_cpu_features() -> tuple[str, dict[str, bool]]:
    flags = _cpu_flags()

    def has(torch_check: str, *flag_names: str) -> bool:
        found = _torch_cpu_check(torch_check) if torch_check else None
        return found if found is not None else any(name in flags for name in flag_names)

    features = dict(
        amx_bf16=has("_is_amx_tile_supported", "amx_bf16") and ("amx_bf16" in flags or not flags),
        avx512_bf16=has("_is_avx512_bf16_supported", "avx512_bf16"),
        avx512_fp16="avx512_fp16" in flags,
        amx_fp16=has("_is_amx_fp16_supported", "amx_fp16"),
        avx512=has("_is_avx512_supported", "avx512f"),
        avx2=has("_is_avx2_supported", "avx2"),
    )
    return _cpu_model(), features


def cpu_info() -> CPUInfo:
    """Detect the CPU (cached; the thread count is read on every call)."""
    model, features = _detect_cpu_features()
    return CPUInfo(
        model=model, capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(), **features
    )


# ------------------------------------------------------------------------------------------------ the path
@dataclass(frozen=True)
class ExecutionPath:
    """How the package runs a VAE on one device.

    Args:
        device (`torch.device`): where the model runs.
        dtype (`torch.dtype`): the inference dtype `auto` resolves to (weights and activations).
        autocast_dtype (`torch.dtype`, *optional*): the trainer's default mixed precision (weights stay fp32);
            `None` means full fp32 training.
        memory_format (`torch.memory_format`): the activation layout of the fast path for `dtype`.
        sdpa (`bool`): attention runs through `torch.nn.functional.scaled_dot_product_attention`.
        cudnn_benchmark (`bool`): `configure_backends` turns on `torch.backends.cudnn.benchmark`.
        reason (`str`): why, in a few words.
        cpu (`CPUInfo`, *optional*): the detected CPU, for CPU paths.
    """

    device: torch.device
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format
    sdpa: bool = True
    cudnn_benchmark: bool = False
    reason: str = ""
    cpu: CPUInfo | None = field(default=None, compare=False)

    @property
    def mixed_precision(self) -> str:
        """The trainer's default `--mixed_precision`: `"bf16"`, `"fp16"` or `"no"`."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "no"}[self.autocast_dtype]


def choose_path(
    device: str | torch.device | None = None,
    cpu: CPUInfo | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> ExecutionPath:
    """The execution path for `device` (default: CUDA when available, else CPU).

    Args:
        device (`str` or `torch.device`, *optional*): the device the model will run on.
        cpu (`CPUInfo`, *optional*): the CPU to decide for; detected when not given (tests pass their own).
        cuda_capability (`tuple[int, int]`, *optional*): the GPU's compute capability; read from the device when
            not given.
    """
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        if cuda_capability is None:
            cuda_capability = torch.cuda.get_device_capability(device)
        bf16 = cuda_capability >= (8, 0)
        dtype = torch.bfloat16 if bf16 else torch.float32
        return ExecutionPath(
            device=device,
            dtype=dtype,
            autocast_dtype=torch.bfloat16 if bf16 else None,
            memory_format=working_memory_format(device, dtype),
            sdpa=True,
            cudnn_benchmark=True,
            reason=f"compute capability {cuda_capability[0]}.{cuda_capability[1]}: "
            + ("bf16 tensor cores" if bf16 else "no bf16 tensor cores, fp32 (fp16 overflows SD VAEs)"),
        )
    if device.type != "cpu":
        # MPS, XPU, ...: no measurement to base a choice on; keep the exact default.
        return ExecutionPath(device, torch.float32, None, torch.contiguous_format, reason=f"{device.type}: fp32")
    cpu = cpu or cpu_info()
    if cpu.native_bf16:
        unit = "AMX-BF16 tiles" if cpu.amx_bf16 else "AVX512-BF16"
        return ExecutionPath(
            device, torch.bfloat16, torch.bfloat16, torch.channels_last, reason=f"native bf16 ({unit})", cpu=cpu
        )
    return ExecutionPath(
        device,
        torch.float32,
        None,
        torch.channels_last,
        reason="no native bf16 (no AMX-BF16 or AVX512-BF16): bf16 would be emulated, slower than fp32",
        cpu=cpu,
    )


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def working_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The activation layout of the fast path: channels_last on CPU (oneDNN) and for half precision on CUDA
    (cuDNN's tensor-core kernels are NHWC); the caller's layout otherwise."""
    if device.type == "cpu" or (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        return torch.channels_last
    return torch.contiguous_format


def describe_path(path: ExecutionPath | None = None) -> str:
    """One line: the device, what it offers and the chosen path, e.g.
    `cpu AMD EPYC, 2 threads (AVX512, AVX512-BF16, no AMX): native bf16 (AVX512-BF16); auto dtype bfloat16,
    training autocast bf16, channels_last`."""
    path = path or choose_path()
    if path.device.type == "cpu" and path.cpu is not None:
        where = f"cpu {path.cpu.model}, {path.cpu.threads} threads ({path.cpu.isa()})"
    elif path.device.type == "cuda":
        index = path.device.index if path.device.index is not None else 0
        name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else "GPU"
        where = f"cuda {name}"
    else:
        where = path.device.type
    layout = "channels_last" if path.memory_format == torch.channels_last else "contiguous"
    extras = ", SDPA attention, cudnn.benchmark" if path.cudnn_benchmark else ""
    return (
        f"{where}: {path.reason}; auto dtype {dtype_name(path.dtype)}, training autocast {path.mixed_precision}, "
        f"{layout}{extras}"
    )


def configure_backends(path: ExecutionPath) -> None:
    """Apply the path's global backend switches: `cudnn.benchmark` and the SDPA kernels on CUDA; nothing on CPU."""
    if path.device.type != "cuda":
        return
    if path.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if path.sdpa:
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)


def _native_on_cpu(cpu: CPUInfo, dtype: torch.dtype) -> bool:
    return {torch.bfloat16: cpu.native_bf16, torch.float16: cpu.native_fp16}.get(dtype, True)


_announced: set[tuple[str, str]] = set()


def announce_path(device: str | torch.device | None = None, dtype: torch.dtype | None = None, stream=None) -> None:
    """Print once per process and (device, dtype) which path is in use, e.g. for a CLI command's stderr.

    Args:
        device (`str` or `torch.device`, *optional*): the device in use (default: `choose_path`'s).
        dtype (`torch.dtype`, *optional*): the dtype in use; a warning is added when it is slower here than fp32.
        stream (*optional*): where to print; default `sys.stderr`. `DIFFUSERS_VAE_EXT_QUIET=1` silences it.
    """
    path = choose_path(device)
    dtype = dtype or path.dtype
    key = (str(path.device), str(dtype))
    if key in _announced or os.environ.get("DIFFUSERS_VAE_EXT_QUIET"):
        return
    _announced.add(key)
    note = ""
    if path.cpu is not None and not _native_on_cpu(path.cpu, dtype):
        note = f" (note: {dtype_name(dtype)} is emulated on this CPU and slower than float32)"
    print(f"diffusers-vae: running {dtype_name(dtype)} on {describe_path(path)}{note}", file=stream or sys.stderr)


def distributed_state():
    """accelerate's `PartialState` for this process, CPU runs of several processes included.

    `accelerate launch --multi_gpu` with `ACCELERATE_USE_CPU=true` (how several CPU processes are started) needs
    `cpu=True` here too, or each process sets itself up as a world of one and repeats the whole job.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
