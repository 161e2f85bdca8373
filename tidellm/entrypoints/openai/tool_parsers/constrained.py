"""Parsers for replies that constrained decoding forced into a JSON shape (``tool_choice`` ``required`` or a
named function): there is no markup and no content, only calls."""

from __future__ import annotations

from tidellm.entrypoints.openai.tool_parsers.base import Parse, PartialCall, ToolParser, read_call
from tidellm.entrypoints.openai.tool_parsers.json_scan import Malformed, skip_ws


class RequiredCallsParser(ToolParser):
    """``[{"name": ..., "parameters": {...}}, ...]``: the JSON array the ``required`` schema allows."""

    def parse(self, text: str, final: bool) -> Parse:
        # A reply cut short (max_tokens) keeps the calls read so far; the last one may be unfinished.
        p = Parse("")
        j = skip_ws(text, 0)
        if j == len(text):
            return p
        if text[j] != "[":
            p.malformed_at = 0
            return p
        j = skip_ws(text, j + 1)
        if j < len(text) and text[j] == "]":
            return p
        while j < len(text):
            try:
                call, end = read_call(text, j, final=False)
            except Malformed:
                p.malformed_at = 0
                return p
            p.calls.append(call)
            if end is None:
                return p
            k = skip_ws(text, end)
            if k == len(text) or text[k] == "]":
                return p
            if text[k] != ",":
                p.malformed_at = 0
                return p
            j = skip_ws(text, k + 1)
        return p


class NamedCallParser(ToolParser):
    """The whole reply is the arguments of one call to a function known in advance."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> Parse:
        # Leading whitespace is not part of the arguments; the grammar may allow it.
        return Parse("", [PartialCall(self.name, text.lstrip(), complete=final)])
