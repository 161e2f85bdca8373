"""Vectorized dequantization of GGUF block types in numpy, written from ggml's block layouts.

Why not ``gguf.quants.dequantize``: it loops over groups of 16 rows; here all blocks of a chunk are done at
once, about twice as fast, and dequantization is most of a GGUF model's start-up time. numpy rather than
torch on purpose: it is single-threaded, while torch's OpenMP threads spin and slow down by an order of
magnitude when the cores are shared (as on these 2-core machines with a busy neighbour).
Each function takes raw blocks ``[n, type_size]`` (uint8) and returns ``[n, block_size]`` float32; the
layouts follow ggml-quants.c ``dequantize_row_*``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte ``start`` of every block, as float32 ``[n, 1]``."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, k]`` bytes -> ``[n, 2k]``: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def q8_0(blocks: np.ndarray) -> np.ndarray:  # d: f16, qs: int8[32]
    return _f16(blocks, 0) * np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32)


def q4_0(blocks: np.ndarray) -> np.ndarray:  # d: f16, qs: u8[16]
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:18]).astype(np.float32) - 8)


def q4_1(blocks: np.ndarray) -> np.ndarray:  # d, m: f16, qs: u8[16]
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]).astype(np.float32) + _f16(blocks, 2)


def q5_0(blocks: np.ndarray) -> np.ndarray:  # d: f16, qh: u32 (5th bits), qs: u8[16]
    high = np.unpackbits(
        blocks[:, 2:6], axis=1, bitorder="little"
    )  # [n, 32]: bit j of qh = value j's 5th bit
    q = _nibbles(blocks[:, 6:22]) | (high << 4)
    return _f16(blocks, 0) * (q.astype(np.float32) - 16)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4), each ``[n, 8]``."""
    s = scales.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> ``[n, 8, 32]``: 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def q4_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin: f16, scales: u8[12], qs: u8[128]
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:144]).astype(np.float32)
    y = _f16(blocks, 0)[:, :, None] * sc[:, :, None] * q - _f16(blocks, 2)[:, :, None] * mn[:, :, None]
    return y.reshape(-1, 256)


def q5_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin: f16, scales: u8[12], qh: u8[32], qs: u8[128]
    sc, mn = _k_scales(blocks[:, 4:16])
    # bit j of qh[l] is the 5th bit of value l of sub-block j: [n, 32, 8] -> [n, 8, 32]
    high = np.unpackbits(blocks[:, 16:48, None], axis=2, bitorder="little").transpose(0, 2, 1)
    q = (_k_low_nibbles(blocks[:, 48:176]) | (high << 4)).astype(np.float32)
    y = _f16(blocks, 0)[:, :, None] * sc[:, :, None] * q - _f16(blocks, 2)[:, :, None] * mn[:, :, None]
    return y.reshape(-1, 256)


def q6_k(blocks: np.ndarray) -> np.ndarray:  # ql: u8[128], qh: u8[64], scales: i8[16], d: f16
    ql = blocks[:, 0:128].reshape(-1, 2, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    lo, hi = ql[:, :, :32], ql[:, :, 32:]
    q = np.stack(  # [n, half, k, 32]: value 128*half + 32*k + l
        [
            (lo & 0x0F) | ((qh & 3) << 4),
            (hi & 0x0F) | (((qh >> 2) & 3) << 4),
            (lo >> 4) | (((qh >> 4) & 3) << 4),
            (hi >> 4) | (((qh >> 6) & 3) << 4),
        ],
        axis=2,
    )
    q = q.reshape(-1, 2, 4, 2, 16).astype(np.float32) - 32
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)
    return (_f16(blocks, 208).reshape(-1, 1, 1, 1, 1) * sc * q).reshape(-1, 256)


BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q4_0: q4_0,
    Q.Q4_1: q4_1,
    Q.Q5_0: q5_0,
    Q.Q8_0: q8_0,
    Q.Q4_K: q4_k,
    Q.Q5_K: q5_k,
    Q.Q6_K: q6_k,
}
