"""`POST /v1/chat/completions` through the official openai client against a real server."""

from __future__ import annotations

import math

from server_utils import MODEL

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
]


def _stream(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kw))
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for ch in chunks:
        assert ch.object == "chat.completion.chunk"
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


def test_greedy_chat_matches_offline_llm_chat(client, llm_fp32):
    from tidellm import SamplingParams

    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    expected = llm_fp32.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streaming_role_first_finish_last_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    texts, reasons, chunks = _stream(
        client, max_tokens=16, temperature=0, stream_options={"include_usage": True}
    )
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content
    assert texts[0] == full.choices[0].message.content
    assert reasons[0] == full.choices[0].finish_reason
    content_chunks = [ch for ch in chunks if ch.choices]
    assert content_chunks[-1].choices[0].finish_reason is not None
    assert all(c.finish_reason is None for ch in content_chunks[:-1] for c in ch.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_seed_and_max_completion_tokens(client):
    kw = dict(n=2, temperature=1.0, seed=99, max_completion_tokens=6, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
    b = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 12 and {c.finish_reason for c in a.choices} == {"length"}
    texts, reasons, chunks = _stream(client, **kw)
    assert texts == {c.index: c.message.content for c in a.choices}
    roles = [c.index for ch in chunks for c in ch.choices if c.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_logprobs_chat_format(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        best = entry.top_logprobs[0]
        assert math.isclose(best.logprob, entry.logprob, abs_tol=1e-4)  # greedy picks the best
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    _, _, chunks = _stream(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    streamed = [e.token for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == [e.token for e in content]
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_stop_and_content_parts(client):
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Count from 1 to 9,"},
                {"type": "text", "text": "separated by commas."},
            ],
        }
    ]
    base = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=30, temperature=0)
    text = base.choices[0].message.content
    assert "3" in text, text
    r = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=30, temperature=0, stop=["3"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[: text.index("3")]
