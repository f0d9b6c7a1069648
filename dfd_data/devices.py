"""Choosing the torch device (`auto` means CUDA when present, else the CPU), the number of
CPU threads torch may use, and the precision and memory layout networks infer in."""
from __future__ import annotations

import contextlib
import functools

import torch

from .errors import DeviceError
from .runner import thread_budget

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A torch.device for `name` (a torch.device passes through), checked to exist."""
    if not isinstance(name, torch.device):
        if name not in DEVICE_CHOICES:
            raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
        name = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if name.type == "cuda" and (not torch.cuda.is_available() or (name.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"--device {name} was asked for, but torch sees {torch.cuda.device_count()} CUDA "
                          "device(s)")
    return name


@contextlib.contextmanager
def cpu_threads(threads: int | None = None):
    """Let torch use `threads` (default: thread_budget(); torch's own default can be fewer
    under some launchers) for the duration, then restore the previous setting so callers
    running several workers are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or thread_budget())
    try:
        yield
    finally:
        torch.set_num_threads(before)


PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively: CUDA GPUs that support it, and CPUs with
    AMX tiles (Intel Xeon since Sapphire Rapids), where oneDNN runs bf16 convolutions several
    times faster than fp32. Elsewhere bf16 is emulated and slower than fp32 (torch's own check
    counts emulation as support unless told not to: a V100 or T4 would pass it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and "amx_bf16" in _cpu_flags()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of network inference: `auto` is bf16 where native (see native_bf16)
    and fp32 elsewhere; `fp32` computes in float32 everywhere (TF32 is turned off on CUDA by
    prepare_for_inference), so machines agree to float32 rounding."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """The --precision value that computes in `dtype` ("fp32" or "bf16")."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def prepare_for_inference(model: torch.nn.Module, device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """Eval mode on `device`, rewritten for inference (see inference_graph: batch norms folded,
    weights cast once for bf16 compute), with channels-last weights (the layout oneDNN and
    cuDNN convolve fastest) and `model.compute_dtype` set for `compute_precision`. The
    process's allocator is told to keep freed activations for the next call (see allocator)."""
    from .allocator import keep_freed_memory
    from .inference_graph import rewrite_for_inference

    keep_freed_memory()
    model = model.to(device).eval()
    model.compute_dtype = resolve_precision(precision, device)
    if model.compute_dtype == torch.float32:
        no_tf32(device)
    return rewrite_for_inference(model, model.compute_dtype).to(memory_format=torch.channels_last)


def no_tf32(device: torch.device) -> None:
    """float32 means float32: on `device` CUDA, turn off TF32 (10-bit mantissas), which CUDA
    convolutions use by default on Ampere and newer GPUs, for the process."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def weights_as_computed(weight: torch.Tensor, bias: torch.Tensor | None, device_type: str
                        ) -> tuple[torch.dtype, torch.Tensor, torch.Tensor | None]:
    """The dtype a convolution computes in where it is called (the autocast dtype under
    autocast, else its weights' dtype) and its weight and bias in that dtype: for layers that
    call a kernel autocast does not know, which would otherwise compute with float32 weights
    where a Conv2d would cast them."""
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    if weight.dtype != dtype:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return dtype, weight, bias


def compute_precision(model: torch.nn.Module, device: torch.device):
    """Autocast to the model's compute dtype (see prepare_for_inference): inputs and the
    layers whose weights stay float32 (norms) follow it."""
    dtype = getattr(model, "compute_dtype", torch.float32)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
