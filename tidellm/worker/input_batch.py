"""The runner's per-request state and the flattened inputs of one step, built with NumPy."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidellm.engine.protocol import LogprobEntry
from tidellm.sample.params import SamplingParams


@dataclass
class CachedRequestState:
    """What the runner remembers about a request between steps."""

    req_id: str
    token_ids: list[int]  # prompt + every output token known so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[list[int]]  # one block table per KV-cache group
    num_computed_tokens: int
    eos_token_ids: tuple[int, ...]
    prompt_logprobs: list[LogprobEntry] = field(default_factory=list)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class StepInputs:
    """Flattened inputs of one step; rows follow ``req_ids``."""

    req_ids: list[str]
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [R+1] int32
    seq_lens: np.ndarray  # [R] int32
    # Per KV-cache group: the block tables [R, max_blocks] int32 and each token's cache slot [T] int64.
    block_tables: list[np.ndarray]
    slot_mappings: list[np.ndarray]
    # Rows that sample this step (their scheduled tokens reach the end of the known tokens) and the
    # flat index of each one's last token.
    sample_rows: list[int]
    sample_token_idx: np.ndarray  # [S] int64


def build_step_inputs(states: list[CachedRequestState], num_tokens: list[int], block_size: int) -> StepInputs:
    """Gather token ids, positions and cache slots for ``num_tokens[i]`` tokens of each request."""
    n_reqs = len(states)
    counts = np.asarray(num_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=n_reqs)
    query_start_loc = np.zeros(n_reqs + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    total = int(query_start_loc[-1])

    # positions: start_i + (0..count_i-1) for each request, flattened without a Python loop over tokens.
    req_of_token = np.repeat(np.arange(n_reqs), counts)
    positions = starts[req_of_token] + (np.arange(total) - query_start_loc[:-1][req_of_token])
    seq_lens = (starts + counts).astype(np.int32)

    num_groups = len(states[0].block_ids) if states else 1
    block_tables = []
    for g in range(num_groups):
        max_blocks = max((len(s.block_ids[g]) for s in states), default=1) or 1
        table = np.zeros((n_reqs, max_blocks), dtype=np.int32)
        for i, s in enumerate(states):
            table[i, : len(s.block_ids[g])] = s.block_ids[g]
        block_tables.append(table)
    input_ids = np.empty(total, dtype=np.int64)
    sample_rows: list[int] = []
    for i, s in enumerate(states):
        a, b = int(starts[i]), int(starts[i] + counts[i])
        input_ids[query_start_loc[i] : query_start_loc[i + 1]] = s.token_ids[a:b]
        if b >= len(s.token_ids):
            sample_rows.append(i)

    block_col, offset = positions // block_size, positions % block_size
    slot_mappings = [t[req_of_token, block_col].astype(np.int64) * block_size + offset for t in block_tables]
    sample_token_idx = query_start_loc[1:][sample_rows].astype(np.int64) - 1
    return StepInputs(
        req_ids=[s.req_id for s in states],
        input_ids=input_ids,
        positions=positions,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mappings=slot_mappings,
        sample_rows=sample_rows,
        sample_token_idx=sample_token_idx,
    )
