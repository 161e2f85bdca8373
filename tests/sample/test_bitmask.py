"""The grammar bitmask in the sampler: unpacking, masking only the constrained rows (the others bit for bit
unchanged), greedy and random sampling inside the allowed set, and logprobs of the constrained distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidellm.sample.bitmask import apply_grammar_mask, unpack_bitmask
from tidellm.sample.metadata import RowState, SamplingMetadata
from tidellm.sample.params import SamplingParams
from tidellm.sample.sampler import Sampler

V = 1000  # not a multiple of 32: the last word is partly padding


def pack(allowed: np.ndarray) -> np.ndarray:
    """[R, V] bool -> the packed int32 format (bit j of word w = token 32w + j)."""
    r, v = allowed.shape
    padded = np.zeros((r, (v + 31) // 32 * 32), dtype=np.uint8)
    padded[:, :v] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def random_allowed(rng: np.random.Generator, rows: int, frac: float) -> np.ndarray:
    allowed = rng.random((rows, V)) < frac
    allowed[:, 0] = True  # never empty
    return allowed


def test_unpack_matches_the_bits():
    rng = np.random.default_rng(0)
    allowed = random_allowed(rng, 3, 0.3)
    out = unpack_bitmask(pack(allowed), V, "cpu")
    assert out.dtype == torch.bool and out.shape == (3, V)
    assert (out.numpy() == allowed).all()
    # the device path (shifts in torch) agrees
    shifts = torch.arange(32, dtype=torch.int32)
    packed = torch.from_numpy(pack(allowed))
    via_torch = ((packed.unsqueeze(-1) >> shifts) & 1).view(3, -1)[:, :V].bool()
    assert torch.equal(via_torch, out)


def test_only_listed_rows_change():
    rng = np.random.default_rng(1)
    logits = torch.randn(5, V)
    allowed = random_allowed(rng, 2, 0.1)
    rows = torch.tensor([3, 1])
    out = apply_grammar_mask(logits, rows, unpack_bitmask(pack(allowed), V, "cpu"))
    assert out is not logits
    for r in (0, 2, 4):
        assert torch.equal(out[r], logits[r])  # bit for bit
    for j, r in enumerate((3, 1)):
        assert torch.isinf(out[r][~torch.from_numpy(allowed[j])]).all()
        assert torch.equal(out[r][torch.from_numpy(allowed[j])], logits[r][torch.from_numpy(allowed[j])])
    # every row constrained, in order (the fast path) = the same rows given out of order
    mask = unpack_bitmask(pack(allowed), V, "cpu")
    fast = apply_grammar_mask(logits[:2], torch.tensor([0, 1]), mask)
    assert torch.equal(fast, apply_grammar_mask(logits[:2], torch.tensor([1, 0]), mask.flip(0)))


def test_columns_past_the_bitmask_are_disallowed():
    logits = torch.zeros(1, V + 7)  # a model vocabulary wider than the grammar's
    allowed = np.ones((1, V), dtype=bool)
    out = apply_grammar_mask(logits, torch.tensor([0]), unpack_bitmask(pack(allowed), V, "cpu"))
    assert torch.isinf(out[0, V:]).all() and not torch.isinf(out[0, :V]).any()


def _meta(params: list[SamplingParams], grammar: dict[int, np.ndarray] | None = None) -> SamplingMetadata:
    rows = []
    for i, p in enumerate(params):
        gen = None
        if p.seed is not None:
            gen = torch.Generator().manual_seed(p.seed + i)
        rows.append(RowState(p, [], [], gen))
    meta = SamplingMetadata.build(rows, V, "cpu")
    if grammar:
        idx = sorted(grammar)
        meta.grammar_rows = torch.tensor(idx)
        meta.grammar_allowed = unpack_bitmask(pack(np.stack([grammar[i] for i in idx])), V, "cpu")
    return meta


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_tokens_stay_in_the_grammar_and_neighbours_are_untouched(temperature):
    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(temperature=temperature, seed=11, logprobs=3, top_k=50) for _ in range(4)]
    allowed = {1: random_allowed(rng, 1, 0.02)[0], 2: random_allowed(rng, 1, 0.5)[0]}
    sampler = Sampler()
    free = sampler(logits, _meta(params))
    constrained = sampler(logits, _meta(params, allowed))
    for r in (0, 3):  # rows without a grammar: same token and logprobs, bit for bit
        assert constrained.sampled_token_ids[r] == free.sampled_token_ids[r]
        assert constrained.logprobs.row(r) == free.logprobs.row(r)
    for r, ok in allowed.items():
        tok = constrained.sampled_token_ids[r]
        assert ok[tok]
        ids, lps, rank = constrained.logprobs.row(r)
        assert np.isfinite(lps[0])  # logprobs of the constrained distribution
        assert all(ok[t] for t, lp in zip(ids[1:], lps[1:], strict=True) if np.isfinite(lp))
        masked = logits[r].clone()
        masked[~torch.from_numpy(ok)] = float("-inf")
        assert lps[0] == pytest.approx(float(torch.log_softmax(masked, -1)[tok]), abs=1e-5)
        if temperature == 0.0:
            assert tok == int(masked.argmax()) and rank == 1


def test_random_rows_only_ever_draw_allowed_tokens():
    rng = np.random.default_rng(3)
    ok = random_allowed(rng, 1, 0.01)[0]
    logits = torch.zeros(64, V)  # uniform: a leak would show at once
    params = [SamplingParams(temperature=1.0) for _ in range(64)]
    out = Sampler()(logits, _meta(params, dict.fromkeys(range(64), ok)))
    assert all(ok[t] for t in out.sampled_token_ids)
    assert len(set(out.sampled_token_ids)) > 1
