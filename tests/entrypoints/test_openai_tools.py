"""Tool calling on `/v1/chat/completions` with SmolLM2 (whose template knows no tools) through the openai client:
``required`` and named ``tool_choice`` are enforced by constrained decoding, so the calls always parse and their
arguments validate against the tool's schema, streamed or not. Plus every request error as a 400."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from server_utils import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 1000},
                "b": {"type": "integer", "minimum": 0, "maximum": 1000},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
KW = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=80)


def _calls_of_stream(chunks) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) assembled from chunks the way OpenAI documents it."""
    content, calls, finish = "", {}, None
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                if t.id is not None:  # the first delta of a call: id, type, name, empty arguments
                    assert t.index not in calls and t.type == "function" and t.function.arguments == ""
                    assert t.id.startswith("call_")
                    calls[t.index] = [t.function.name, ""]
                else:
                    assert t.function.name is None
                    calls[t.index][1] += t.function.arguments
            if c.finish_reason is not None:
                finish = c.finish_reason
    return content, [(n, a) for n, a in calls.values()], finish


def _check_calls(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"]
)
def test_enforced_tool_choice_always_parses(client, tool_choice):
    names = {"get_weather", "add"} if tool_choice == "required" else {"add"}
    r = client.chat.completions.create(**KW, tool_choice=tool_choice)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls]
    _check_calls(calls, names)
    assert all(t.id.startswith("call_") and t.type == "function" for t in choice.message.tool_calls)
    if tool_choice != "required":
        assert len(calls) == 1

    content, streamed, finish = _calls_of_stream(
        client.chat.completions.create(**KW, tool_choice=tool_choice, stream=True)
    )
    assert content == "" and finish == "tool_calls"
    assert streamed == calls  # greedy: the same calls, streamed in pieces


def test_required_sampled_with_n_and_one_call_only(client):
    r = client.chat.completions.create(
        **{**KW, "temperature": 1.0}, tool_choice="required", n=2, seed=7, parallel_tool_calls=False
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_calls(
            [(t.function.name, t.function.arguments) for t in choice.message.tool_calls], set(SCHEMAS)
        )


def test_required_streamed_with_n_and_logprobs(client):
    chunks = list(
        client.chat.completions.create(
            **{**KW, "temperature": 1.0, "max_tokens": 60},
            tool_choice="required",
            n=2,
            seed=3,
            logprobs=True,
            stream=True,
        )
    )
    for i in range(2):
        mine = [SimpleNamespace(choices=[c]) for ch in chunks for c in ch.choices if c.index == i]
        content, calls, finish = _calls_of_stream(mine)
        assert content == ""
        if finish == "tool_calls":
            _check_calls(calls, set(SCHEMAS))
        assert sum(len(c.choices[0].logprobs.content) for c in mine if c.choices[0].logprobs) > 0


def test_tokenize_counts_the_tools(client, http):
    plain = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["count"]
    with_tools = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES, "tools": TOOLS}).json()[
        "count"
    ]
    r = client.chat.completions.create(**{**KW, "max_tokens": 1})
    assert with_tools == r.usage.prompt_tokens > plain


def test_auto_streamed_matches_whole(client):
    """SmolLM2 may or may not call a tool under ``auto``; either way the stream says what the reply says."""
    r = client.chat.completions.create(**KW, tool_choice="auto")
    content, calls, finish = _calls_of_stream(
        client.chat.completions.create(**KW, tool_choice="auto", stream=True)
    )
    msg = r.choices[0].message
    assert content == (msg.content or "") and finish == r.choices[0].finish_reason
    assert calls == [(t.function.name, t.function.arguments) for t in msg.tool_calls or []]
    assert "<tool_call>" not in content


def test_tool_choice_none_is_a_plain_chat(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    r = client.chat.completions.create(**{**KW, "max_tokens": 12}, tool_choice="none")
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.choices[0].message.tool_calls is None


def test_history_with_tool_calls_and_results(client):
    """A template without tool support still gets the earlier call and its result (written as text)."""
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    r = client.chat.completions.create(**{**KW, "messages": messages, "max_tokens": 8})
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 100  # the tool descriptions and the history are in the prompt


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def http(server, auth_headers):
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=60) as c:
        yield c


BAD_PARAMS = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'required'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "add"}}, "tool_choice", "named"),
        ({"tools": []}, "tools", "at least one"),
        ({"tools": [BAD_PARAMS]}, "tools[0].function.parameters", "object"),
        (
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            "tools[0].function.name",
            "letters",
        ),
        ({"tools": [ADD, ADD]}, "tools[1].function.name", "more than once"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
            None,
        ),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", None),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "required": "a"}},
                    }
                ]
            },
            "tools[0].function.parameters.required",
            "list",
        ),
        (
            {"messages": [*MESSAGES, {"role": "tool", "content": "21 degrees"}]},
            "messages[1].tool_call_id",
            "tool_call_id",
        ),
        (
            {
                "messages": [
                    *MESSAGES,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "JSON",
        ),
    ],
)
def test_tool_errors_are_400(http, body, param, needle):
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body}
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if needle is not None:
        assert needle in err["message"], err


def test_enforced_tool_choice_with_a_response_format_is_400(http):
    payload = {
        "model": MODEL,
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
    }
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


ONE_OF = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {
            "type": "object",
            "properties": {"x": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
        },
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "status"),
    [("required", 400), ({"type": "function", "function": {"name": "pick"}}, 400), ("auto", 200)],
    ids=["required", "named", "auto"],
)
def test_schema_that_cannot_be_enforced(http, tool_choice, status):
    """Enforcing it would silently loosen it: a 400 naming the tool. Under auto nothing is enforced."""
    payload = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 2,
        "tools": [ADD, ONE_OF],
        "tool_choice": tool_choice,
    }
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    if status == 400:
        err = r.json()["error"]
        assert err["param"] == "tools[1].function.parameters" and "oneOf" in err["message"], err
