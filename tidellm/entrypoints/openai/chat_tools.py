"""Tool calling on ``/v1/chat/completions``, the request side: check ``tools`` and ``tool_choice``, turn
``required`` and a named function into a JSON-schema constraint (so the reply always parses), hand tools and
tool messages to the chat template, and pick the parser that reads the reply.

Templates that know nothing of tools (no ``tools`` variable) still get them: the tool format's own system
prompt describes them, and earlier calls and results are written into the messages as text in that format.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessageToolCall
from tidellm.entrypoints.openai.tool_parsers import (
    NamedCallParser,
    RequiredCallsParser,
    ToolFormat,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
)
from tidellm.sample.params import SamplingParams, StructuredOutputsParams
from tidellm.tokenizer.chat_template import template_accepts_tools

logger = logging.getLogger(__name__)

TOOL_CHOICES = ("none", "auto", "required")
# OpenAI's rule for function names, plus dots (namespaced tool names are common).
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """What one request asks of tool calling. ``tools`` are OpenAI-shaped dicts (what HF templates expect)."""

    mode: Literal["none", "auto", "required", "named"] = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)
    function: str | None = None  # the named function
    parallel: bool = True

    @property
    def shown_tools(self) -> list[dict[str, Any]]:
        """Tools the model is told about: none when it must not call any."""
        return [] if self.mode == "none" else self.tools

    def parser(self, fmt: ToolFormat) -> ToolParser | None:
        if self.mode == "auto":
            return fmt
        if self.mode == "required":
            return RequiredCallsParser()
        if self.mode == "named":
            assert self.function is not None
            return NamedCallParser(self.function)
        return None

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def enforced_parameters(self) -> list[tuple[int, dict[str, Any]]]:
        """``(index in tools, parameters schema)`` of each function the constraint covers, so a schema that
        cannot be enforced is reported against the tool it came from."""
        if self.mode not in ("required", "named"):
            return []
        return [
            (i, t["function"].get("parameters") or _EMPTY_PARAMETERS)
            for i, t in enumerate(self.tools)
            if self.mode == "required" or t["function"]["name"] == self.function
        ]

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must follow (``required`` / named), None when it is free."""
        params = {self.tools[i]["function"]["name"]: p for i, p in self.enforced_parameters()}
        if self.mode == "named":
            assert self.function is not None
            return params[self.function]
        if self.mode != "required":
            return None
        variants = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
        out: dict[str, Any] = {
            "type": "array",
            "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
            "minItems": 1,
        }
        if not self.parallel:
            out["maxItems"] = 1
        return out

    def constrain(self, params: SamplingParams) -> None:
        """Put the ``required`` / named schema on ``params`` (a 400 if the request already constrains them)."""
        schema = self.schema()
        if schema is None:
            return
        if params.structured_outputs is not None:
            raise errors.bad_request(
                f"tool_choice {self.choice_text} constrains the reply to tool calls; it cannot be combined "
                "with response_format or structured outputs. Use tool_choice 'auto' or drop the format.",
                param="tool_choice",
            )
        params.structured_outputs = StructuredOutputsParams(json=schema)

    @property
    def choice_text(self) -> str:
        return f"naming '{self.function}'" if self.mode == "named" else f"'{self.mode}'"


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    """Check ``tools``, ``tool_choice`` and ``parallel_tool_calls``; a 400 naming the problem otherwise."""
    tools = req.tools
    if tools is not None and not tools:
        raise errors.bad_request("tools must list at least one function (or be left out).", param="tools")
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        fn = tool.function
        if not _NAME_RE.match(fn.name):
            raise errors.bad_request(
                f"Invalid function name {fn.name!r}: use 1 to 64 letters, digits, '_', '-' or '.'.",
                param=f"tools[{i}].function.name",
            )
        if fn.name in names:
            raise errors.bad_request(
                f"Function name {fn.name!r} appears more than once in tools.",
                param=f"tools[{i}].function.name",
            )
        names.append(fn.name)
        if fn.parameters is not None:
            _check_parameters(fn.parameters, f"tools[{i}].function.parameters")
    plan = ToolPlan(
        tools=[t.model_dump(exclude_none=True) for t in tools or []],
        parallel=req.parallel_tool_calls is not False,
    )
    choice = req.tool_choice
    if choice is None:
        plan.mode = "auto" if tools else "none"
    elif isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise errors.bad_request(
                f"Invalid tool_choice {choice!r}: use 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": "..."}}.',
                param="tool_choice",
            )
        plan.mode = choice  # type: ignore[assignment]
    else:
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise errors.bad_request(
                'A named tool_choice must be {"type": "function", "function": {"name": "..."}} '
                f"(got {json.dumps(choice)}).",
                param="tool_choice",
            )
        if tools and name not in names:
            raise errors.bad_request(
                f"tool_choice names function {name!r}, which is not in tools (available: {', '.join(names)}).",
                param="tool_choice",
            )
        plan.mode, plan.function = "named", name
    if plan.mode != "none" and not tools:
        raise errors.bad_request(
            f"tool_choice {plan.choice_text} needs tools: list the functions in 'tools'.", param="tool_choice"
        )
    return plan


def _check_parameters(schema: dict[str, Any], param: str) -> None:
    """The shape OpenAI requires of a function's parameters; deeper schema errors are the grammar
    compiler's to report when the schema is enforced."""
    kind = schema.get("type", "object")
    if kind != "object":
        raise errors.bad_request(
            f"Function parameters must be a JSON schema of an object (got type {kind!r}).", param=param
        )
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
        raise errors.bad_request(
            "'properties' must map each argument name to a JSON schema.", param=f"{param}.properties"
        )
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise errors.bad_request("'required' must be a list of argument names.", param=f"{param}.required")


# ------------------------------------------------------------------------------------------ messages
def template_tool_calls(calls: list[ChatMessageToolCall], param: str) -> list[dict[str, Any]]:
    """An assistant message's calls for a chat template: arguments as a dict (templates write them with
    ``tojson``; a JSON string would be quoted twice)."""
    out = []
    for j, call in enumerate(calls):
        args = call.function.arguments
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise errors.bad_request(
                    f"Tool-call arguments must be JSON text of an object: {e}.",
                    param=f"{param}[{j}].function.arguments",
                ) from None
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": call.function.name, "arguments": args},
        }
        if call.id is not None:
            entry["id"] = call.id
        out.append(entry)
    return out


def adapt_for_plain_template(
    messages: list[dict[str, Any]], fmt: ToolFormat, tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the tools described in the system message, earlier
    calls written into the assistant's text, tool results as a user turn, all in ``fmt``'s format."""
    out: list[dict[str, Any]] = []
    results: list[str] = []
    for m in messages:
        if m["role"] == "tool":
            results.append(m["content"])
            continue
        if results:
            out.append({"role": "user", "content": fmt.format_results(results)})
            results = []
        if m.get("tool_calls"):
            calls = fmt.format_calls(
                [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            )
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{m['content']}\n{calls}" if m["content"] else calls
        out.append(m)
    if results:
        out.append({"role": "user", "content": fmt.format_results(results)})
    if tools:
        prompt = fmt.system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {
                **out[0],
                "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt,
            }
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def resolve_tool_format(parser_name: str | None, chat_template: str | None) -> tuple[ToolFormat, bool, str]:
    """The server's tool format (``--tool-call-parser``, else detected from the template), whether the
    template renders tools itself, and a one-line description for the start-up log."""
    name = parser_name or detect_tool_parser(chat_template)
    fmt = get_tool_parser(name)
    native = bool(chat_template) and template_accepts_tools(chat_template)
    how = "rendered by the chat template" if native else "described in a system message"
    source = "--tool-call-parser" if parser_name else "detected from the chat template"
    return fmt, native, f"tool calls: parser {name!r} ({source}); tools {how}"
