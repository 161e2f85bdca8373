"""Hermes / Qwen2.5 tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call,
possibly after some text (or, as small Qwen models often write them, the bare objects at the start)."""

from __future__ import annotations

import json
from typing import Any

from tidellm.entrypoints.openai.tool_parsers.base import Parse, ToolFormat, holdback, read_call
from tidellm.entrypoints.openai.tool_parsers.json_scan import Malformed, skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolFormat):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parse:
        content: list[str] = []
        p = Parse("")
        pos = self._bare_calls(text, final, p)
        if p.malformed_at is not None or (pos == len(text) and p.calls):
            return p
        while True:
            i = text.find(START, pos)
            if i == -1:
                content.append(self._tail(text[pos:], final, after_call=bool(p.calls)))
                break
            segment = text[pos:i].lstrip() if p.calls else text[pos:i]
            if segment.strip():  # whitespace around calls is layout, not content
                content.append(segment)
            body = i + len(START)
            try:
                call, end = read_call(text, body, final=final)
            except Malformed:
                p.malformed_at = i
                break
            p.calls.append(call)
            if end is None:
                break
            j = skip_ws(text, end)
            if text.startswith(END, j):
                pos = j + len(END)
            elif not final and END.startswith(text[j:]):
                break  # the closing tag may still come
            elif j == len(text):
                pos = j  # the model ended without closing the block (e.g. at its stop token)
            else:
                p.malformed_at = i
                break
        p.content = "".join(content)
        return p

    @staticmethod
    def _bare_calls(text: str, final: bool, p: Parse) -> int:
        """Small Qwen2.5 models often leave out the tags: a reply that *starts* with call objects (exactly
        name + arguments) holds calls too. Returns where the tagged parse continues (0 if there are none)."""
        j = skip_ws(text, 0)
        while j < len(text) and text[j] == "{":
            try:
                call, end = read_call(text, j, final=final)
            except Malformed:  # not a call after all (or a broken one): the reply is plain content
                p.malformed_at = j
                return j
            p.calls.append(call)
            if end is None:
                return len(text)
            j = skip_ws(text, end)
        return j if p.calls else 0

    @staticmethod
    def _tail(tail: str, final: bool, after_call: bool) -> str:
        if after_call:
            tail = tail.lstrip()
        if final:
            return "" if after_call and not tail.strip() else tail
        tail = tail[: len(tail) - holdback(tail, START)]
        # Trailing whitespace waits: it is dropped if a call follows.
        return tail.rstrip()

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You can call the functions described by the JSON schemas between <tools> and </tools>:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a function, reply with a <tool_call></tool_call> block holding a JSON object with the "
            "function's name and arguments (one block per call):\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>'
        )

    def format_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "\n".join(
            f"{START}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{END}" for n, a in calls
        )
