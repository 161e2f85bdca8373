"""Llama 3.1+ JSON tool calls: the whole reply is ``{"name": ..., "parameters": {...}}`` (several separated by
``;``), optionally after ``<|python_tag|>``. A reply that starts otherwise is plain content."""

from __future__ import annotations

import json
from typing import Any

from tidellm.entrypoints.openai.tool_parsers.base import Parse, ToolFormat, read_call
from tidellm.entrypoints.openai.tool_parsers.json_scan import Malformed, skip_ws

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


class Llama3JsonToolParser(ToolFormat):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> Parse:
        start = skip_ws(text, 0)
        rest = text[start:]
        if rest.startswith(PYTHON_TAG):
            pos = start + len(PYTHON_TAG)
        elif rest.startswith("{"):
            pos = start
        elif not final and PYTHON_TAG.startswith(rest):  # also while only whitespace has arrived
            return Parse("")
        else:
            return Parse(text)
        p = Parse("")
        while True:
            try:
                call, end = read_call(text, pos, final=final)
            except Malformed:
                p.malformed_at = pos
                return p
            p.calls.append(call)
            if end is None:
                return p
            j = skip_ws(text, end)
            if j == len(text):
                return p
            if text[j] != SEPARATOR:
                p.malformed_at = pos
                return p
            pos = j + 1
            if final and skip_ws(text, pos) == len(text):
                return p  # a trailing separator

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            f"You can call the functions described by these JSON schemas:\n{listing}\n"
            "To call a function, reply with nothing but a JSON object of the form "
            '{"name": "function_name", "parameters": {"argument": "value"}}; separate several calls with ";".'
        )

    def format_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
