"""Server pieces without a server: wire codec, stream merging, error mapping, prompt and template handling."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import msgspec
import pytest

from tidellm.engine import serial
from tidellm.engine.async_llm import RequestStream, _merge_deltas
from tidellm.engine.input_processor import PromptTooLongError
from tidellm.engine.output_processor import OutputKind
from tidellm.engine.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from tidellm.entrypoints.openai.protocol import ChatMessage
from tidellm.entrypoints.openai.serving_base import ServerContext
from tidellm.entrypoints.openai.serving_chat import OpenAIServingChat, messages_to_dicts
from tidellm.entrypoints.openai.serving_completion import normalize_prompts
from tidellm.outputs import CompletionOutput, Logprob, RequestOutput
from tidellm.sample.params import SamplingParams


def test_wire_codec_roundtrip_and_rejects_garbage():
    enc, dec = serial.input_codec(), serial.input_codec()
    req = EngineCoreRequest(
        "r1", [1, 2, 3], SamplingParams(temperature=0.5, stop="x", logit_bias={"7": 2.0}), 16
    )
    kind, payload = dec.decode(enc.encode(serial.ADD, [req]))
    assert kind == serial.ADD and payload == [req]
    assert payload[0].sampling_params.logit_bias == {7: 2.0}
    assert dec.decode(enc.encode(serial.ABORT, ["a", "b"])) == (serial.ABORT, ["a", "b"])
    assert dec.decode(enc.encode(serial.SHUTDOWN)) == (serial.SHUTDOWN, None)
    with pytest.raises(ValueError):
        dec.decode([b"PICKLE", b"\x80\x04"])
    with pytest.raises(msgspec.ValidationError):  # a valid kind with a payload of the wrong type
        dec.decode([serial.ADD, msgspec.msgpack.encode({"x": 1})])
    out_codec = serial.output_codec()
    outs = EngineCoreOutputs(
        outputs=[EngineCoreOutput("r1", [5], new_logprobs=[([5, 6], [-0.1, -2.0], 1)], scheduled_time=1.5)],
        scheduler_stats=SchedulerStats(num_running=1, kv_cache_usage=0.25),
    )
    assert out_codec.decode(out_codec.encode(serial.OUTPUTS, outs)) == (serial.OUTPUTS, outs)


def _out(rid: str, texts: dict[int, str], finished: bool = False) -> RequestOutput:
    comps = [
        CompletionOutput(i, t, [ord(c) for c in t], finish_reason="stop" if finished else None)
        for i, t in texts.items()
    ]
    return RequestOutput(rid, None, [1], comps, finished=finished)


def test_request_stream_merges_backlog_of_deltas():
    async def run():
        s = RequestStream("r", OutputKind.DELTA)
        s.put(_out("r", {0: "a", 1: "x"}))
        s.put(_out("r", {0: "b"}))
        s.put(_out("r", {1: "y"}, finished=True))
        return [o async for o in s]

    (merged,) = asyncio.run(run())
    assert merged.finished and [(c.index, c.text) for c in merged.outputs] == [(0, "ab"), (1, "xy")]
    assert merged.outputs[1].finish_reason == "stop" and merged.outputs[1].token_ids == [ord("x"), ord("y")]


def test_request_stream_raises_engine_errors():
    async def run():
        s = RequestStream("r", OutputKind.DELTA)
        s.put(_out("r", {0: "a"}))
        s.put(RuntimeError("engine gone"))
        return [o async for o in s]

    with pytest.raises(RuntimeError, match="engine gone"):
        asyncio.run(run())


def test_merge_keeps_logprobs_aligned():
    a = RequestOutput("r", None, [1], [CompletionOutput(0, "a", [1], logprobs=[{1: Logprob(-0.1, 1, "a")}])])
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "b", [2], logprobs=[{2: Logprob(-0.2, 1, "b")}])])
    m = _merge_deltas(a, b)
    assert m.outputs[0].token_ids == [1, 2] and [list(d) for d in m.outputs[0].logprobs] == [[1], [2]]


def test_error_mapping():
    e = errors.from_exception(ValueError("top_p must be in (0, 1] (got 2.0)"))
    assert (e.status, e.param) == (400, "top_p")
    e = errors.from_exception(PromptTooLongError("too long", 3000, 2048), prompt_param="messages")
    assert (e.status, e.param, e.code) == (400, "messages", "context_length_exceeded")
    e = errors.from_exception(PromptTooLongError("too long", 10, 2048))
    assert e.param == "max_tokens"
    from tidellm.engine.core_client import EngineDeadError

    e = errors.from_exception(EngineDeadError("boom"))
    assert e.status == 503 and "boom" in e.message
    body = errors.error_body(404, "nope", param="model", code="model_not_found")
    assert body == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert (
        errors._loc_to_param(("body", "messages", 0, "content", "list[dict[str,any]]", 1))
        == "messages[0].content[1]"
    )
    assert errors._loc_to_param(("body", "stop", "str")) == "stop"


def test_normalize_prompts():
    assert normalize_prompts("hi") == ["hi"]
    assert normalize_prompts(["a", "b"]) == ["a", "b"]
    assert normalize_prompts([1, 2]) == [[1, 2]]
    assert normalize_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [[1], []]):
        with pytest.raises(errors.APIError):
            normalize_prompts(bad)


def test_messages_content_parts():
    msgs = [ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    assert messages_to_dicts(msgs) == [{"role": "user", "content": "a\nb"}]
    with pytest.raises(errors.APIError) as ei:
        messages_to_dicts([ChatMessage(role="user", content=[{"type": "image_url"}])])
    assert ei.value.param == "messages[0].content[0]"


def _serving(tokenizer, chat_template=None) -> OpenAIServingChat:
    engine = SimpleNamespace(tokenizer=tokenizer)
    return OpenAIServingChat(ServerContext(engine, "m", "m", chat_template))  # type: ignore[arg-type]


def test_model_without_chat_template_is_a_400(smollm2_tokenizer):
    tok = copy.copy(smollm2_tokenizer)
    tok.chat_template = None
    msgs = [ChatMessage(role="user", content="Hi")]
    with pytest.raises(errors.APIError) as ei:
        _serving(tok).render_prompt(msgs, True)
    assert ei.value.status == 400 and ei.value.param == "messages" and "--chat-template" in ei.value.message
    ids = _serving(tok, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}").render_prompt(msgs, True)
    assert tok.decode(ids) == "[Hi]"


def test_logprob_formats(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello world")
    lps = [{t: Logprob(-0.5, 2, tok.decode([t])), 0: Logprob(-0.1, 1, tok.decode([0]))} for t in ids]
    legacy = completion_logprobs(ids, [None, *lps[1:]], 1, tok)
    assert legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    assert "".join(legacy.tokens) == "Hello world" and legacy.text_offset == [0, len(legacy.tokens[0])]
    assert set(legacy.top_logprobs[1]) == {tok.decode([0]), legacy.tokens[1]}  # best + chosen
    chat = chat_logprobs(ids, lps, 1, tok)
    assert [c.token for c in chat.content] == legacy.tokens
    assert [t.logprob for t in chat.content[0].top_logprobs] == [-0.1]
