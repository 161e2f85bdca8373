"""Paged attention on ``torch.nn.functional.scaled_dot_product_attention``: the reference backend, the
one used on CPU, and correct unchanged on CUDA.

On CPU (fp32 or bf16), decodes (one query each) run in one compiled call that reads each request's K/V
straight from its blocks (``kernels/cpu.paged_decode``); so do steps with prefill chunks, whose every token
is handed to the same kernel as a query with its own causal length (``AttentionMetadata.query_rows``): one
call per layer instead of a gather and an SDPA call per request.

Elsewhere (GPUs, or CPUs without the compiled kernels) decodes are batched: their K/V blocks are gathered from
the paged cache into a contiguous buffer [n, max_len, kv_heads, D] and attended in one SDPA call per chunk of
requests. Grouped-query attention is done by folding the query heads that share a KV head into SDPA's
query-length axis (q [n, kv_heads, group, D]); that needs no K/V expansion and is the fastest form on CPU in
fp32 and bf16. On CPU the decodes are processed in chunks of a few MiB so the gathered K/V is still in cache
when SDPA reads it; on GPUs there is one chunk. Prefill chunks run one request at a time: without a cached
prefix on their own fresh K/V with ``is_causal``; with one, on their blocks gathered from the cache and a
causal mask shifted by the prefix.

Sliding-window layers get metadata already cut to their window (``AttentionMetadata.for_window``): the kernel
starts at each request's window, the gathers take only the window's blocks, and the masks drop older keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.layers.attention.metadata import AttentionMetadata, DecodeBatch

# Gathered K+V bytes per decode chunk on CPU: small enough to stay in the last-level cache until read.
CPU_DECODE_CHUNK_BYTES = 8 * 2**20


def paged_sdpa_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D] (already written to the cache)
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention output [T, H * D] for every query row of the step."""
    num_tokens, num_heads, head_dim = q.shape
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if _use_cpu_kernel(q, kv_cache):
        # One in-place call for the step: its decodes, or with prefill chunks every row (a token at position p
        # is a query with p + 1 keys). Both carry rows, block_table, seq_lens and window.
        r = meta.query_rows() if meta.prefills else meta.decode
        if r is not None:
            cpu_kernels.paged_decode(q, r.rows, kv_cache, r.block_table, r.seq_lens, scale, out, r.window)
        return out.view(num_tokens, num_heads * head_dim)
    if meta.decode is not None:
        _decode(q, kv_cache, meta, meta.decode, scale, out)
    for p in meta.prefills:
        qp = q[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        if p.block_ids is None:
            kp = k[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, q_len, D]
            vp = v[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True
            )
        else:
            kp, vp = (_gather_blocks(kv_cache[i], p.block_ids, p.num_keys).unsqueeze(0) for i in (0, 1))
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.token_start : p.token_end] = o[0].transpose(0, 1)  # [q_len, H, D]
    return out.view(num_tokens, num_heads * head_dim)


def _use_cpu_kernel(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """fp32 or bf16 on CPU with the compiled kernels: decode straight from the paged cache."""
    return (
        q.dtype in (torch.float32, torch.bfloat16)
        and q.device.type == "cpu"
        and q.stride(2) == 1
        and q.stride(1) == q.shape[2]
        and kv_cache.dtype == q.dtype
        and kv_cache.is_contiguous()
        and cpu_kernels.available()
    )


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache [num_blocks, bs, Hkv, D], block_ids [n] -> [Hkv, seq_len, D] (a strided view of a copy)."""
    num_kv_heads, head_dim = cache.shape[2:]
    return cache.index_select(0, block_ids).view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)


def _decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    d: DecodeBatch,
    scale: float,
    out: torch.Tensor,
) -> None:
    _, num_blocks_per_req = d.block_ids.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    if d.token_idx is None:
        qd = q[d.token_start : d.token_start + d.num_reqs]  # [B, H, D]
    else:
        qd = q.index_select(0, d.token_idx)
    qd = qd.view(d.num_reqs, num_kv_heads, group, head_dim)  # query heads of one KV head as the query axis

    padded_len = num_blocks_per_req * block_size
    if kv_cache.device.type == "cpu":
        row_bytes = 2 * padded_len * num_kv_heads * head_dim * kv_cache.element_size()
        rows = max(1, min(d.num_reqs, CPU_DECODE_CHUNK_BYTES // row_bytes))
    else:
        rows = d.num_reqs
    shape = (2, rows * num_blocks_per_req, block_size, num_kv_heads, head_dim)
    buf = meta.buffer(("decode_kv", d.window), shape, kv_cache.dtype, kv_cache.device)
    for s in range(0, d.num_reqs, rows):
        e = min(s + rows, d.num_reqs)
        n = e - s
        ids = d.block_ids[s:e].reshape(-1)  # [n * nb]
        kv = []
        for i in (0, 1):
            dst = buf[i, : n * num_blocks_per_req]
            torch.index_select(kv_cache[i], 0, ids, out=dst)
            # [n, padded_len, Hkv, D] -> [n, Hkv, max_len, D]
            kv.append(dst.view(n, padded_len, num_kv_heads, head_dim)[:, : d.max_len].transpose(1, 2))
        mask = None if d.mask is None else d.mask[s:e]
        o = F.scaled_dot_product_attention(
            qd[s:e], kv[0], kv[1], attn_mask=mask, scale=scale
        )  # [n, Hkv, G, D]
        o = o.reshape(n, num_heads, head_dim)  # (SDPA on CUDA may return it strided)
        if d.token_idx is None:
            out[d.token_start + s : d.token_start + e] = o
        else:
            out.index_copy_(0, d.token_idx[s:e], o)
