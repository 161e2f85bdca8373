"""The request side of tool calling without a server: tool_choice plans, the schemas that enforce them, and
how tools, calls and results reach a chat template with or without tool support."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.chat_tools import plan_tools, resolve_tool_format
from tidellm.entrypoints.openai.protocol import ChatCompletionRequest
from tidellm.entrypoints.openai.serving_base import ServerContext
from tidellm.entrypoints.openai.serving_chat import OpenAIServingChat, messages_to_dicts
from tidellm.entrypoints.openai.tool_parsers import HermesToolParser, Llama3JsonToolParser
from tidellm.sample.params import SamplingParams
from tidellm.tokenizer.chat_template import render_chat_template, template_accepts_tools

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    },
}
NOW = {"type": "function", "function": {"name": "now", "description": "The time."}}
USER = [{"role": "user", "content": "Hi"}]
HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "1"},
    {"role": "tool", "tool_call_id": "c2", "content": "2"},
]
# A template that renders tools (the Hugging Face way) and one that knows nothing of them.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}\n"
    "{% endfor %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"


def _plan(**body):
    return plan_tools(ChatCompletionRequest(messages=USER, **body))


def test_plans():
    assert _plan().mode == "none" and _plan(tool_choice="none").mode == "none"
    assert _plan(tools=[ADD]).mode == "auto"
    plan = _plan(tools=[ADD, NOW], tool_choice="none")
    assert plan.mode == "none" and plan.shown_tools == [] and plan.schema() is None
    named = _plan(tools=[ADD, NOW], tool_choice={"type": "function", "function": {"name": "now"}})
    assert (named.mode, named.function) == ("named", "now")
    assert named.schema() == {"type": "object", "properties": {}}  # no parameters: an empty object


def test_required_schema_accepts_only_calls_of_the_tools():
    plan = _plan(tools=[ADD, NOW], tool_choice="required")
    schema = plan.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate([{"name": "add", "parameters": {"a": 1}}, {"name": "now", "parameters": {}}], schema)
    for bad in (
        [],
        [{"name": "add", "parameters": {}}],
        [{"name": "sub", "parameters": {"a": 1}}],
        {"name": "add"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = _plan(tools=[ADD], tool_choice="required", parallel_tool_calls=False).schema()
    assert one["maxItems"] == 1 and one["items"]["properties"]["name"] == {"type": "string", "enum": ["add"]}


def test_constrain_sets_the_schema_once():
    plan = _plan(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    params = SamplingParams()
    plan.constrain(params)
    assert params.structured_outputs.json == ADD["function"]["parameters"]
    with pytest.raises(errors.APIError, match="cannot be combined"):
        plan.constrain(params)
    free = SamplingParams()
    _plan(tools=[ADD]).constrain(free)
    assert free.structured_outputs is None


def test_template_detection():
    assert template_accepts_tools(TOOL_TEMPLATE) and not template_accepts_tools(PLAIN_TEMPLATE)
    assert not template_accepts_tools("{% if %}")  # broken templates fail later, when rendered
    fmt, native, line = resolve_tool_format(None, TOOL_TEMPLATE + "<tool_call>")
    assert isinstance(fmt, HermesToolParser) and native and "rendered by the chat template" in line
    fmt, native, line = resolve_tool_format("llama3_json", PLAIN_TEMPLATE)
    assert isinstance(fmt, Llama3JsonToolParser) and not native and "--tool-call-parser" in line


def _render(template: str, messages, tools, parser: str | None = None) -> str:
    """What the server would render with ``template`` as the model's chat template."""

    def apply(conversation, *, add_generation_prompt, chat_template, tools=None):
        return render_chat_template(
            template, conversation, add_generation_prompt=add_generation_prompt, tools=tools
        )

    tokenizer = SimpleNamespace(chat_template=template, apply_chat_template=apply)
    ctx = ServerContext(SimpleNamespace(tokenizer=tokenizer), "m", "m", None, parser)  # type: ignore[arg-type]
    req = ChatCompletionRequest(messages=messages, tools=tools)
    return OpenAIServingChat(ctx).render_text(req.messages, False, None, plan_tools(req).shown_tools)


def test_template_with_tools_gets_them_and_dict_arguments():
    text = _render(TOOL_TEMPLATE, HISTORY, [ADD, NOW])
    assert text.startswith("TOOLS=add,now\n")
    assert 'assistant: [add {"a": 1}]' in text  # a dict, not the JSON string quoted again
    assert text.endswith("tool: 1tool: 2")  # (trim_blocks eats the newlines)


def test_plain_template_gets_tools_calls_and_results_as_text():
    text = _render(PLAIN_TEMPLATE, HISTORY, [ADD])
    system, rest = text.split("</system>", 1)
    assert system.startswith("<system>") and json.dumps(ADD) in system and "<tool_call>" in system
    assert '<assistant><tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call></assistant>' in rest
    # consecutive results: one user turn
    assert rest.endswith(
        "<user><tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response></user>"
    )
    llama = _render(
        PLAIN_TEMPLATE, [{"role": "system", "content": "Be brief."}, *HISTORY[1:2]], [ADD], "llama3_json"
    )
    assert llama.startswith("<system>Be brief.\n\nYou can call")
    assert '<assistant>{"name": "add", "parameters": {"a": 1}}</assistant>' in llama


def test_messages_to_dicts_keeps_tool_fields():
    req = ChatCompletionRequest(messages=HISTORY)
    out = messages_to_dicts(req.messages)
    assert out[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}, "id": "c1"}],
    }
    assert out[2] == {"role": "tool", "content": "1", "tool_call_id": "c1"}
