"""Per-step attention metadata, built once per step by the runner and read by every layer.

All index bookkeeping happens here, in NumPy, once: which flattened rows are decodes (query length 1,
batched into one gather + one SDPA call), which are prefill chunks (handled one request at a time, with a
causal mask shifted by the cached prefix), and the block ids each of them reads from the paged cache.
The layers only slice these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class DecodeBatch:
    """All requests with one query token this step, attended in one batched call."""

    num_reqs: int
    # Flattened rows of the decode queries: [token_start, token_start + num_reqs) when ``token_idx`` is None,
    # else token_idx [B] int64 (decodes interleaved with prefill chunks).
    token_start: int
    token_idx: torch.Tensor | None
    max_len: int  # longest context among the decodes
    block_ids: torch.Tensor  # [B, ceil(max_len / block_size)] int64, padded with block 0
    # [B, 1, 1, max_len] bool, True where a key is inside the request's context; None when all are max_len.
    mask: torch.Tensor | None
    rows: torch.Tensor  # [B] int64: the flattened row of each decode query (for kernels that take them all)
    seq_lens: torch.Tensor  # [B] int64: context length of each decode, this token included


@dataclass
class PrefillChunk:
    """One request with several query tokens: the last ``token_end - token_start`` of its ``seq_len``."""

    token_start: int
    token_end: int
    seq_len: int
    # None when there is no cached prefix: the chunk attends to its own fresh K/V with a plain causal mask.
    # Else the request's blocks [ceil(seq_len / block_size)] int64 and the mask [q_len, seq_len] bool in
    # which query i (position prefix + i) sees keys 0..prefix + i.
    block_ids: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) of each token
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    # Gather buffers shared by all layers of this step (the layers run one after another).
    workspace: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        *,
        query_start_loc: np.ndarray,
        seq_lens: np.ndarray,
        block_table: np.ndarray,
        slot_mapping: np.ndarray,
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """query_start_loc [R+1] (cumulative query lengths), seq_lens [R] (context incl. this step),
        block_table [R, max_blocks] (padded with 0), slot_mapping [T]."""
        qsl = np.asarray(query_start_loc, dtype=np.int64)
        seq = np.asarray(seq_lens, dtype=np.int64)
        table = np.asarray(block_table)
        q_lens = np.diff(qsl)
        num_tokens = int(qsl[-1])
        if len(slot_mapping) != num_tokens:
            raise ValueError(
                f"slot_mapping has {len(slot_mapping)} entries for {num_tokens} scheduled tokens"
            )
        if np.any(q_lens > seq):
            raise ValueError("a request's query length exceeds its seq_len (seq_len must include the query)")
        if seq.size and _cdiv(int(seq.max()), block_size) > table.shape[1]:
            raise ValueError(
                f"block_table has {table.shape[1]} columns, too few for seq_len {int(seq.max())}"
            )
        slots = torch.from_numpy(np.ascontiguousarray(slot_mapping, dtype=np.int64)).to(device)

        decode = None
        rows = np.flatnonzero(q_lens == 1)
        if rows.size:
            tok = qsl[rows]  # [B] flat row of each decode query, increasing
            lens = seq[rows]
            max_len = int(lens.max())
            ids = table[rows, : _cdiv(max_len, block_size)].astype(np.int64)
            mask = None
            if np.any(lens != max_len):
                keep = np.arange(max_len)[None, :] < lens[:, None]  # [B, max_len]
                mask = torch.from_numpy(keep).to(device).view(rows.size, 1, 1, max_len)
            contiguous = int(tok[-1] - tok[0]) == rows.size - 1
            decode = DecodeBatch(
                num_reqs=int(rows.size),
                token_start=int(tok[0]),
                token_idx=None if contiguous else torch.from_numpy(tok).to(device),
                max_len=max_len,
                block_ids=torch.from_numpy(ids).to(device),
                mask=mask,
                rows=torch.from_numpy(tok).to(device),
                seq_lens=torch.from_numpy(lens).to(device),
            )

        prefills = []
        for r in np.flatnonzero(q_lens > 1):
            start, end, seq_len = int(qsl[r]), int(qsl[r + 1]), int(seq[r])
            prefix = seq_len - (end - start)
            block_ids = mask = None
            if prefix:
                ids = table[r, : _cdiv(seq_len, block_size)].astype(np.int64)
                block_ids = torch.from_numpy(ids).to(device)
                q_pos = torch.arange(prefix, seq_len, device=device)  # [q_len]
                mask = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
            prefills.append(PrefillChunk(start, end, seq_len, block_ids, mask))
        return cls(num_tokens, block_size, slots, decode, prefills)

    def buffer(
        self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A scratch tensor reused by every layer of this step (allocated on first use)."""
        buf = self.workspace.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self.workspace[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf
