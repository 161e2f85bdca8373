"""Per-step attention metadata, built once per step by the runner and read by every layer.

All index bookkeeping happens here, in NumPy, once: which flattened rows are decodes (query length 1,
batched into one gather + one SDPA call), which are prefill chunks (handled one request at a time, with a
causal mask shifted by the cached prefix), and the block ids each of them reads from the paged cache; and,
for kernels that read the cache in place, every row as a query with its own context length
(``query_rows``). The layers only slice these tensors.

Sliding-window layers (a query at position p sees only keys at positions > p - window, the convention of
transformers' Mistral and Gemma 3) ask for ``for_window(window)``: the same step with each request's key
range cut to its window, derived on first use and shared by every layer with that window. Such a view never
names a block that lies entirely before a window, so blocks the scheduler released are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


def _cdiv(a, b):
    return -(-a // b)


@dataclass
class DecodeBatch:
    """All requests with one query token this step, attended in one batched call."""

    num_reqs: int
    # Flattened rows of the decode queries: [token_start, token_start + num_reqs) when ``token_idx`` is None,
    # else token_idx [B] int64 (decodes interleaved with prefill chunks).
    token_start: int
    token_idx: torch.Tensor | None
    # Gather path (SDPA): the blocks holding the keys each decode may see, gathered into one buffer of
    # max_len keys per request; with a window the first gathered block is the one holding the window start.
    max_len: int  # keys gathered per request (the longest context, or the widest window span)
    block_ids: torch.Tensor  # [B, ceil(max_len / block_size)] int64, a short row repeating its last block
    # [B, 1, 1, max_len] bool, True where a gathered key is inside the request's context (and window); None
    # when every gathered key is.
    mask: torch.Tensor | None
    rows: torch.Tensor  # [B] int64: the flattened row of each decode query (for kernels that take them all)
    seq_lens: torch.Tensor  # [B] int64: context length of each decode, this token included
    # Kernel path: the requests' block tables by position, [B, ceil(max seq_len / block_size)] int64 (the
    # same tensor as ``block_ids`` without a window), and the window (0: none) the kernel applies itself.
    block_table: torch.Tensor | None = None
    window: int = 0

    def __post_init__(self) -> None:
        if self.block_table is None:
            self.block_table = self.block_ids


@dataclass
class PrefillChunk:
    """One request with several query tokens: the last ``token_end - token_start`` of its ``seq_len``."""

    token_start: int
    token_end: int
    seq_len: int
    # None when there is no cached prefix: the chunk attends to its own fresh K/V, with a plain causal mask
    # when ``mask`` is None, else with ``mask`` [q_len, q_len] (a sliding window shorter than the chunk).
    # Else the blocks holding keys key_start..seq_len-1 [n] int64 and the mask [q_len, seq_len - key_start]
    # bool in which query i (position seq_len - q_len + i) sees the keys it may.
    block_ids: torch.Tensor | None
    mask: torch.Tensor | None
    key_start: int = 0  # position of the first gathered key (a multiple of the block size)

    @property
    def num_keys(self) -> int:
        return self.seq_len - self.key_start


@dataclass
class QueryRows:
    """Every query row of the step as a one-query attention over the paged cache, for kernels that read the
    cache in place: a prefill token at position p is a decode with p + 1 keys (the causal mask, and a
    sliding window, follow from its length), so decodes and prefill chunks run in one call."""

    rows: torch.Tensor  # [T] int64: 0..T-1
    seq_lens: torch.Tensor  # [T] int64: position + 1
    block_table: torch.Tensor  # [T, ceil(max seq_len / block_size)] int64: the row's request's blocks
    window: int  # 0: none


@dataclass
class _Layout:
    """The step's layout on the host, kept to derive sliding-window views."""

    query_start_loc: np.ndarray  # [R+1] int64
    seq_lens: np.ndarray  # [R] int64
    block_table: np.ndarray  # [R, max_blocks]
    device: torch.device


@dataclass
class AttentionMetadata:
    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) of each token
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    window: int = 0  # 0 for the full-context metadata; W for a view made by ``for_window(W)``
    # Gather buffers shared by all layers of this step (the layers run one after another).
    workspace: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _layout: _Layout | None = field(default=None, repr=False)
    _views: dict[int, AttentionMetadata] = field(default_factory=dict, repr=False)
    _query_rows: QueryRows | None = field(default=None, repr=False)

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
        workspace: dict[tuple, torch.Tensor] | None = None,
    ) -> AttentionMetadata:
        """query_start_loc [R+1] (cumulative query lengths), seq_lens [R] (context incl. this step),
        block_table [R, max_blocks] (padded with 0), slot_mapping [T]. ``workspace``: scratch buffers to
        share with the other KV-cache groups' metadata of the step."""
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
        layout = _Layout(qsl, seq, table, device)
        decode, prefills = _derive(layout, block_size, 0)
        meta = cls(num_tokens, block_size, slots, decode, prefills, _layout=layout)
        if workspace is not None:
            meta.workspace = workspace
        return meta

    def for_window(self, window: int | None) -> AttentionMetadata:
        """This step as a layer attending within ``window`` sees it (a query at position p reads keys at
        positions > p - window only). ``self`` for None, or when no context is longer than the window."""
        if window is None:
            return self
        if window < 1:
            raise ValueError(f"sliding window must be >= 1 (got {window})")
        view = self._views.get(window)
        if view is None:
            layout = self._layout
            if layout is None or not layout.seq_lens.size or int(layout.seq_lens.max()) <= window:
                view = self
            else:
                decode, prefills = _derive(layout, self.block_size, window)
                view = replace(self, decode=decode, prefills=prefills, window=window, _query_rows=None)
            self._views[window] = view
        return view

    def query_rows(self) -> QueryRows:
        """The step's query rows for in-place kernels (built on first use, shared by the layers)."""
        if self._query_rows is None:
            layout = self._layout
            if layout is None:
                raise ValueError("this metadata was not built from a step layout")
            qsl, seq = layout.query_start_loc, layout.seq_lens
            q_lens = np.diff(qsl)
            req = np.repeat(np.arange(len(q_lens)), q_lens)  # [T] request of each row
            pos = np.arange(self.num_tokens) - qsl[req] + (seq - q_lens)[req]
            table = layout.block_table[req, : _cdiv(int(seq.max()), self.block_size)]
            self._query_rows = QueryRows(
                rows=torch.arange(self.num_tokens, device=layout.device),
                seq_lens=torch.from_numpy(pos + 1).to(layout.device),
                block_table=torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64)).to(layout.device),
                window=self.window,
            )
        return self._query_rows

    def buffer(
        self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A scratch tensor reused by every layer of this step (allocated on first use)."""
        buf = self.workspace.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self.workspace[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def _derive(layout: _Layout, block_size: int, window: int) -> tuple[DecodeBatch | None, list[PrefillChunk]]:
    """The decode batch and prefill chunks of the step for a layer with ``window`` (0: full context)."""
    qsl, seq, table, device = layout.query_start_loc, layout.seq_lens, layout.block_table, layout.device
    q_lens = np.diff(qsl)
    decode = None
    rows = np.flatnonzero(q_lens == 1)
    if rows.size:
        decode = _decode_batch(qsl[rows], seq[rows], table[rows], block_size, window, device)
    prefills = []
    for r in np.flatnonzero(q_lens > 1):
        prefills.append(
            _prefill_chunk(int(qsl[r]), int(qsl[r + 1]), int(seq[r]), table[r], block_size, window, device)
        )
    return decode, prefills


def _decode_batch(
    tok: np.ndarray, lens: np.ndarray, table: np.ndarray, bs: int, window: int, device: torch.device
) -> DecodeBatch:
    """tok [B] flat query rows (increasing), lens [B] context lengths, table [B, max_blocks]."""
    num = int(tok.size)
    full = table[:, : _cdiv(int(lens.max()), bs)].astype(np.int64)  # [B, nb] by position
    first = np.maximum(lens - window, 0) if window else np.zeros_like(lens)  # first key each query sees
    first_block = first // bs
    end_block = _cdiv(lens, bs)
    width = int((end_block - first_block).max())
    cols = first_block[:, None] + np.arange(width)[None, :]  # [B, width] columns of the table
    # Past its last block a row repeats that block (masked): padding never reads another request's block.
    gather = np.take_along_axis(full, np.minimum(cols, end_block[:, None] - 1), axis=1)
    lo = first - first_block * bs  # [B] first live gathered key
    hi = lens - first_block * bs  # [B] end of the live gathered keys
    max_len = int(hi.max())
    mask = None
    if np.any(lo != 0) or np.any(hi != max_len):
        k = np.arange(max_len)[None, :]
        keep = (k >= lo[:, None]) & (k < hi[:, None])  # [B, max_len]
        mask = torch.from_numpy(keep).to(device).view(num, 1, 1, max_len)
    contiguous = int(tok[-1] - tok[0]) == num - 1
    block_table = torch.from_numpy(full).to(device)
    return DecodeBatch(
        num_reqs=num,
        token_start=int(tok[0]),
        token_idx=None if contiguous else torch.from_numpy(tok).to(device),
        max_len=max_len,
        block_ids=torch.from_numpy(gather).to(device),
        mask=mask,
        rows=torch.from_numpy(tok).to(device),
        seq_lens=torch.from_numpy(lens).to(device),
        block_table=block_table,
        window=window,
    )


def _prefill_chunk(
    start: int, end: int, seq_len: int, table_row: np.ndarray, bs: int, window: int, device: torch.device
) -> PrefillChunk:
    q_len = end - start
    prefix = seq_len - q_len
    if not prefix:
        mask = None
        if window and q_len > window:
            pos = torch.arange(q_len, device=device)
            dist = pos[:, None] - pos[None, :]  # [q_len, q_len] query position - key position
            mask = (dist >= 0) & (dist < window)
        return PrefillChunk(start, end, seq_len, None, mask)
    # The first query (position prefix) sees keys from prefix - window + 1 on, later queries from later on.
    key_start = (max(0, prefix - window + 1) // bs) * bs if window else 0
    ids = table_row[key_start // bs : _cdiv(seq_len, bs)].astype(np.int64)
    q_pos = torch.arange(prefix, seq_len, device=device)  # [q_len]
    k_pos = torch.arange(key_start, seq_len, device=device)  # [seq_len - key_start]
    dist = q_pos[:, None] - k_pos[None, :]
    mask = dist >= 0
    if window:
        mask &= dist < window
    return PrefillChunk(start, end, seq_len, torch.from_numpy(ids).to(device), mask, key_start)
