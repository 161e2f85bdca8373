"""Dequantization of every supported GGUF type.

Three checks: (1) hand-built raw blocks decoded by a scalar reference written from the ggml
block layouts (ggml-quants.c ``dequantize_row_*``), for every quantized type including the K-quants the
Python ``gguf`` package cannot quantize; (2) bit-exact agreement with the ``gguf`` package's decoder; (3) for the
types it can quantize, a full GGUF file written with ``GGUFWriter`` and read back within the format's
rounding tolerance.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tidellm.model_executor.loader import ModelLoadError, load_model_source
from tidellm.model_executor.loader.gguf_file import GGUFFile
from tidellm.model_executor.loader.gguf_weights import SUPPORTED_GGUF_TYPES, dequantize

Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(1234)


def f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def f16v(b: bytes) -> float:
    return float(np.frombuffer(b, dtype=np.float16)[0])


# ---------------------------------------------------------------- scalar references, one block each
def ref_q4_0(b: bytes) -> list[float]:
    d, qs = f16v(b[:2]), b[2:18]
    return [d * ((q & 15) - 8) for q in qs] + [d * ((q >> 4) - 8) for q in qs]


def ref_q4_1(b: bytes) -> list[float]:
    d, m, qs = f16v(b[:2]), f16v(b[2:4]), b[4:20]
    return [d * (q & 15) + m for q in qs] + [d * (q >> 4) + m for q in qs]


def ref_q5_0(b: bytes) -> list[float]:
    d, qh, qs = f16v(b[:2]), int.from_bytes(b[2:6], "little"), b[6:22]
    lo = [d * (((q & 15) | (((qh >> j) & 1) << 4)) - 16) for j, q in enumerate(qs)]
    hi = [d * (((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) for j, q in enumerate(qs)]
    return lo + hi


def ref_q8_0(b: bytes) -> list[float]:
    d = f16v(b[:2])
    return [d * q for q in np.frombuffer(b[2:34], dtype=np.int8).tolist()]


def k_scale_min(j: int, s: bytes) -> tuple[int, int]:
    """6-bit scale and min of sub-block j from the 12 packed bytes (get_scale_min_k4)."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q4_k(b: bytes) -> list[float]:
    d, dmin, scales, qs = f16v(b[:2]), f16v(b[2:4]), b[4:16], b[16:144]
    out = []
    for chunk in range(4):  # 64 values: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
        q = qs[32 * chunk : 32 * chunk + 32]
        sc1, m1 = k_scale_min(2 * chunk, scales)
        sc2, m2 = k_scale_min(2 * chunk + 1, scales)
        out += [d * sc1 * (x & 15) - dmin * m1 for x in q]
        out += [d * sc2 * (x >> 4) - dmin * m2 for x in q]
    return out


def ref_q5_k(b: bytes) -> list[float]:
    d, dmin, scales, qh, qs = f16v(b[:2]), f16v(b[2:4]), b[4:16], b[16:48], b[48:176]
    out = []
    for chunk in range(4):
        q = qs[32 * chunk : 32 * chunk + 32]
        sc1, m1 = k_scale_min(2 * chunk, scales)
        sc2, m2 = k_scale_min(2 * chunk + 1, scales)
        u1, u2 = 1 << (2 * chunk), 2 << (2 * chunk)
        out += [d * sc1 * ((x & 15) + (16 if qh[i] & u1 else 0)) - dmin * m1 for i, x in enumerate(q)]
        out += [d * sc2 * ((x >> 4) + (16 if qh[i] & u2 else 0)) - dmin * m2 for i, x in enumerate(q)]
    return out


def ref_q6_k(b: bytes) -> list[float]:
    ql, qh, sc, d = b[:128], b[128:192], np.frombuffer(b[192:208], dtype=np.int8).tolist(), f16v(b[208:210])
    out = [0.0] * 256
    for half in range(2):  # 128 values each
        L, H, S, base = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for i in range(32):
            s = i // 16
            q1 = ((L[i] & 15) | (((H[i] >> 0) & 3) << 4)) - 32
            q2 = ((L[i + 32] & 15) | (((H[i] >> 2) & 3) << 4)) - 32
            q3 = ((L[i] >> 4) | (((H[i] >> 4) & 3) << 4)) - 32
            q4 = ((L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4)) - 32
            out[base + i] = d * S[s] * q1
            out[base + i + 32] = d * S[s + 2] * q2
            out[base + i + 64] = d * S[s + 4] * q3
            out[base + i + 96] = d * S[s + 6] * q4
    return out


def rand(n: int) -> bytes:
    return RNG.integers(0, 256, n, dtype=np.uint8).tobytes()


# type -> (reference, block builder with finite fp16 scales and random quants)
BLOCKS = {
    Q.Q4_0: (ref_q4_0, lambda: f16(0.37) + rand(16)),
    Q.Q4_1: (ref_q4_1, lambda: f16(0.21) + f16(-1.5) + rand(16)),
    Q.Q5_0: (ref_q5_0, lambda: f16(-0.125) + rand(4) + rand(16)),
    Q.Q8_0: (ref_q8_0, lambda: f16(0.0123) + rand(32)),
    Q.Q4_K: (ref_q4_k, lambda: f16(0.05) + f16(0.02) + rand(12) + rand(128)),
    Q.Q5_K: (ref_q5_k, lambda: f16(0.03) + f16(0.01) + rand(12) + rand(32) + rand(128)),
    Q.Q6_K: (ref_q6_k, lambda: rand(128) + rand(64) + rand(16) + f16(0.004)),
}


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_hand_built_blocks_match_spec(qtype):
    ref, build = BLOCKS[qtype]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 3, 2
    raw_blocks = [[build() for _ in range(blocks_per_row)] for _ in range(rows)]
    assert all(len(b) == block_bytes for row in raw_blocks for b in row)
    raw = np.frombuffer(b"".join(b for row in raw_blocks for b in row), dtype=np.uint8).reshape(rows, -1)
    got = dequantize(raw, qtype, (rows, blocks_per_row * block_elems))
    expected = torch.tensor([[v for b in row for v in ref(b)] for row in raw_blocks], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_bit_exact_with_gguf_package(qtype):
    """Our vectorized kernels and the gguf package's decoder agree exactly on many blocks."""
    _, build = BLOCKS[qtype]
    raw = np.frombuffer(b"".join(build() for _ in range(64 * 3)), dtype=np.uint8).reshape(64, -1)
    cols = 3 * gguf.GGML_QUANT_SIZES[qtype][0]
    assert np.array_equal(dequantize(raw, qtype, (64, cols)).numpy(), gguf.quants.dequantize(raw, qtype))


def test_every_supported_type_is_covered():
    covered = set(BLOCKS) | {Q.F32, Q.F16, Q.BF16}
    assert covered == set(SUPPORTED_GGUF_TYPES)


# ---------------------------------------------------------------- through a real file
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0]
# Worst-case error relative to the largest magnitude: Q4_0/Q5_0 scale by the signed block maximum, so the
# opposite end of the range can be a whole step short.
REL_TOL = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q4_0: 0.13, Q.Q4_1: 0.07, Q.Q5_0: 0.07, Q.Q8_0: 0.006}


def _file_with(tmp_path, gguf_writer, tensors):
    return GGUFFile(
        gguf_writer(tmp_path / "q.gguf", "llama", {"block_count": 1}, tensors, with_tokenizer=False)
    )


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_write_read(tmp_path, gguf_writer, qtype):
    w = RNG.standard_normal((8, 96)).astype(np.float32)
    if qtype == Q.BF16:
        # GGUFWriter takes BF16 as raw uint16; write the top half of the float32 bits (round to nearest even).
        bits = w.view(np.uint32)
        raw16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        writer_tensors = [("w", raw16.view(np.uint8).reshape(8, -1), qtype)]
        f = _file_with(tmp_path, _raw_writer(gguf_writer), writer_tensors)
    else:
        f = _file_with(tmp_path, gguf_writer, [("w", w, qtype)])
    info = f.tensors["w"]
    assert info.qtype == qtype and info.shape == (8, 96)
    got = dequantize(f.raw(info), info.qtype, info.shape)
    expected_dtype = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
    assert got.dtype == expected_dtype
    err = (got.float() - torch.from_numpy(w)).abs().max().item()
    assert err <= REL_TOL[qtype] * np.abs(w).max() + 1e-7
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(f.raw(info), qtype)))


def _raw_writer(gguf_writer):
    """A writer that stores already-encoded bytes (for BF16, which quantize() handles but add_tensor needs raw)."""

    def write(path, arch, metadata, tensors, with_tokenizer=False):
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_uint32(f"{arch}.block_count", 1)
        for name, raw, qtype in tensors:
            writer.add_tensor(name, raw, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write


def test_large_tensor_is_dequantized_in_chunks(monkeypatch):
    import tidellm.model_executor.loader.gguf_weights as gw

    w = RNG.standard_normal((64, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q8_0)
    whole = dequantize(raw, Q.Q8_0, w.shape)
    monkeypatch.setattr(gw, "_CHUNK_ELEMENTS", 64 * 5)  # 5 rows per chunk, last chunk partial
    assert torch.equal(dequantize(raw, Q.Q8_0, w.shape), whole)


def test_unsupported_type_is_a_clear_error(tmp_path, gguf_writer):
    meta = {"block_count": 1, "embedding_length": 32, "feed_forward_length": 32, "attention.head_count": 1}
    w = RNG.standard_normal((4, 32)).astype(np.float32)
    path = gguf_writer(tmp_path / "q51.gguf", "llama", meta, [("token_embd.weight", w, Q.Q5_1)])
    with pytest.raises(ModelLoadError, match=r"Q5_1.*Supported: F32, F16, BF16, Q4_0.*Q6_K"):
        load_model_source(str(path), cache_dir=str(tmp_path))
