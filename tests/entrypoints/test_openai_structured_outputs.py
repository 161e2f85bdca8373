"""Structured outputs through the real server and the official openai client: response_format (json_schema,
json_object, text) on chat and completions, vLLM's guided_* extras and structured_outputs object, streamed
and not, greedy and sampled, in one batch with unconstrained requests (which must come out as when alone),
and every kind of bad constraint as a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from server_utils import MODEL

sys.path.insert(0, str(Path(__file__).parents[1] / "structured_output"))
from schemas import SCHEMAS  # noqa: E402

MAX_TOKENS = 160


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def chat_text(client, prompt: str, stream: bool, **kw) -> tuple[str, str]:
    messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
    if not stream:
        r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    s = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True, **kw
    )
    parts, finish = [], None
    async for chunk in s:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish


def test_chat_json_schemas_greedy_and_sampled_streamed_and_not(async_client):
    """All 13 schemas at once: greedy whole replies and sampled streamed ones (26 requests in flight)."""

    async def run():
        jobs = []
        for name, (prompt, schema) in SCHEMAS.items():
            rf = response_format(name, schema)
            jobs.append(chat_text(async_client, prompt, False, temperature=0, response_format=rf))
            jobs.append(chat_text(async_client, prompt, True, temperature=0.8, seed=9, response_format=rf))
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    schemas = [s for _, s in SCHEMAS.values() for _ in range(2)]
    for (text, finish), schema in zip(results, schemas, strict=True):
        assert finish == "stop", text
        check_json(text, schema)


def test_completions_extras_streamed_and_not(client):
    _, person = SCHEMAS["person"]
    prompt = "A person as JSON with name, age and email:\n"
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        n=2,
        temperature=0.7,
        seed=4,
        extra_body={"guided_json": person},
    )
    assert len(r.choices) == 2
    for c in r.choices:
        check_json(c.text, person)
    _, todo = SCHEMAS["todo_list"]
    stream = client.completions.create(
        model=MODEL,
        prompt="Tasks as JSON:\n",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"structured_outputs": {"json": json.dumps(todo), "disable_any_whitespace": True}},
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    check_json(text, todo)
    assert "\n" not in text
    r = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        temperature=1.0,
        n=3,
        extra_body={"guided_choice": [" yes", " no"]},
    )
    assert {c.text for c in r.choices} <= {" yes", " no"}
    regex = r" [A-Z][a-z]+, [0-9]{4}"
    stream = client.completions.create(
        model=MODEL,
        prompt="City and year of founding:",
        max_tokens=20,
        temperature=0,
        stream=True,
        extra_body={"guided_regex": regex},
    )
    assert re.fullmatch(regex, "".join(c.choices[0].text for c in stream if c.choices))
    grammar = 'root ::= " " ("red" | "green" | "blue") (", " ("red" | "green" | "blue"))*'
    r = client.completions.create(
        model=MODEL,
        prompt="List colours:",
        max_tokens=16,
        temperature=0,
        extra_body={"guided_grammar": grammar},
    )
    text, finish = r.choices[0].text, r.choices[0].finish_reason
    pattern = r" (red|green|blue)(, (red|green|blue))*"
    assert re.fullmatch(pattern, text) if finish == "stop" else re.match(pattern, text)
    r = client.completions.create(
        model=MODEL,
        prompt="Settings as JSON:",
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},  # a vLLM extra on completions
    )
    assert r.choices[0].text.lstrip().startswith("{")


def test_chat_json_object_and_text(client):
    messages = [{"role": "user", "content": "Give a JSON object with your name."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    as_text = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, response_format={"type": "text"}
    )
    assert as_text.choices[0].message.content == plain.choices[0].message.content


def test_unconstrained_requests_unchanged_by_constrained_neighbours(async_client):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]

    async def plain(p: str) -> str:
        r = await async_client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0)
        return r.choices[0].text

    async def run():
        alone = [await plain(p) for p in prompts]
        constrained = [
            chat_text(async_client, prompt, i % 2 == 0, temperature=0.7, seed=i, response_format=rf)
            for i, (prompt, rf) in enumerate(
                (prompt, response_format(name, schema))
                for name, (prompt, schema) in list(SCHEMAS.items())[:6]
            )
        ]
        mixed = await asyncio.gather(*constrained[:3], *(plain(p) for p in prompts), *constrained[3:])
        return alone, mixed

    alone, mixed = asyncio.run(run())
    assert mixed[3:6] == alone
    for (text, _), (_, schema) in zip(mixed[:3] + mixed[6:], list(SCHEMAS.values())[:6], strict=True):
        check_json(text, schema)


@pytest.fixture(scope="module")
def http(server, auth_headers):
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=60) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "'uniqueItems' at #"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "foo"}}, "guided_json", 'Unsupported type "foo"'),
        ({"guided_regex": "("}, "guided_regex", "parenthesis is not closed"),
        ({"guided_grammar": 'start ::= "a"'}, "guided_grammar", '"root" is not found'),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_json": {"type": "integer"}, "guided_regex": "a"}, "guided_regex", "got guided_json and"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "Only one constraint",
        ),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs", "must set one"),
        (
            {"structured_outputs": {"regex": "a", "structural_tag": "x"}},
            "structured_outputs.structural_tag",
            "",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "needs json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "Missing",
        ),
        (
            {"response_format": response_format("x", {"type": "string", "format": "password"})},
            "response_format",
            "format 'password'",
        ),
        (
            {"guided_regex": "a", "guided_whitespace_pattern": " "},
            "guided_whitespace_pattern",
            "not supported",
        ),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bad_constraints_are_400_naming_the_field(http, endpoint, body, param, needle):
    base = {"model": MODEL, "max_tokens": 4}
    if endpoint.endswith("chat/completions"):
        base["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        base["prompt"] = "Hi"
    r = http.post(endpoint, json={**base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert err["type"] == "invalid_request_error"
