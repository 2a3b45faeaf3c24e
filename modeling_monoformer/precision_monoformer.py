"""Which floating-point type to run on a device: bfloat16 where the hardware computes it natively, else float32.

Not imported by the model or pipeline files (they follow the dtype of their weights); scripts and benchmarks call it.
"""

import torch


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether `device` runs bfloat16 matmuls natively, so that bf16 is faster than fp32 rather than emulated.

    CUDA: `torch.cuda.is_bf16_supported()` (compute capability 8.0 and up). CPU: oneDNN with AVX512-BF16 or AMX
    tiles (e.g. Xeon Cooper Lake / Sapphire Rapids and later, Zen 4); elsewhere bf16 runs through fp32 conversions.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        native = [getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return torch.backends.mkldnn.is_available() and any(native)
    return False


def preferred_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """`torch.bfloat16` where `bf16_supported(device)`, else `torch.float32` (the fallback)."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A `--dtype` command-line value (`"auto"`, `"float32"`, `"bfloat16"`) -> a torch dtype; `"auto"` detects."""
    if name == "auto":
        return preferred_dtype(device)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"`dtype` must be 'auto', 'float32' or 'bfloat16', got {name!r}.")
    return getattr(torch, name)


__all__ = ["bf16_supported", "preferred_dtype", "resolve_dtype"]
