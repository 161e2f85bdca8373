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

from tidellm.model_executor.layers.rotary import (
    RotaryEmbedding,
    attention_factor,
    compute_inv_freq,
    position_inv_freq,
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
    got = compute_inv_freq(HEAD_DIM, 10000.0, rope, MAX_POS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert attention_factor(rope, MAX_POS) == pytest.approx(want_factor, rel=1e-12)
    if kind in ("dynamic", "longrope"):  # length-dependent: beyond the (original) context
        for seq_len in (17, MAX_POS + 1, 3 * MAX_POS):
            want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
            got = compute_inv_freq(HEAD_DIM, 10000.0, rope, MAX_POS, seq_len=seq_len)
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
    inv_freq = position_inv_freq(HEAD_DIM, 10000.0, rope, MAX_POS, rows).expand(rows, -1)
    ref = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, HEAD_DIM)
    for p in range(rows):
        cos, sin = ref(x, torch.tensor([[p]]))  # [1, 1, D] each: the D/2 angles twice
        torch.testing.assert_close(inv_freq[p], ref.inv_freq, rtol=1e-6, atol=0, msg=f"inv_freq @ {p}")
        # Beyond the context, transformers computes one row's grown base with scalar kernels where we do all
        # rows at once (vectorized pow): frequencies may differ in the last bit, angles of ~100 rad by ~1e-5.
        tol = 1e-6 if p < MAX_POS else 2e-5
        got = ours.cos_sin_cache[p]
        torch.testing.assert_close(got[:HALF], cos[0, 0, :HALF], rtol=0, atol=tol, msg=f"cos @ {p}")
        torch.testing.assert_close(got[HALF:], sin[0, 0, :HALF], rtol=0, atol=tol, msg=f"sin @ {p}")


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
    with pytest.raises(ValueError, match="long_factor has 3 entries, expected head_dim / 2 = 32"):
        rope = {**ROPES["longrope"], "long_factor": [1.0, 2.0, 3.0]}
        compute_inv_freq(HEAD_DIM, 1e4, rope, MAX_POS, seq_len=MAX_POS)
