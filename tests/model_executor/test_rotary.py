"""RoPE scaling against transformers' own functions: inverse frequencies and attention factors from
``transformers.modeling_rope_utils``, and every row of our cos/sin table against transformers' rotary
module called one position at a time (its behaviour during token-by-token decoding), beyond the context
length for the length-dependent types (dynamic NTK, LongRoPE)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from tidellm.model_executor.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    attention_factor,
    compute_inv_freq,
    position_inv_freq,
    rotary_dim,
)

HEAD_DIM = 64
MAX_POS = 64
HALF = HEAD_DIM // 2

ROPES: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "dynamic_fraction": {"rope_type": "dynamic", "factor": 3.7},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_default_original": {"rope_type": "yarn", "factor": 2.0},
    "yarn_mscale_untruncated": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 8,
        "beta_slow": 2,
        "mscale": 0.8,
        "mscale_all_dim": 0.4,
        "truncate": False,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 32,
        "attention_factor": 1.25,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
        "long_factor": [1.5 + 0.3 * i for i in range(HALF)],
        "original_max_position_embeddings": 16,
    },
    # Partial rotary (transformers' rope functions rotate the first int(D * factor) dimensions).
    "linear_partial": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
    "yarn_partial": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.75,
    },
    "longrope_partial": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HALF // 2)],
        "long_factor": [1.5 + 0.3 * i for i in range(HALF // 2)],
        "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.5,
    },
}


def _hf_config(rope: dict[str, Any]) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_parameters={**rope, "rope_theta": 10000.0},
    )


@pytest.mark.parametrize("name", list(ROPES))
def test_inv_freq_and_attention_factor_match_transformers(name: str) -> None:
    config = _hf_config(ROPES[name])
    rope = dict(ROPES[name])  # as written, so our own defaults are tested
    kind = rope["rope_type"]
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    dim = rotary_dim(HEAD_DIM, rope)
    got = compute_inv_freq(dim, 10000.0, rope, MAX_POS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert attention_factor(rope, MAX_POS) == pytest.approx(want_factor, rel=1e-12)
    if kind in ("dynamic", "longrope"):  # length-dependent: beyond the (original) context
        for seq_len in (17, MAX_POS + 1, 3 * MAX_POS):
            want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
            got = compute_inv_freq(dim, 10000.0, rope, MAX_POS, seq_len=seq_len)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(ROPES))
def test_table_rows_match_token_by_token_transformers(name: str) -> None:
    """Row p of our table is what transformers rotates position p with when it decodes one token at a time;
    for the length-dependent types the table runs to twice the context length to cover that regime too."""
    config = _hf_config(ROPES[name])
    rope = dict(ROPES[name])  # as written, so our own defaults are tested
    rows = 2 * MAX_POS
    ours = RotaryEmbedding(
        HEAD_DIM, rows, 10000.0, rope, torch.float32, torch.device("cpu"), max_position_embeddings=MAX_POS
    )
    half = rotary_dim(HEAD_DIM, rope) // 2
    inv_freq = position_inv_freq(2 * half, 10000.0, rope, MAX_POS, rows).expand(rows, -1)
    ref = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, HEAD_DIM)
    for p in range(rows):
        cos, sin = ref(x, torch.tensor([[p]]))  # [1, 1, R] each: the R/2 angles twice
        torch.testing.assert_close(inv_freq[p], ref.inv_freq, rtol=1e-6, atol=0, msg=f"inv_freq @ {p}")
        # Beyond the context, transformers computes one row's grown base with scalar kernels where we do all
        # rows at once (vectorized pow): frequencies may differ in the last bit, angles of ~100 rad by ~1e-5.
        tol = 1e-6 if p < MAX_POS else 2e-5
        got = ours.cos_sin_cache[p]
        torch.testing.assert_close(got[:half], cos[0, 0, :half], rtol=0, atol=tol, msg=f"cos @ {p}")
        torch.testing.assert_close(got[half:], sin[0, 0, :half], rtol=0, atol=tol, msg=f"sin @ {p}")


@pytest.mark.parametrize("name", ["dynamic", "longrope", "yarn"])
def test_whole_sequence_within_context_matches(name: str) -> None:
    """One transformers forward over the first positions (within the original context for LongRoPE)."""
    config = _hf_config(ROPES[name])
    rope = dict(ROPES[name])  # as written, so our own defaults are tested
    n = 16 if name == "longrope" else MAX_POS
    ours = RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, rope, torch.float32, torch.device("cpu"))
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 1, HEAD_DIM), torch.arange(n)[None])
    torch.testing.assert_close(ours.cos_sin_cache[:n, :HALF], cos[0, :, :HALF], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.cos_sin_cache[:n, HALF:], sin[0, :, :HALF], rtol=1e-6, atol=1e-6)


def test_bad_rope_configs_raise() -> None:
    with pytest.raises(ValueError, match="rope_scaling of type 'yarn' lacks the key 'factor'"):
        compute_inv_freq(HEAD_DIM, 1e4, {"rope_type": "yarn", "original_max_position_embeddings": 8}, 64)
    with pytest.raises(ValueError, match="'dynamic' needs max_position_embeddings"):
        compute_inv_freq(HEAD_DIM, 1e4, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling type 'mrope' is not supported"):
        compute_inv_freq(HEAD_DIM, 1e4, {"rope_type": "mrope"}, MAX_POS)
    with pytest.raises(ValueError, match="long_factor has 3 entries, expected the rotary dimension / 2 = 32"):
        rope = {**ROPES["longrope"], "long_factor": [1.0, 2.0, 3.0]}
        compute_inv_freq(HEAD_DIM, 1e4, rope, MAX_POS, seq_len=MAX_POS)
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0\.01 gives 0 rotary dimensions"):
        rotary_dim(HEAD_DIM, {"rope_type": "default", "partial_rotary_factor": 0.01})


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rotary_matches_transformers(partial: float) -> None:
    """q and k [T, n, D] rotated in their first R dimensions, the rest passed through (transformers' Phi-3
    apply_rotary_pos_emb, which handles partial rotation)."""
    rope = {"rope_type": "default", "partial_rotary_factor": partial}
    emb = RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, rope, torch.float32, torch.device("cpu"))
    positions = torch.tensor([0, 5, 17, 63])
    q, k = torch.randn(4, 3, HEAD_DIM), torch.randn(4, 1, HEAD_DIM)
    cos, sin = emb(positions)  # [T, 1, R/2]
    hf_cos, hf_sin = (torch.cat([c, c], -1)[:, 0][None] for c in (cos, sin))  # [1, T, R]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)  # [T, n, D]
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k, rtol=1e-6, atol=1e-6)
