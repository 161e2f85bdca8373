"""What this machine can do at best, measured through PyTorch: GEMM FLOP/s (fp32, bf16) and memory bandwidth.

These are the denominators of MFU and MBU in ``benchmarks/compare.py``. They are measured, not read off a
datasheet, so they already include what PyTorch's kernels achieve on this CPU (on CPUs without native bf16,
the bf16 figure is that of PyTorch's emulation). Every figure is the best of several repetitions with all
threads, which is what "peak" means on a machine shared with others.

With ``--device cuda`` the same figures are measured on the GPU (``measure_cuda``): the GEMM rates of one
large matmul and the bandwidth of a device-to-device copy, timed with CUDA events.

Run alone:  .venv/bin/python benchmarks/machine_limits.py [--json FILE] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

# Square-ish GEMMs large enough to amortise thread start-up, small enough for a 2-core machine.
GEMM_SIZES = (1024, 2048, 3072)
QUICK_GEMM_SIZES = (1024, 2048)
# 256 MiB per buffer: far beyond any last-level cache.
BANDWIDTH_BYTES = 256 * 1024 * 1024


def _best_time(fn, min_reps: int, budget_s: float) -> tuple[float, int]:
    """Best wall time of ``fn()`` over at least ``min_reps`` runs (more while ``budget_s`` lasts).

    A run slower than ``budget_s`` on its own (an emulated bf16 kernel on a big size) is timed once only."""
    t0 = time.perf_counter()
    fn()  # warm-up: page faults, thread pool, kernel selection
    first = time.perf_counter() - t0
    if first > budget_s:
        return first, 1
    best = float("inf")
    reps = 0
    start = time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
        if reps >= 50:
            break
    return best, reps


def _gemm_fn(variant: str, a, b, out):
    """One n×n GEMM on bf16/fp32 data, the way a kernel could compute it."""
    import torch
    import torch.nn.functional as F

    if variant == "matmul":  # PyTorch's own kernel for the dtype (native or emulated)
        return lambda: torch.matmul(a, b, out=out)
    if variant == "linear":  # F.linear: the oneDNN path that nn.Linear takes
        return lambda: F.linear(a, b)
    if variant == "upcast_fp32":  # bf16 data, fp32 arithmetic, result rounded back; conversions are timed
        return lambda: out.copy_(torch.matmul(a.float(), b.float()))
    raise ValueError(variant)


def gemm_flops(
    dtype_name: str, sizes=GEMM_SIZES, variant: str = "matmul", min_reps: int = 3, budget_s: float = 2.0
) -> dict[str, Any]:
    """Best FLOP/s of one GEMM variant on n×n by n×n (2·n³ FLOPs) for each n; ``peak_flops`` is the best.

    Sizes stop growing once one GEMM takes longer than ``budget_s`` (emulated bf16 runs at ~1 GFLOP/s on
    CPUs without native bf16: a 3072³ GEMM would take a minute)."""
    import torch

    dtype = getattr(torch, dtype_name)
    per_size = {}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        t, reps = _best_time(_gemm_fn(variant, a, b, out), min_reps, budget_s)
        per_size[str(n)] = {"flops": 2.0 * n**3 / t, "best_s": t, "reps": reps}
        del a, b, out
        if t > budget_s:
            break
    peak = max(v["flops"] for v in per_size.values())
    return {"peak_flops": peak, "variant": variant, "per_size": per_size}


def bf16_gemm_flops(sizes, budget_s: float) -> dict[str, Any]:
    """bf16 GEMM through PyTorch, three ways; ``peak_flops`` is the fastest.

    On CPUs with native bf16 (AVX-512 BF16, AMX) ``matmul`` wins. Without it PyTorch's bf16 GEMM is emulated
    and far slower than fp32, so a well-made bf16 engine converts to fp32 and uses the fp32 FMA units: the
    ``upcast_fp32`` variant measures that, and bounds what any bf16 engine can reach on such a CPU."""
    variants = {
        v: gemm_flops("bfloat16", sizes if v == "upcast_fp32" else sizes[:2], v, budget_s=budget_s)
        for v in ("matmul", "linear", "upcast_fp32")
    }
    best = max(variants, key=lambda v: variants[v]["peak_flops"])
    return {"peak_flops": variants[best]["peak_flops"], "best_variant": best, "variants": variants}


def memory_bandwidth(
    nbytes: int = BANDWIDTH_BYTES, min_reps: int = 5, budget_s: float = 2.0
) -> dict[str, Any]:
    """Bytes moved per second by a large tensor copy (read + write counted, as STREAM does) and by a sum
    (read only). ``peak`` is the larger: the best rate at which this machine streams memory through torch."""
    import torch

    n = nbytes // 4
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy, r_copy = _best_time(lambda: dst.copy_(src), min_reps, budget_s)
    t_sum, r_sum = _best_time(lambda: src.sum(), min_reps, budget_s)
    copy_bps = 2.0 * nbytes / t_copy
    read_bps = nbytes / t_sum
    return {
        "peak_bytes_per_s": max(copy_bps, read_bps),
        "copy_bytes_per_s": copy_bps,
        "read_bytes_per_s": read_bps,
        "buffer_bytes": nbytes,
        "reps": {"copy": r_copy, "sum": r_sum},
    }


def _native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def measure(quick: bool = False) -> dict[str, Any]:
    """All limits, with the thread count they were measured with."""
    import torch

    sizes = QUICK_GEMM_SIZES if quick else GEMM_SIZES
    budget = 0.5 if quick else 2.0
    t0 = time.perf_counter()
    result = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": os.getloadavg()[0],
        "gemm": {
            "float32": gemm_flops("float32", sizes, budget_s=budget),
            "bfloat16": bf16_gemm_flops(sizes, budget),
        },
        "memory_bandwidth": memory_bandwidth(budget_s=budget),
        "native_bf16": _native_bf16(),
    }
    result["seconds"] = time.perf_counter() - t0
    return result


# GPU: one GEMM size that fills the chip, and a copy far beyond its L2 (an H200 has 60 MB).
CUDA_GEMM_SIZE = 8192
CUDA_BANDWIDTH_BYTES = 2 * 2**30


def _cuda_median_s(fn, reps: int) -> float:
    """Median seconds of ``fn`` on the GPU (CUDA events around each call, after three warm-ups)."""
    import statistics

    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_cuda(quick: bool = False) -> dict[str, Any]:
    """The GPU's limits in ``measure``'s layout: GEMM FLOP/s on random data (fp32 without TF32, bf16) and the
    bytes/s of a large device-to-device copy (read + write) and of a sum (read)."""
    import torch

    dev = torch.device("cuda")
    reps = 5 if quick else 20
    t0 = time.perf_counter()
    gemm = {}
    for name in ("float32", "bfloat16"):
        n = CUDA_GEMM_SIZE
        gen = torch.Generator(device=dev).manual_seed(n)
        a = torch.randn(n, n, generator=gen, device=dev).to(getattr(torch, name))
        b = torch.randn(n, n, generator=gen, device=dev).to(getattr(torch, name))
        out = torch.empty_like(a)
        t = _cuda_median_s(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), reps)
        per = {"peak_flops": 2.0 * n**3 / t, "variant": "matmul", "per_size": {str(n): {"median_s": t}}}
        gemm[name] = (
            per if name == "float32" else {**per, "best_variant": "matmul", "variants": {"matmul": per}}
        )
        del a, b, out
    n = CUDA_BANDWIDTH_BYTES // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    copy_bps = 2.0 * CUDA_BANDWIDTH_BYTES / _cuda_median_s(lambda: dst.copy_(src), reps)
    read_bps = CUDA_BANDWIDTH_BYTES / _cuda_median_s(lambda: src.sum(), reps)
    return {
        "device": f"cuda ({torch.cuda.get_device_name(dev)})",
        "torch_version": torch.__version__,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "gemm": gemm,
        "memory_bandwidth": {
            "peak_bytes_per_s": max(copy_bps, read_bps),
            "copy_bytes_per_s": copy_bps,
            "read_bytes_per_s": read_bps,
            "buffer_bytes": CUDA_BANDWIDTH_BYTES,
            "reps": {"copy": reps, "sum": reps},
        },
        "native_bf16": True,
        "seconds": time.perf_counter() - t0,
    }


def summary_line(limits: dict[str, Any]) -> str:
    g = limits["gemm"]
    bw = limits["memory_bandwidth"]
    return (
        f"GEMM fp32 {g['float32']['peak_flops'] / 1e9:.1f} GFLOP/s, bf16 {g['bfloat16']['peak_flops'] / 1e9:.1f} "
        f"GFLOP/s (best way: {g['bfloat16']['best_variant']}; native bf16 matmul "
        f"{g['bfloat16']['variants']['matmul']['peak_flops'] / 1e9:.1f}); memory {bw['peak_bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f}, "
        f"read {bw['read_bytes_per_s'] / 1e9:.1f}); "
        + (limits.get("device") or f"{limits['torch_threads']} threads")
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="Also write the figures as JSON here ('-' for stdout).")
    p.add_argument("--quick", action="store_true", help="Smaller sizes and fewer reps (a rough figure).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Measure the CPU or the GPU.")
    args = p.parse_args()
    limits = measure_cuda(quick=args.quick) if args.device == "cuda" else measure(quick=args.quick)
    if args.json == "-":
        print(json.dumps(limits, indent=2))
        return 0
    print(summary_line(limits))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(limits, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
