"""Device facts in one place: which device, which dtype is fast there, how much memory is free.

This is the only package that touches ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it is unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def simd_flags() -> str:
    """The CPU's SIMD flags that matter for the matmuls (avx2, avx512*, amx*), sorted, as one line for benchmark
    records ("unknown" where /proc/cpuinfo has none)."""
    return " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512", "amx")))) or "unknown"


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was asked for but no CUDA GPU is visible; use device='cpu' or 'auto'."
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda (got {name!r}).")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on GPUs and on CPUs with native bf16 math, else fp32 (bf16 is emulated and slow)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)} (got {name!r}).")
    return DTYPES[name]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """Around a forward pass: the kernels ``scaled_dot_product_attention`` may pick on ``device``.

    On CUDA, every one but cuDNN's, which PyTorch may prefer on Hopper: it builds a graph for each new shape, and
    a decode step's key length grows every step. On an H200 a decode attention call took 42 ms by default and
    65 µs without cuDNN (``benchmarks/sdpa_backends.py``; docs/performance.md, GPU). Flash and memory-efficient
    attention need no build."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def available_memory_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_summary(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    isa = [
        f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx2", "fma") if f in cpu_flags()
    ]
    return f"cpu ({os.cpu_count()} cores, {' '.join(isa) or 'no SIMD flags read'}, {torch.get_num_threads()} threads)"
