"""The CPU kernels (``cpu_kernels.cpp``: quantized matmuls, RMSNorm, paged decode attention), compiled on
first use for this CPU and cached on disk.

Why a compiled kernel: decoding one token streams every weight from memory once, and PyTorch's CPU int8/int4
weight-only matmuls (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are 10-50x slower than an
fp32 GEMV on AVX2 machines, so they lose to plain fp32 weights. The kernel is a C ABI loaded with ctypes:
it needs only a C++ compiler (no ninja, no torch headers), builds in about a second, and is keyed by its
source, flags and the CPU's feature flags so a cache shared between machines never runs foreign code.
When no compiler is found the quantized layers fall back to dequantized fp32 weights (and say so once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tidellm.model_executor.loader.named_models import cache_root
from tidellm.platforms import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BLOCK = 32  # elements per quantization block (both formats)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """The kernel library could not be built or loaded here; the message says why."""


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _build(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run(
            [cxx, *FLAGS, str(SOURCE), "-o", str(tmp_so)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise KernelUnavailable(f"{cxx} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (built first if this source/CPU has no cached build). Raises
    KernelUnavailable with the reason when that is impossible."""
    cxx = _compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (install g++ or set $CXX)")
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join([cxx, *FLAGS, *sorted(cpu_flags())]).encode())
    path = cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not path.exists():
        t0 = time.perf_counter()
        _build(cxx, path)
        logger.info("Built the CPU quantized-matmul kernels in %.1f s (%s)", time.perf_counter() - t0, path)
    torch.get_num_threads()  # torch (and with it its libgomp) is loaded before ours, so both share one pool
    lib = ctypes.CDLL(str(path))
    lib.tide_q4_1_gemm.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr]
    lib.tide_q4_1_gemm.restype = None
    lib.tide_q8_0_gemm.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr]
    lib.tide_q8_0_gemm.restype = None
    lib.tide_q4_1_dequant.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _ptr]
    lib.tide_q4_1_dequant.restype = None
    lib.tide_q8_0_dequant.argtypes = [_ptr, _ptr, _i64, _i64, _ptr]
    lib.tide_q8_0_dequant.restype = None
    lib.tide_q4_1_dequant_bf16.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _ptr]
    lib.tide_q4_1_dequant_bf16.restype = None
    lib.tide_q8_0_dequant_bf16.argtypes = [_ptr, _ptr, _i64, _i64, _ptr]
    lib.tide_q8_0_dequant_bf16.restype = None
    lib.tide_rms_norm.argtypes = [_ptr, _ptr, _ptr, ctypes.c_float, _i64, _i64, _ptr]
    lib.tide_rms_norm.restype = None
    lib.tide_rms_norm_bf16.argtypes = lib.tide_rms_norm.argtypes
    lib.tide_rms_norm_bf16.restype = None
    lib.tide_paged_decode.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr] + [_i64] * 5 + [
        ctypes.c_float, _ptr,
    ]  # fmt: skip
    lib.tide_paged_decode.restype = None
    lib.tide_paged_decode_bf16.argtypes = lib.tide_paged_decode.argtypes
    lib.tide_paged_decode_bf16.restype = None
    lib.tide_q4_1_gemm_bf16.argtypes = lib.tide_q4_1_gemm.argtypes
    lib.tide_q4_1_gemm_bf16.restype = None
    lib.tide_q8_0_gemm_bf16.argtypes = lib.tide_q8_0_gemm.argtypes
    lib.tide_q8_0_gemm_bf16.restype = None
    for name in ("tide_silu_mul", "tide_silu_mul_bf16"):
        getattr(lib, name).argtypes = [_ptr, _i64, _i64, _ptr]
        getattr(lib, name).restype = None
    for name in ("tide_rope", "tide_rope_bf16"):
        getattr(lib, name).argtypes = [_ptr] + [_i64] * 5 + [_ptr, _i64]
        getattr(lib, name).restype = None
    for name in ("tide_kv_write", "tide_kv_write_bf16"):
        getattr(lib, name).argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr]
        getattr(lib, name).restype = None
    for fmt in ("q4_1", "q8_0"):  # the vdpbf16ps entries take the block kernel's arguments, bf16 or fp32 out
        for out in ("", "_f32"):
            getattr(lib, f"tide_{fmt}_gemm_bf16dp{out}").argtypes = getattr(lib, f"tide_{fmt}_gemm").argtypes
            getattr(lib, f"tide_{fmt}_gemm_bf16dp{out}").restype = _i64
    lib.tide_has_vnni.restype = _i64
    for name in ("tide_gemm_i8_bf16", "tide_gemm_i8_bf16_f32", "tide_gemm_i8_f32"):
        getattr(lib, name).argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr]
        getattr(lib, name).restype = _i64
    lib.tide_has_bf16dp.restype = _i64
    for name in ("tide_run_layers", "tide_run_layers_bf16"):
        getattr(lib, name).argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64]
        getattr(lib, name).restype = None
    lib.tide_sample.argtypes = [_ptr, _i64, _i64] + [_ptr] * 6
    lib.tide_sample.restype = None
    lib.tide_truncation_threshold.argtypes = [_ptr, _i64, ctypes.c_float, _i64, ctypes.c_float]
    lib.tide_truncation_threshold.restype = ctypes.c_float
    lib.tide_simd_level.restype = ctypes.c_int
    return lib


def available() -> bool:
    try:
        library()
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        _warn_once(str(e))
        return False
    return True


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("Quantized CPU kernels unavailable (%s); using dequantized fp32 weights instead.", reason)


def matmul(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] contiguous times the blocks' [N, K] transposed -> [M, N] in x's dtype: fp32, or bf16 (widened
    to fp32 inside, the result rounded to nearest even as ``.to(torch.bfloat16)`` would).

    Q4_1 when ``m`` is given: q [N, K/32, 16] uint8, d and m [N, K/32] fp32; else Q8_0: q [N, K/32, 32]
    int8, d [N, K/32]."""
    n_rows, k = x.shape
    bf16 = x.dtype == torch.bfloat16
    out = torch.empty(n_rows, q.shape[0], dtype=x.dtype)
    lib = library()
    if m is not None:
        (lib.tide_q4_1_gemm_bf16 if bf16 else lib.tide_q4_1_gemm)(
            x.data_ptr(), n_rows, k, q.data_ptr(), d.data_ptr(), m.data_ptr(), q.shape[0], out.data_ptr()
        )
    else:
        (lib.tide_q8_0_gemm_bf16 if bf16 else lib.tide_q8_0_gemm)(
            x.data_ptr(), n_rows, k, q.data_ptr(), d.data_ptr(), q.shape[0], out.data_ptr()
        )
    return out


def has_bf16_dot() -> bool:
    """Whether this build multiplies bf16 activations with vdpbf16ps (AVX-512 BF16 CPUs)."""
    return bool(library().tide_has_bf16dp())


def matmul_bf16_dot(
    x: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [M, K] bf16 contiguous times the blocks' [N, K] transposed -> [M, N] in ``out_dtype`` (bf16, or
    float32 left unrounded), each weight rounded to bf16 (as widening to bf16 for the GEMM does) and the
    products summed in fp32 by vdpbf16ps. Only where ``has_bf16_dot()``."""
    n_rows, k = x.shape
    out = torch.empty(n_rows, q.shape[0], dtype=out_dtype)
    lib = library()
    f32 = out_dtype == torch.float32
    if m is not None:
        done = (lib.tide_q4_1_gemm_bf16dp_f32 if f32 else lib.tide_q4_1_gemm_bf16dp)(
            x.data_ptr(), n_rows, k, q.data_ptr(), d.data_ptr(), m.data_ptr(), q.shape[0], out.data_ptr()
        )
    else:
        done = (lib.tide_q8_0_gemm_bf16dp_f32 if f32 else lib.tide_q8_0_gemm_bf16dp)(
            x.data_ptr(), n_rows, k, q.data_ptr(), d.data_ptr(), q.shape[0], out.data_ptr()
        )
    if not done:
        raise KernelUnavailable("this build has no AVX-512 BF16 kernels (check has_bf16_dot() first)")
    return out


def has_vnni() -> bool:
    """Whether this build has the int8 VNNI matmul (AVX-512 VNNI CPUs)."""
    return bool(library().tide_has_vnni())


def matmul_i8(x: torch.Tensor, w, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, contiguous) times block matrix ``w``'s [N, K] transposed -> [M, N] in
    ``out_dtype`` (default x's; fp32 out of bf16 x is allowed), with x quantized to int8 per block of 32 and
    int8 dot products (VNNI). Only where ``has_vnni()``."""
    n_rows, k = x.shape
    out_dtype = out_dtype or x.dtype
    p = w.panels()
    out = torch.empty(n_rows, w.shape[0], dtype=out_dtype)
    lib = library()
    if x.dtype == torch.bfloat16:
        fn = lib.tide_gemm_i8_bf16 if out_dtype == torch.bfloat16 else lib.tide_gemm_i8_bf16_f32
    elif x.dtype == torch.float32 and out_dtype == torch.float32:
        fn = lib.tide_gemm_i8_f32
    else:
        raise ValueError(f"int8 matmul takes bf16 or fp32 activations, got {x.dtype} -> {out_dtype}")
    done = fn(
        x.data_ptr(), n_rows, k, int(w.fmt == "q4_1"), p.q.data_ptr(), p.d.data_ptr(), p.extra.data_ptr(),
        w.shape[0], out.data_ptr(),
    )  # fmt: skip
    if not done:
        raise KernelUnavailable("this build has no AVX-512 VNNI kernels (check has_vnni() first)")
    return out


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    keys: torch.Tensor | None,
) -> torch.Tensor:
    """One token per row of fp32 ``logits`` [N, V] -> int64 [N]: the first argmax where ``temperature`` is
    <= 0 (or None: every row greedy), else a draw from softmax(logits / temperature) cut by top-k (int64, V =
    off), top-p (1 = off) and min-p (0 = off) as ``sampler.apply_top_k_top_p`` and min-p cut it. A row's draw
    is one uniform number that is a pure function of its ``keys`` entry (int64 [N]). Per-row tensors are [N]
    (float32 but top_k), or None where no row uses them."""
    logits = logits.contiguous()
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64)
    f32, i64 = torch.float32, torch.int64
    rows = ((temperature, f32), (top_k, i64), (top_p, f32), (min_p, f32), (keys, i64))
    args = [None if t is None else t.to(dtype).contiguous() for t, dtype in rows]  # kept alive for the call
    ptrs = [0 if t is None else t.data_ptr() for t in args]
    library().tide_sample(logits.data_ptr(), n, v, *ptrs, out.data_ptr())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for contiguous x [M, 2I], fp32 or bf16 -> [M, I] (SiluAndMul's result)."""
    rows, width = x.shape
    out = torch.empty(rows, width // 2, dtype=x.dtype)
    lib = library()
    (lib.tide_silu_mul_bf16 if x.dtype == torch.bfloat16 else lib.tide_silu_mul)(
        x.data_ptr(), rows, width // 2, out.data_ptr()
    )
    return out


def rotary_(x: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int) -> None:
    """Rotate x [T, n, D] in place (heads contiguous, any token stride) by cos_sin [T, R] (cos | sin halves,
    x's dtype, the token's row): apply_rotary's result for the first ``rotary_dim`` dimensions of each head."""
    ntok, n, d = x.shape
    lib = library()
    (lib.tide_rope_bf16 if x.dtype == torch.bfloat16 else lib.tide_rope)(
        x.data_ptr(), ntok, x.stride(0), n, d, rotary_dim, cos_sin.data_ptr(), cos_sin.stride(0)
    )


def kv_write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (heads contiguous, any token stride) into kv_cache [2, NB, bs, Hkv, D] (contiguous, the
    same dtype) at slot_mapping [T] int64 (contiguous)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    lib = library()
    (lib.tide_kv_write_bf16 if k.dtype == torch.bfloat16 else lib.tide_kv_write)(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k.shape[0], num_kv_heads * head_dim,
        kv_cache.data_ptr(), num_blocks * block_size, slot_mapping.data_ptr(),
    )  # fmt: skip


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The blocks as rows of ``out`` [N, K] (contiguous, fp32 or bf16: bf16 rounds to nearest even)."""
    n, k = out.shape
    lib = library()
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize writes float32 or bfloat16, not {out.dtype}")
    bf16 = out.dtype == torch.bfloat16
    if m is not None:
        fn = lib.tide_q4_1_dequant_bf16 if bf16 else lib.tide_q4_1_dequant
        fn(q.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, out.data_ptr())
    else:
        fn = lib.tide_q8_0_dequant_bf16 if bf16 else lib.tide_q8_0_dequant
        fn(q.data_ptr(), d.data_ptr(), n, k, out.data_ptr())
    return out


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Contiguous x [..., H], fp32 or bf16 (residual and weight alike): ``x += residual`` in place (when
    given), returns rms_norm(x) * weight, rounded as ``F.rms_norm`` rounds."""
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(
            f"rms_norm needs x and weight both float32 or both bfloat16 (got {x.dtype}, {weight.dtype})"
        )
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    lib = library()
    (lib.tide_rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.tide_rms_norm)(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
        x.numel() // hidden, hidden, out.data_ptr(),
    )  # fmt: skip
    return out


def paged_decode(
    q: torch.Tensor,  # [T, H, D] fp32 or bf16, inner two dims contiguous
    rows: torch.Tensor,  # [B] int64: the token row of each decode query
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D] contiguous, q's dtype
    block_table: torch.Tensor,  # [B, max_blocks] int64 contiguous
    seq_lens: torch.Tensor,  # [B] int64
    scale: float,
    out: torch.Tensor,  # [T, H, D] contiguous, q's dtype; rows ``rows`` are written
    window: int = 0,
) -> None:
    """Decode attention read in place from the paged cache; fp32 math whatever the storage dtype.

    ``window > 0`` is a sliding-window layer: a query at position p sees only keys at positions > p - window
    (Mistral's and Gemma 3's convention), and blocks holding older keys are not read at all."""
    if not q.dtype == kv_cache.dtype == out.dtype or q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"paged_decode needs q, kv_cache and out all float32 or all bfloat16 (got {q.dtype})"
        )
    if window < 0:
        raise ValueError(f"paged_decode needs window >= 0 (0: no window), got {window}")
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    lib = library()
    fn = lib.tide_paged_decode_bf16 if q.dtype == torch.bfloat16 else lib.tide_paged_decode
    fn(
        q.data_ptr(), q.stride(0), rows.data_ptr(), kv_cache.data_ptr(), num_blocks, block_size,
        block_table.data_ptr(), block_table.shape[1], seq_lens.data_ptr(), window, rows.shape[0], q.shape[1],
        num_kv_heads, head_dim, scale, out.data_ptr(),
    )  # fmt: skip


# ---------------------------------------------------------------- fused layers (models/fused_layers.py)
class Blocks(ctypes.Structure):
    """A block-quantized matrix: codes, scales, Q4_1 minimums (null for Q8_0), its [rows, cols], and its
    panels for the int8 kernel (null when not used)."""

    _fields_ = [
        ("q", _ptr), ("d", _ptr), ("m", _ptr), ("rows", _i64), ("cols", _i64),
        ("panel_q", _ptr), ("panel_d", _ptr), ("panel_extra", _ptr),
    ]  # fmt: skip

    @classmethod
    def of(cls, w, panels: bool = False) -> Blocks:
        """``w``: a QuantizedTensor; ``panels``: also point at (and build) its int8 panels."""
        p = w.panels() if panels else None
        return cls(
            w.q.data_ptr(), w.d.data_ptr(), None if w.m is None else w.m.data_ptr(), *w.shape,
            *((p.q.data_ptr(), p.d.data_ptr(), p.extra.data_ptr()) if p is not None else (None, None, None)),
        )  # fmt: skip


class Layer(ctypes.Structure):
    """One decoder layer's weights and KV cache for ``run_layers``."""

    _fields_ = [
        ("norm1", _ptr), ("norm2", _ptr), ("qkv", Blocks), ("o", Blocks), ("gate_up", Blocks), ("down", Blocks),
        ("kv", _ptr), ("window", _i64),
    ]  # fmt: skip


class Step(ctypes.Structure):
    """The step's shapes, per-row inputs and scratch buffers for ``run_layers``."""

    _fields_ = [
        *((name, _i64) for name in (
            "rows", "hidden", "heads", "kv_heads", "head_dim", "rotary_dim", "inter", "num_blocks", "block_size",
            "max_blocks", "dot_min_rows", "int8",
        )),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        *((name, _ptr) for name in (
            "cos_sin", "slots", "block_table", "seq_lens", "row_ids", "normed", "qkv", "attn", "gate_up", "act",
        )),
    ]  # fmt: skip


def run_layers(
    layers: ctypes.Array, step: Step, a: torch.Tensor, b: torch.Tensor, has_residual: bool
) -> None:
    """Run ``len(layers)`` decoder layers on the step's rows: ``a`` holds their input and receives their
    output, ``b`` the residual stream in and out (fp32 or bf16, contiguous [rows, hidden])."""
    lib = library()
    fn = lib.tide_run_layers_bf16 if a.dtype == torch.bfloat16 else lib.tide_run_layers
    fn(
        ctypes.addressof(layers),
        len(layers),
        ctypes.addressof(step),
        a.data_ptr(),
        b.data_ptr(),
        int(has_residual),
    )
