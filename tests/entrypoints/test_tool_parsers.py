"""Tool-call parsers without a server: whole replies, and the same replies streamed in pieces split at random
points (tokens can split the markup anywhere) must give the same content and calls."""

from __future__ import annotations

import json
import random

import pytest

from tidellm.config.server import TOOL_CALL_PARSERS
from tidellm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    NamedCallParser,
    RequiredCallsParser,
    ToolCallStreamer,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
)
from tidellm.entrypoints.openai.tool_parsers.json_scan import Malformed, scan_object, scan_value

WEATHER = (
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2.5e3], "note": "a \\"b\\" \\u00e9"}}'
)
WEATHER_ARGS = '{"city": "Paris", "days": [1, 2.5e3], "note": "a \\"b\\" \\u00e9"}'


def streamed(parser: ToolParser, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list]:
    """Feed ``text`` split at ``cuts``; returns (content, [(name, arguments)], deltas)."""
    bounds = [0, *cuts, len(text)]
    s = ToolCallStreamer(parser)
    deltas = []
    for k in range(len(bounds) - 1):
        deltas += s.feed(text[bounds[k] : bounds[k + 1]], final=k == len(bounds) - 2)
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for t in d.tool_calls:
            if t.name is not None:
                assert t.index not in calls and t.arguments == "", "a call starts once, with empty arguments"
                calls[t.index] = [t.name, ""]
            else:
                calls[t.index][1] += t.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [(n, a) for n, a in calls.values()], deltas


def check_all_splits(
    parser: ToolParser, text: str, n_random: int = 60, broken_call_at: int | None = None
) -> None:
    """Every split into 1-char pieces, random splits and no split give what ``extract`` gives.

    ``broken_call_at``: where a call that turns malformed starts. If its name streamed before the breakage
    showed, the stream keeps that call and sends the text before it as content, and nothing after it.
    """
    whole = parser.extract(text)
    expected = (whole.content or "", [(c.name, c.arguments) for c in whole.tool_calls])
    rnd = random.Random(text)
    splits = [[], list(range(1, len(text)))]
    splits += [
        sorted(rnd.sample(range(1, len(text)), rnd.randint(1, min(12, len(text) - 1))))
        for _ in range(n_random if len(text) > 1 else 0)
    ]
    for cuts in splits:
        content, calls, _ = streamed(parser, text, cuts)
        if broken_call_at is not None and calls:
            assert content == text[:broken_call_at] and [n for n, _ in calls] == ["f"], (text, cuts)
            assert calls[0][1] in text[broken_call_at:]  # the arguments as far as they were valid
            continue
        assert (content, calls) == expected, (text, cuts)


# ------------------------------------------------------------------------------------------- hermes
@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [("get_weather", WEATHER_ARGS)]),
        (
            f'Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{{"name": "f", "arguments": {{}}}}</tool_call>',
            "Let me check.\n",
            [("get_weather", WEATHER_ARGS), ("f", "{}")],
        ),
        ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', None, [("f", '{"x": 1}')]),
        ('<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
        ('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', None, [("f", '{"x": 1}')]),
        ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("f", '{"x": 1}')]),
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}', None, [("f", '{"x": 1}')]),  # ended unclosed
        (f"{WEATHER}", None, [("get_weather", WEATHER_ARGS)]),  # bare, as small Qwen models write it
        (
            '{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"y": null}}',
            None,
            [("a", "{}"), ("b", '{"y": null}')],
        ),
        (
            f"<tool_call>\n{WEATHER}\n</tool_call>\nI will report back.",
            "I will report back.",
            [("get_weather", WEATHER_ARGS)],
        ),
    ],
)
def test_hermes_calls(text, content, calls):
    parser = HermesToolParser()
    out = parser.extract(text)
    assert out.content == content
    assert [(c.name, c.arguments) for c in out.tool_calls] == calls
    for c in out.tool_calls:
        assert isinstance(json.loads(c.arguments), dict)
    check_all_splits(parser, text)


@pytest.mark.parametrize(
    "text",
    [
        "Just words, no tools. 1 < 2 and <tool is not a tag",
        "Ends with a partial tag <tool_ca",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "f", "arguments": {"x": }}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "extra": 1, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": 1}} trailing</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": 1',  # cut off by max_tokens
        "<tool_call>",
        '{"answer": 42}',
        '{"name": "f", "arguments": {}',
        "  \n",
        "",
    ],
)
def test_hermes_malformed_is_plain_content(text):
    parser = HermesToolParser()
    out = parser.extract(text)
    assert out.content == text and out.tool_calls == []
    broken = text.find('{"name": "f"') if '{"name": "f"' in text else None
    check_all_splits(
        parser, text, broken_call_at=None if broken is None else max(0, text.find("<tool_call>"))
    )


def test_hermes_markup_never_leaks_into_streamed_content():
    text = f"Checking.\n<tool_call>\n{WEATHER}\n</tool_call>"
    for cut in range(1, len(text)):
        content, _, deltas = streamed(HermesToolParser(), text, [cut])
        assert content == "Checking.\n"
        assert all("<" not in (d.content or "") for d in deltas)


def test_streamed_arguments_arrive_in_pieces():
    text = f"<tool_call>\n{WEATHER}\n</tool_call>"
    _, calls, deltas = streamed(HermesToolParser(), text, list(range(1, len(text))))
    fragments = [t.arguments for d in deltas for t in d.tool_calls if t.name is None]
    assert len(fragments) > 10 and "".join(fragments) == WEATHER_ARGS
    assert calls == [("get_weather", WEATHER_ARGS)]


def test_streaming_gives_up_early_on_a_malformed_call():
    s = ToolCallStreamer(HermesToolParser())

    def text(deltas):
        assert all(not d.tool_calls for d in deltas)
        return "".join(d.content or "" for d in deltas)

    assert text(s.feed("Hi <tool_call>{")) == "Hi "
    assert text(s.feed('"oops": 1')) == '<tool_call>{"oops": 1'  # not a call key: all of it is content now
    assert text(s.feed(" more")) == " more"
    assert text(s.feed("", final=True)) == ""


# ------------------------------------------------------------------------------------------- llama 3
@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('{"name": "f", "parameters": {"x": 1}}', [("f", '{"x": 1}')]),
        ('<|python_tag|>{"name": "f", "parameters": {"x": 1}}', [("f", '{"x": 1}')]),
        (
            '  {"name": "a", "parameters": {"q": "x;y"}}; {"name": "b", "arguments": {}};',
            [("a", '{"q": "x;y"}'), ("b", "{}")],
        ),
    ],
)
def test_llama3_calls(text, calls):
    parser = Llama3JsonToolParser()
    out = parser.extract(text)
    assert out.content is None and [(c.name, c.arguments) for c in out.tool_calls] == calls
    check_all_splits(parser, text)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 4.",
        'Sure: {"name": "f", "parameters": {}}',
        '{"result": 3}',
        '{"name": "f", "parameters": {}} and then words',
        '{"name": "f", "parameters": {}}; {"nope": 1}',
        '<|python_tag|>print("hi")',
        '{"name": "f", "parameters": {',
    ],
)
def test_llama3_malformed_is_plain_content(text):
    parser = Llama3JsonToolParser()
    out = parser.extract(text)
    assert out.content == text and out.tool_calls == []
    check_all_splits(parser, text, broken_call_at=0 if text.startswith('{"name": "f"') else None)


# ------------------------------------------------------------------------------------------- constrained
def test_required_array():
    parser = RequiredCallsParser()
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": [true, false]}}]'
    out = parser.extract(text)
    assert out.content is None
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("a", '{"x": 1}'),
        ("b", '{"y": [true, false]}'),
    ]
    check_all_splits(parser, text)
    cut = parser.extract(text[:-20])  # max_tokens: the calls read so far, the last one unfinished
    assert [c.name for c in cut.tool_calls] == ["a", "b"]
    assert parser.extract("nonsense").content == "nonsense"


def test_named_call():
    parser = NamedCallParser("get_weather")
    out = parser.extract(' {"city": "Paris"}')
    assert out.content is None and [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    check_all_splits(parser, ' {"city": "Paris"}')


# ------------------------------------------------------------------------------------------- json scan
@pytest.mark.parametrize(
    "doc", ['{"a": [1, -2.5e-3, true, false, null, "x\\n\\u00e9"], "b": {}}', "[]", '"s"', "[[[{}]]]"]
)
def test_scan_value_prefixes(doc):
    assert scan_value(doc, 0) == len(doc)
    assert all(scan_value(doc[:k], 0) is None for k in range(len(doc)))  # unfinished, never malformed


@pytest.mark.parametrize("bad", ['{"a" 1}', '{"a": tru }', "[1,,2]", '{"a": 01}', '"\\x"', "{'a': 1}", "]"])
def test_scan_value_rejects_invalid(bad):
    with pytest.raises(Malformed):
        scan_value(bad, 0)


def test_scan_object_members():
    obj = scan_object('{"name": "f", "arguments": {"x": ', 0)
    assert obj.end is None and list(obj.members) == ["name", "arguments"]
    assert obj.members["arguments"][1] is None


# ------------------------------------------------------------------------------------------- registry
def test_registry_matches_cli_choices_and_detection():
    assert tuple(TOOL_PARSERS) == TOOL_CALL_PARSERS
    assert detect_tool_parser("...<tool_call>...") == "hermes"
    assert detect_tool_parser('... "parameters": ... <|python_tag|>') == "llama3_json"
    assert detect_tool_parser("{{ messages }}") == detect_tool_parser(None) == "hermes"
    assert isinstance(get_tool_parser("llama3_json"), Llama3JsonToolParser)
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("mistral")
