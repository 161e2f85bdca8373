"""Batched sampling state for one step: per-row parameters as tensors, built once per step.

Rows are the requests that sample this step, in batch order. Everything optional is ``None`` when no row
uses it, so an all-greedy batch without penalties, biases or min_tokens builds (almost) nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from tidellm.sample.params import SamplingParams


@dataclass
class RowState:
    """What the sampler needs to know about one request this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # only for seeded, non-greedy requests
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class SamplingMetadata:
    num_rows: int
    all_greedy: bool
    all_random: bool
    # Random sampling (None when all rows are greedy); greedy rows carry temperature 1 here.
    temperature: torch.Tensor | None = None  # [N] float32
    is_greedy: torch.Tensor | None = None  # [N] bool; only for mixed batches
    top_k: torch.Tensor | None = None  # [N] int64, disabled rows = vocab size
    top_p: torch.Tensor | None = None  # [N] float32, disabled rows = 1
    min_p: torch.Tensor | None = None  # [N] float32, disabled rows = 0
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    # Penalties (None when no row uses them; neutral values for rows that do not).
    presence_penalties: torch.Tensor | None = None  # [N] float32
    frequency_penalties: torch.Tensor | None = None  # [N] float32
    repetition_penalties: torch.Tensor | None = None  # [N] float32
    output_token_counts: torch.Tensor | None = None  # [N, V] float32
    prompt_token_mask: torch.Tensor | None = None  # [N, V] bool (only with repetition penalties)
    # Sparse edits: (rows, token ids) set to -inf while output < min_tokens, and (rows, ids, biases).
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # [M], [M] int64
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # [B], [B] int64, [B] f32
    max_num_logprobs: int | None = None  # top-N to gather; None = no row asked for logprobs
    # Structured outputs: the rows with a grammar and the tokens each may sample (None: no such row).
    grammar_rows: torch.Tensor | None = None  # [R] int64
    grammar_allowed: torch.Tensor | None = None  # [R, V] bool

    @classmethod
    def build(cls, rows: list[RowState], vocab_size: int, device: torch.device | str) -> SamplingMetadata:
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        meta = cls(num_rows=len(rows), all_greedy=all(greedy), all_random=not any(greedy))

        if not meta.all_greedy:
            f32 = dict(dtype=torch.float32, device=device)
            meta.temperature = torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], **f32
            )
            if not meta.all_random:
                meta.is_greedy = torch.tensor(greedy, dtype=torch.bool, device=device)
            if any(p.top_k > 0 for p in params):
                ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
                meta.top_k = torch.tensor(ks, dtype=torch.int64, device=device)
            if any(p.top_p < 1.0 for p in params):
                meta.top_p = torch.tensor([p.top_p for p in params], **f32)
            if any(p.min_p > 0.0 for p in params):
                meta.min_p = torch.tensor([p.min_p for p in params], **f32)
            meta.generators = {
                i: r.generator for i, r in enumerate(rows) if r.generator is not None and not greedy[i]
            }

        if any(p.uses_penalties for p in params):
            _build_penalties(meta, rows, vocab_size, device)
        if any(p.min_tokens > 0 for p in params):
            meta.min_tokens_mask = _build_min_tokens_mask(rows, vocab_size, device)
        if any(p.logit_bias for p in params):
            meta.logit_bias = _build_logit_bias(params, vocab_size, device)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        meta.max_num_logprobs = max(asked) if asked else None
        return meta


def _build_penalties(meta: SamplingMetadata, rows: list[RowState], vocab_size: int, device) -> None:
    params = [r.params for r in rows]
    f32 = dict(dtype=torch.float32, device=device)
    pen_rows = [i for i, p in enumerate(params) if p.uses_penalties]
    meta.output_token_counts = token_counts(
        [rows[i].output_token_ids for i in pen_rows], pen_rows, len(rows), vocab_size, device
    )
    if any(p.presence_penalty != 0.0 for p in params):
        meta.presence_penalties = torch.tensor([p.presence_penalty for p in params], **f32)
    if any(p.frequency_penalty != 0.0 for p in params):
        meta.frequency_penalties = torch.tensor([p.frequency_penalty for p in params], **f32)
    rep_rows = [i for i in pen_rows if params[i].repetition_penalty != 1.0]
    if rep_rows:
        meta.repetition_penalties = torch.tensor([p.repetition_penalty for p in params], **f32)
        prompt_counts = token_counts(
            [rows[i].prompt_token_ids for i in rep_rows], rep_rows, len(rows), vocab_size, device
        )
        meta.prompt_token_mask = prompt_counts > 0


def token_counts(
    token_lists: list[list[int]], row_ids: list[int], num_rows: int, vocab_size: int, device
) -> torch.Tensor:
    """Occurrence counts ``[num_rows, vocab_size]`` (float32) of ``token_lists[j]`` in row ``row_ids[j]``.

    One scatter_add over the flattened tokens; an extra padding column absorbs out-of-range ids.
    """
    width = vocab_size + 1
    counts = torch.zeros(num_rows * width, dtype=torch.float32, device=device)  # [N * (V + 1)]
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64, device=device)  # [R]
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.int64, device=device)  # [T]
    if flat.numel():
        flat = torch.where((flat < 0) | (flat >= vocab_size), vocab_size, flat)
        rows = torch.tensor(row_ids, dtype=torch.int64, device=device).repeat_interleave(lengths)  # [T]
        counts.scatter_add_(0, rows * width + flat, torch.ones_like(flat, dtype=torch.float32))
    return counts.view(num_rows, width)[:, :vocab_size]


def _build_min_tokens_mask(
    rows: list[RowState], vocab_size: int, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, ids) of stop tokens (and EOS unless ``ignore_eos``) for rows still short of ``min_tokens``."""
    mrows: list[int] = []
    mids: list[int] = []
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) >= p.min_tokens:
            continue
        ids = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            ids.update(r.eos_token_ids)
        ids = sorted(t for t in ids if 0 <= t < vocab_size)
        mrows.extend([i] * len(ids))
        mids.extend(ids)
    if not mrows:
        return None
    return (
        torch.tensor(mrows, dtype=torch.int64, device=device),
        torch.tensor(mids, dtype=torch.int64, device=device),
    )


def _build_logit_bias(
    params: list[SamplingParams], vocab_size: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    brows: list[int] = []
    bids: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(params):
        for tok, bias in (p.logit_bias or {}).items():
            if not 0 <= tok < vocab_size:
                raise ValueError(
                    f"logit_bias token id must be < the vocabulary size ({vocab_size}) (got {tok})"
                )
            brows.append(i)
            bids.append(tok)
            vals.append(bias)
    return (
        torch.tensor(brows, dtype=torch.int64, device=device),
        torch.tensor(bids, dtype=torch.int64, device=device),
        torch.tensor(vals, dtype=torch.float32, device=device),
    )
