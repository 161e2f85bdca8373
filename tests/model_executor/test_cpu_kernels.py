"""The compiled CPU kernels against PyTorch references: block matmuls (every row-tile size and the widen +
BLAS path for large batches), exact GGUF block conversion, re-quantization error bounds, the fused
add + RMSNorm, and decode attention read straight from the paged cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.layers.attention import AttentionMetadata, sdpa_backend
from tidellm.model_executor.loader.gguf_weights import dequantize
from tidellm.model_executor.quant import method as quant_method
from tidellm.model_executor.quant.blocks import QuantizedTensor
from tidellm.platforms import cpu_flags

Q = GGMLQuantizationType
pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the CPU kernels")

# Every test runs against the build for this CPU and against the AVX2 and plain C++ builds, so an AVX-512
# machine also checks the code paths of the AVX2 machines (and the other way round for what they can run).
ISA_FLAGS: dict[str, list[str] | None] = {
    "native": None,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
SIMD_LEVEL = {"generic": 0, "avx2": 2}  # native: 3 with AVX-512 F+BW, else 2 with AVX2+FMA, else 0


@pytest.fixture(autouse=True, params=list(ISA_FLAGS))
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    flags = ISA_FLAGS[request.param]
    if request.param == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    if flags is not None:
        monkeypatch.setattr(
            cpu_kernels, "FLAGS", [f for f in cpu_kernels.FLAGS if f != "-march=native"] + flags
        )
    cpu_kernels.library.cache_clear()
    yield request.param
    cpu_kernels.library.cache_clear()


def test_simd_level(isa: str) -> None:
    flags = cpu_flags()
    native = 3 if {"avx512f", "avx512bw"} <= flags else 2 if {"avx2", "fma"} <= flags else 0
    assert cpu_kernels.library().tide_simd_level() == SIMD_LEVEL.get(isa, native)


def random_gguf_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid raw blocks: random codes, finite fp16 scales (and mins)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    n_f16 = 2 if qtype == Q.Q4_1 else 1
    scales = rng.uniform(-0.05, 0.05, size=(raw.shape[0], n_f16)).astype(np.float16)
    raw[:, : 2 * n_f16] = scales.view(np.uint8).reshape(raw.shape[0], 2 * n_f16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_convert_without_changing_values(qtype: GGMLQuantizationType) -> None:
    raw = random_gguf_blocks(qtype, 12, 96)
    qt = QuantizedTensor.from_gguf(raw, qtype, (12, 96))
    ref = dequantize(raw, qtype, (12, 96))
    if qtype == Q.Q4_0:  # d * (q - 8) vs d * q + (-8 d): equal up to one rounding
        torch.testing.assert_close(qt.dequantize(), ref, rtol=0, atol=1e-6)
    else:
        assert torch.equal(qt.dequantize(), ref)
    # the widening kernel gives the same numbers as the torch reference, in fp32 and rounded to bf16
    out = torch.empty(12, 96)
    assert torch.equal(cpu_kernels.dequantize(qt.q, qt.d, qt.m, out), qt.dequantize())
    out16 = torch.empty(12, 96, dtype=torch.bfloat16)
    assert torch.equal(cpu_kernels.dequantize(qt.q, qt.d, qt.m, out16), qt.dequantize().bfloat16())


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 33, 70])
def test_block_matmul_matches_dense(fmt: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_method, "MAX_KERNEL_ROWS", {fmt: 32})  # 33 and 70 rows take the widen path
    torch.manual_seed(rows)
    w = torch.randn(50, 96)
    qt = QuantizedTensor.quantize(w, fmt)
    x = torch.randn(rows, 96)
    ref = x @ qt.dequantize().T  # the dense product of exactly the stored weights
    block = quant_method.BlockQuantMethod(fmt, quant_method.DenseScratch())
    got = block.matmul(x, qt)  # kernel up to MAX_KERNEL_ROWS rows, widen + BLAS above
    assert got.shape == (rows, 50)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # the raw kernel too, whatever the batch size (the LM head at 64 rows uses it directly)
    torch.testing.assert_close(cpu_kernels.matmul(x, qt.q, qt.d, qt.m), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_bf16_batches(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations: small batches through the kernel (fp32 math, the result rounded to bf16 once, or
    fp32 when asked), large ones through the GEMM on weights widened to bf16 (native bf16 CPUs) or fp32
    (others); all close to the dense product."""
    monkeypatch.setattr(quant_method, "MAX_KERNEL_ROWS", {fmt: 8})
    monkeypatch.setattr(quant_method, "MAX_KERNEL_ROWS_BF16", {fmt: 8})
    torch.manual_seed(1)
    qt = QuantizedTensor.quantize(torch.randn(50, 96), fmt)
    block = quant_method.BlockQuantMethod(fmt, quant_method.DenseScratch())
    for native in (True, False):
        monkeypatch.setattr(quant_method, "cpu_has_native_bf16", lambda native=native: native)
        for rows in (3, 6, 40):
            x = torch.randn(rows, 96).bfloat16()
            ref = x.float() @ qt.dequantize().T
            got = block.matmul(x, qt)
            if rows == 6 and native and cpu_kernels.has_bf16_dot():  # MIN_DOT_ROWS..MAX_DOT_ROWS: vdpbf16ps
                assert torch.equal(got, cpu_kernels.matmul_bf16_dot(x, qt.q, qt.d, qt.m))
                torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=0.15)
                continue
            if rows <= 8:
                exact = block.matmul(x, qt, fp32_out=True)
                assert got.dtype == torch.bfloat16 and exact.dtype == torch.float32
                assert torch.equal(got, exact.bfloat16())  # one rounding, as .to(torch.bfloat16)
                torch.testing.assert_close(exact, ref, rtol=2e-2, atol=1e-4)
                continue
            assert got.dtype == (torch.bfloat16 if native else torch.float32)
            torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=0.15 if native else 1e-4)


def test_widen_path_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix bigger than the scratch slice (the LM head) is widened a slice of rows at a time."""
    monkeypatch.setattr(quant_method, "SCRATCH_FLOATS", 96 * 7)  # 7 rows per slice: 50 rows -> 8 slices
    monkeypatch.setattr(quant_method, "MAX_KERNEL_ROWS", {"q8_0": 32})
    qt = QuantizedTensor.quantize(torch.randn(50, 96), "q8_0")
    x = torch.randn(40, 96)
    got = quant_method.BlockQuantMethod("q8_0", quant_method.DenseScratch()).matmul(x, qt)
    torch.testing.assert_close(got, x @ qt.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt,levels", [("q8_0", 127), ("q4_1", 15)])
def test_quantize_error_is_half_a_step(fmt: str, levels: int) -> None:
    w = torch.randn(64, 128) * torch.linspace(0.01, 3, 128)
    qt = QuantizedTensor.quantize(w, fmt)
    blocks = w.view(64, 4, 32)
    span = blocks.abs().amax(-1) if fmt == "q8_0" else blocks.amax(-1) - blocks.amin(-1)
    step = span / levels  # the block's scale d
    err = (qt.dequantize() - w).abs().view(64, 4, 32).amax(-1)
    assert torch.all(err <= step / 2 * 1.001 + 1e-7)
    # a constant block (d = 0) round-trips exactly
    const = QuantizedTensor.quantize(torch.full((2, 32), 0.5), fmt).dequantize()
    assert torch.allclose(const, torch.full((2, 32), 0.5), atol=0 if fmt == "q4_1" else 0.5 / 127)


def test_rows_and_copy_rows() -> None:
    qt = QuantizedTensor.quantize(torch.randn(6, 64), "q4_1")
    perm = torch.tensor([5, 0, 3, 1, 2, 4])
    assert torch.equal(qt.rows(perm).dequantize(), qt.dequantize()[perm])
    merged = QuantizedTensor.empty("q4_1", 10, 64)
    merged.copy_rows_(4, qt)
    assert torch.equal(merged.rows(torch.arange(4, 10)).dequantize(), qt.dequantize())
    with pytest.raises(ValueError, match="cannot copy a q8_0"):
        merged.copy_rows_(0, QuantizedTensor.quantize(torch.randn(2, 64), "q8_0"))


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_rms_norm_kernel(rows: int) -> None:
    x, res, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    ref_sum = x + res
    ref = F.rms_norm(ref_sum, (576,), w, 1e-5)
    out = cpu_kernels.rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(x, ref_sum)  # the residual sum is left in x
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, None, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5))


@pytest.mark.parametrize("rows", [1, 40])
def test_rms_norm_kernel_bf16(rows: int) -> None:
    """bf16: the same roundings as the torch reference, so the same bits."""
    torch.manual_seed(rows)
    x, res, w = (torch.randn(*s).bfloat16() for s in ((rows, 576), (rows, 576), (576,)))
    ref_sum = x + res
    ref = F.rms_norm(ref_sum, (576,), w, 1e-5)
    out = cpu_kernels.rms_norm(x, res, w, 1e-5)
    assert torch.equal(x, ref_sum)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        cpu_kernels.rms_norm(x, None, w.float(), 1e-5)


def _step(
    q_lens: list[int], seq_lens: list[int], table: np.ndarray, bs: int
) -> tuple[AttentionMetadata, list[int]]:
    """A step's attention metadata (requests with these query and context lengths, blocks from ``table``) and
    the cache slots of its tokens."""
    q_lens, seq_lens = np.array(q_lens), np.array(seq_lens)
    slots = [
        int(table[r, p // bs]) * bs + p % bs
        for r in range(len(q_lens))
        for p in range(seq_lens[r] - q_lens[r], seq_lens[r])
    ]
    meta = AttentionMetadata.build(
        query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]), seq_lens=seq_lens, block_table=table,
        slot_mapping=np.array(slots), block_size=bs, device=torch.device("cpu"),
    )  # fmt: skip
    return meta, slots


@pytest.mark.parametrize("dim", [16, 64])
def test_paged_decode_matches_gathered_sdpa(dim: int) -> None:
    """Decodes of different lengths, interleaved with a prefill chunk, from scattered blocks."""
    torch.manual_seed(0)
    heads, kv_heads, bs, num_blocks = 6, 2, 4, 40
    kv = torch.randn(2, num_blocks, bs, kv_heads, dim)
    table = np.random.default_rng(0).permutation(num_blocks)[:16].reshape(4, 4)
    # request 1 is a 3-token prefill chunk (prefix 2)
    meta, _ = _step([1, 3, 1, 1], [9, 5, 13, 1], table, bs)
    qsl = np.array([0, 1, 4, 5, 6])
    q = torch.randn(int(qsl[-1]), heads + kv_heads, dim)[:, :heads]  # a strided view, like the model's
    d = meta.decode
    out = torch.zeros(int(qsl[-1]), heads, dim)
    cpu_kernels.paged_decode(q, d.rows, kv, d.block_ids, d.seq_lens, 0.25, out)
    ref = torch.zeros_like(out)
    sdpa_backend._decode(q, kv, meta, d, 0.25, ref)
    rows = d.rows.tolist()
    assert rows == [0, 4, 5]
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_splits_uneven_rows_by_work(dtype: torch.dtype) -> None:
    """Rows of very different lengths (a 300-token prefill chunk's rows see 1..300 keys, then decodes of 700 and
    5): enough work for the threads, which split it by keys, not by rows; every row comes out as it does
    computed alone (on one thread), bit for bit."""
    torch.manual_seed(3)
    heads, kv_heads, dim, bs = 6, 2, 64, 16
    lens = [*range(1, 301), 700, 5]
    kv = torch.randn(2, 48, bs, kv_heads, dim).to(dtype)
    table = torch.randperm(48)[:44].repeat(len(lens), 1)  # every row reads the same 44 blocks
    q = torch.randn(len(lens), heads, dim).to(dtype)
    seq_lens = torch.tensor(lens)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        out = torch.full_like(q, float("nan"))
        cpu_kernels.paged_decode(q, torch.arange(len(lens)), kv, table, seq_lens, 0.125, out)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 1, 150, 298, 299, 300, 301):
        alone = torch.full_like(q[:1], float("nan"))
        cpu_kernels.paged_decode(
            q[r : r + 1], torch.tensor([0]), kv, table[:1], seq_lens[r : r + 1], 0.125, alone
        )
        assert torch.equal(out[r], alone[0]), r
    assert not out.isnan().any()


@pytest.mark.parametrize("dim", [16, 64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (8, 1), (4, 4)])
def test_paged_decode_bf16_matches_fp32(dim: int, heads: int, kv_heads: int) -> None:
    """bf16 cache and query: the same attention as fp32 on the bf16-rounded values (fp32 math; on AVX-512
    BF16 builds the scores are vdpbf16ps sums, so the order of the additions differs): nearly all equal, the
    rest one bf16 unit apart (at the scale of the terms, which can cancel).
    Head sizes 64/128/256 take the compile-time-unrolled kernels, 16 the generic one; lengths from 1 to 50
    cover whole and partial groups of 16 keys, and 1-8 query heads per KV head the passes over the values."""
    torch.manual_seed(2)
    bs, num_blocks = 16, 40
    kv = torch.randn(2, num_blocks, bs, kv_heads, dim).bfloat16()
    seq_lens = torch.tensor([11, 6, 50, 1, 16, 83])
    table = torch.tensor(np.random.default_rng(0).permutation(num_blocks)[:36].reshape(6, 6))
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    q = torch.randn(6, heads, dim).bfloat16()
    out16 = torch.zeros(6, heads, dim, dtype=torch.bfloat16)
    cpu_kernels.paged_decode(q, rows, kv, table, seq_lens, 0.25, out16)
    out32 = torch.zeros(6, heads, dim)
    cpu_kernels.paged_decode(q.float(), rows, kv.float(), table, seq_lens, 0.25, out32)
    torch.testing.assert_close(out16.float(), out32.bfloat16().float(), rtol=8e-3, atol=1e-3)
    assert (out16 == out32.bfloat16()).float().mean() > 0.99
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        cpu_kernels.paged_decode(q, rows, kv.float(), table, seq_lens, 0.25, out16)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_attention_in_one_kernel_call(
    dtype: torch.dtype, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of decodes, a prefill chunk after a cached prefix and a fresh prompt: on CPU every query row
    goes to the in-place kernel as a query with its own causal length (AttentionMetadata.query_rows), in one
    call; the SDPA path (gathers, masks, one call per chunk) gives the same attention."""
    from tidellm.model_executor.layers.attention.sdpa_backend import paged_sdpa_attention

    torch.manual_seed(4)
    heads, kv_heads, dim, bs, num_blocks = 6, 2, 64, 4, 40
    kv = torch.randn(2, num_blocks, bs, kv_heads, dim).to(dtype)
    table = np.random.default_rng(2).permutation(num_blocks)[:16].reshape(4, 4)
    # a decode, a chunk after 7 cached tokens, a decode, a fresh 6-token prompt
    meta, slots = _step([1, 4, 1, 6], [9, 11, 13, 6], table, bs)
    meta = meta.for_window(window or None)
    rows = meta.query_rows()
    assert rows.seq_lens.tolist() == [9, 8, 9, 10, 11, 13, 1, 2, 3, 4, 5, 6]
    assert rows.window == window
    n = len(slots)
    q = torch.randn(n, heads, dim).to(dtype)
    k = kv[0].view(-1, kv_heads, dim)[slots]  # this step's keys and values, as already written to the cache
    v = kv[1].view(-1, kv_heads, dim)[slots]
    calls = []
    real = cpu_kernels.paged_decode
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda *a: calls.append(1) or real(*a))
    got = paged_sdpa_attention(q, k, v, kv, meta, 0.25)
    assert len(calls) == 1
    monkeypatch.setattr(sdpa_backend, "_use_cpu_kernel", lambda q, kv_cache: False)
    ref = paged_sdpa_attention(q, k, v, kv, meta, 0.25)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


def _windowed_reference(q, kv, table, seq_lens, rows, window, scale):
    """Attention of each decode query over the keys at positions > len - 1 - window, from the table."""
    heads, kv_heads = q.shape[1], kv.shape[3]
    bs = kv.shape[2]
    out = torch.zeros(len(rows), heads, q.shape[2])
    for i, (row, length) in enumerate(zip(rows, seq_lens, strict=True)):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        slots = torch.as_tensor(table[i])[pos // bs] * bs + pos % bs
        k = kv[0].reshape(-1, kv_heads, kv.shape[4])[slots].float()  # [L, Hkv, D]
        v = kv[1].reshape(-1, kv_heads, kv.shape[4])[slots].float()
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1) for t in (k, v))  # [H, L, D]
        p = torch.softmax((q[row].float()[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)  # [H, 1, L]
        out[i] = (p @ v)[:, 0]
    return out


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_sliding_window_reads_only_the_window(dtype: torch.dtype, dim: int) -> None:
    """window > 0: keys at positions > len - 1 - window only; blocks wholly before the window (here filled
    with NaN, as if handed to another request) are never read, by the kernel or the gather path."""
    torch.manual_seed(3)
    heads, kv_heads, bs, window = 4, 2, 4, 6
    seq_lens = np.array([17, 5, 11, 6, 7])  # 5 and 6 fit the window; 7 starts it mid-block
    table = np.random.default_rng(1).permutation(40)[:25].reshape(5, 5)
    kv = torch.randn(2, 40, bs, kv_heads, dim)
    for r, length in enumerate(seq_lens):
        dead = max(0, length - window) // bs  # blocks before the one holding the window's first key
        kv[:, table[r, :dead]] = float("nan")
    kv = kv.to(dtype)
    qsl = np.arange(6)
    slots = [int(table[r, (n - 1) // bs]) * bs + (n - 1) % bs for r, n in enumerate(seq_lens)]
    meta = AttentionMetadata.build(
        query_start_loc=qsl, seq_lens=seq_lens, block_table=table, slot_mapping=np.array(slots),
        block_size=bs, device=torch.device("cpu"),
    )  # fmt: skip
    d = meta.for_window(window).decode
    assert d.window == window
    q = torch.randn(5, heads, dim).to(dtype)
    ref = _windowed_reference(q, kv, table, seq_lens, range(5), window, 0.25)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    out = torch.zeros(5, heads, dim, dtype=dtype)
    cpu_kernels.paged_decode(q, d.rows, kv, d.block_table, d.seq_lens, 0.25, out, d.window)
    torch.testing.assert_close(out.float(), ref, **tol)
    gathered = torch.zeros(5, heads, dim, dtype=dtype)
    sdpa_backend._decode(q, kv, meta, d, 0.25, gathered)
    torch.testing.assert_close(gathered.float(), ref, **tol)
    # Without the window the same call reads the poisoned blocks: the test can tell.
    cpu_kernels.paged_decode(q, d.rows, kv, d.block_table, d.seq_lens, 0.25, out)
    assert out[0].isnan().all()
    with pytest.raises(ValueError, match="window >= 0"):
        cpu_kernels.paged_decode(q, d.rows, kv, d.block_table, d.seq_lens, 0.25, out, -1)


# ---------------------------------------------------------------- the decode glue kernels
def _within_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to rounding: one bf16 unit in the last place, or four fp32 ones (FMA contraction and exp
    implementations differ by an fp32 ulp or two before a product rounds again)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    ulps = 1 if ref.dtype == torch.bfloat16 else 4
    ulp = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    assert bool(((got.float() - ref.float()).abs() <= ulp * ulps * 1.01 + 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    from tidellm.model_executor.layers.activation import SiluAndMul

    x = (torch.randn(5, 2 * 160) * 4).to(dtype)
    d = x.shape[1] // 2
    ref = torch.nn.functional.silu(x[:, :d]).mul_(x[:, d:])  # what SiluAndMul computed before the kernel
    got = cpu_kernels.silu_and_mul(x)
    _within_one_ulp(got, ref)
    assert torch.equal(SiluAndMul()(x), got)  # the module takes the kernel on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 48])
def test_rotary_in_place_matches_apply_rotary(dtype: torch.dtype, rotary_dim: int) -> None:
    """q and k heads as one strided slice of a wider qkv row, rotated in place; partial rotary leaves the
    rest of each head alone."""
    from tidellm.model_executor.layers.rotary import RotaryEmbedding, apply_rotary, rotate_owned

    heads, head_dim, ntok = 5, 64, 7
    rope = RotaryEmbedding(
        head_dim, 128, 10000.0, {"partial_rotary_factor": rotary_dim / head_dim}, dtype, torch.device("cpu")
    )
    positions = torch.tensor([0, 3, 9, 17, 64, 100, 127])
    cos, sin = rope(positions)
    qkv = torch.randn(ntok, (heads + 2) * head_dim).to(dtype)
    x = qkv[:, : heads * head_dim].view(ntok, heads, head_dim)
    ref = apply_rotary(x, cos, sin)
    untouched = qkv[:, heads * head_dim :].clone()
    got = rotate_owned(x, cos, sin)
    assert got.data_ptr() == x.data_ptr()  # in place, in the caller's buffer
    # x1 cos - x2 sin cancels: an FMA's single rounding shows up at the inputs' scale, not the result's.
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=8e-3, atol=4e-2)
        assert (got == ref).float().mean() > 0.99
    assert torch.equal(qkv[:, heads * head_dim :], untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_index_copy(dtype: torch.dtype) -> None:
    from tidellm.model_executor.layers.attention import write_kv_cache

    ntok, kv_heads, head_dim = 6, 3, 32
    kv = torch.zeros(2, 10, 4, kv_heads, head_dim, dtype=dtype)
    qkv = torch.randn(ntok, (4 + 2 * kv_heads) * head_dim).to(dtype)
    k = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(ntok, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim :].view(ntok, kv_heads, head_dim)
    slots = torch.tensor([0, 5, 6, 39, 17, 22])
    ref = kv.clone()
    ref[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    ref[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    write_kv_cache(kv, k, v, slots)
    assert torch.equal(kv, ref)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_bf16_dot_kernel(fmt: str) -> None:
    """vdpbf16ps on AVX-512 BF16 builds: the weights rounded to bf16 as the widen path rounds them, products
    summed in fp32; close to the bf16 GEMM on those widened weights for every row count."""
    if not cpu_kernels.has_bf16_dot():
        pytest.skip("this build has no AVX-512 BF16 kernel")
    torch.manual_seed(3)
    qt = QuantizedTensor.quantize(torch.randn(70, 160), fmt)
    wide = cpu_kernels.dequantize(qt.q, qt.d, qt.m, torch.empty(70, 160, dtype=torch.bfloat16))
    for rows in (1, 3, 4, 7, 16, 33):  # 70 weight rows: a last group of 2 behind tiles of 4
        x = torch.randn(rows, 160).bfloat16()
        got = cpu_kernels.matmul_bf16_dot(x, qt.q, qt.d, qt.m)
        ref = x.float() @ wide.float().T  # fp32 sums of exact bf16 products
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 70)
        torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=1e-2)
        # fp32 out (the LM head's logits): the same sums, not rounded to bf16
        got32 = cpu_kernels.matmul_bf16_dot(x, qt.q, qt.d, qt.m, torch.float32)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32, ref, rtol=1e-5, atol=1e-4)
        assert torch.equal(got32.bfloat16(), got)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8 kernel quantizes it: per block of 32, scale absmax / 127, round to nearest even."""
    b = x.float().reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127)).reshape(x.shape)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_int8_kernel(fmt: str) -> None:
    """VNNI builds: the exact product of the int8-rounded activations and the stored weights (up to fp32
    summation order), for every tile shape (1-4 rows, two panels or one, a last panel of fewer than 16 rows),
    bf16 or fp32 in, bf16 or fp32 out; and the panels cover the whole matrix."""
    if not cpu_kernels.has_vnni():
        pytest.skip("this build has no AVX-512 VNNI kernel")
    torch.manual_seed(5)
    for n in (50, 64, 96):  # 4 panels (the last of 2 rows), 4 whole panels (two pairs), 6 panels
        qt = QuantizedTensor.quantize(torch.randn(n, 160) * 0.1, fmt)
        assert qt.panels().q.shape == (-(-n // 16), 5, 256 if fmt == "q4_1" else 512)
        w = qt.dequantize()
        for rows in (1, 2, 3, 4, 7, 33):
            x = torch.randn(rows, 160) * 2
            x[0, :32] = 0  # an all-zero block (scale 0)
            ref = _int8_activations(x) @ w.T
            torch.testing.assert_close(cpu_kernels.matmul_i8(x, qt), ref, rtol=1e-5, atol=1e-5)
            xb = x.bfloat16()
            ref16 = _int8_activations(xb) @ w.T
            got32 = cpu_kernels.matmul_i8(xb, qt, torch.float32)
            torch.testing.assert_close(got32, ref16, rtol=1e-5, atol=1e-5)
            assert torch.equal(cpu_kernels.matmul_i8(xb, qt), got32.bfloat16())
    # a NaN activation reaches its row's outputs as NaN (as in the bf16 path), not as finite codes
    x = torch.randn(2, 160)
    x[0, 37] = float("nan")
    y = cpu_kernels.matmul_i8(x, qt)
    assert y[0].isnan().all() and not y[1].isnan().any()
    # a matrix changed after its panels were built gets new ones
    qt.copy_rows_(0, QuantizedTensor.quantize(torch.ones(2, 160), fmt))
    x = torch.randn(3, 160)
    torch.testing.assert_close(
        cpu_kernels.matmul_i8(x, qt), _int8_activations(x) @ qt.dequantize().T, rtol=1e-5, atol=1e-5
    )


def test_int8_activation_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: int8 only in bf16 and only with the kernel; int8 without it is an error naming the fix."""
    cpu = torch.device("cpu")
    assert not quant_method.int8_activations("none", torch.bfloat16, cpu)
    assert not quant_method.int8_activations("auto", torch.float32, cpu)
    assert quant_method.int8_activations("auto", torch.bfloat16, cpu) == cpu_kernels.has_vnni()
    monkeypatch.setattr(cpu_kernels, "has_vnni", lambda: False)
    assert not quant_method.int8_activations("auto", torch.bfloat16, cpu)
    with pytest.raises(ValueError, match="AVX-512 VNNI.*activation_quantization='none'"):
        quant_method.int8_activations("int8", torch.float32, cpu)
    with pytest.raises(ValueError, match="must be one of auto, int8, none"):
        quant_method.int8_activations("fp8", torch.float32, cpu)


def test_sample_kernel_argmax_and_truncated_draws() -> None:
    """The sampler's kernel on this build: the first argmax (ties, -inf, a tail past the vector width) and draws
    that follow torch's tempered, top-k/top-p/min-p-cut distribution (a chi-square bound, nothing outside it)."""
    from tidellm.sample.sampler import apply_top_k_top_p

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1003, generator=g)
    logits[1, 7] = logits[1, 900] = 50.0  # tied maxima: the first wins
    logits[2, :] = float("-inf")
    logits[2, 1002] = 0.0  # the only finite token, in the tail
    assert cpu_kernels.sample(logits, None, None, None, None, None).tolist() == logits.argmax(-1).tolist()

    v, n = 37, 8000
    row = torch.randn(v, generator=g) * 2.0
    row[5] = float("-inf")  # a masked token (a grammar's) is never drawn
    t, k, p, m = 0.9, 12, 0.8, 0.02
    x = apply_top_k_top_p((row / t).unsqueeze(0), torch.tensor([k]), torch.tensor([p]))
    probs = torch.softmax(x, -1)[0]
    probs = probs.masked_fill(probs < m * probs.max(), 0.0)
    probs /= probs.sum()
    full = lambda value, dtype=torch.float32: torch.full((n,), value, dtype=dtype)  # noqa: E731
    draws = cpu_kernels.sample(
        row.expand(n, v), full(t), full(k, torch.int64), full(p), full(m), torch.arange(n) * 7919
    )
    counts = torch.bincount(draws, minlength=v).double()
    expected = probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token the cuts remove"
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10


@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0])  # flat (tens of thousands of candidates) to peaked
@pytest.mark.parametrize(
    ("top_k", "top_p"), [(None, 0.5), (None, 0.9), (None, 0.999), (300, 0.8), (20, None)]
)
def test_sample_kernel_keeps_torchs_tokens(scale, top_k, top_p) -> None:
    """The kernel's top-k/top-p cut on a 49k-token row keeps the tokens torch's path keeps, however many
    candidates it sorts through (its histogram narrowing of flat rows included): top-k exactly; with top-p
    the two sets are nested and differ only by tokens whose mass is rounding (torch sums the mass in float32,
    the kernel in double), under 1e-4 of the row."""
    import ctypes

    from tidellm.sample.sampler import apply_top_k_top_p

    v, t = 49152, 0.8
    row = torch.randn(v, generator=torch.Generator().manual_seed(int(scale * 100))) * scale
    k = torch.tensor([top_k if top_k is not None else v])
    p = None if top_p is None else torch.tensor([top_p])
    kept_torch = apply_top_k_top_p((row / t).unsqueeze(0), k, p)[0] > float("-inf")
    thr = cpu_kernels.library().tide_truncation_threshold(
        row.data_ptr(), v, ctypes.c_float(t), int(k), ctypes.c_float(1.0 if top_p is None else top_p)
    )
    kept_kernel = row / t >= thr
    if top_p is None:
        assert torch.equal(kept_kernel, kept_torch)
        return
    assert bool((kept_kernel & ~kept_torch).any()) + bool((kept_torch & ~kept_kernel).any()) <= 1  # nested
    probs = torch.softmax(row.double() / t, -1)
    assert float(probs[kept_kernel ^ kept_torch].sum()) < 1e-4
