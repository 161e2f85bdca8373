"""What every tool-call parser shares: the parse result, one call read from a JSON object, the non-streaming
extraction, and the streamer that turns text deltas into OpenAI-style content and tool-call deltas.

A parser has one job: ``parse(text, final)`` reads the model's whole text so far and says which part is
plain content and which calls it holds (possibly unfinished). Streaming re-parses after every delta and
sends only what is new, so a token boundary anywhere inside the markup cannot confuse it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tidellm.entrypoints.openai.tool_parsers.json_scan import Malformed, scan_object

NAME_KEYS = ("name",)
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PartialCall:
    """One call as far as it has been read. ``arguments`` is JSON text that only ever grows: a prefix of the
    final arguments while ``complete`` is False."""

    name: str | None
    arguments: str
    complete: bool


@dataclass
class Parse:
    """``content`` only ever grows as text is appended (text that may still turn into markup is held back).
    ``malformed_at`` is where the text stopped following the format (None while it follows it)."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)
    malformed_at: int | None = None


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass
class ExtractedOutput:
    """A finished output: content is None when the model only called tools."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """A call's first delta carries its ``name`` (and arguments ""); later ones carry argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """One piece of a streamed reply: either content or tool-call deltas."""

    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser(ABC):
    """Reads tool calls out of model text. Subclasses implement :meth:`parse` only."""

    @abstractmethod
    def parse(self, text: str, final: bool) -> Parse:
        """Split ``text`` into content and calls. With ``final`` False the text may still grow: hold back any
        tail that could become markup. With ``final`` True unfinished markup is malformed."""

    def extract(self, text: str) -> ExtractedOutput:
        """The calls in a finished output; if the markup is malformed, the whole text is content."""
        p = self.parse(text, final=True)
        if p.malformed_at is not None:
            return ExtractedOutput(text, [])
        calls = [ToolCall(c.name, c.arguments) for c in p.calls if c.name is not None]
        return ExtractedOutput(p.content if p.content or not calls else None, calls)


class ToolFormat(ToolParser):
    """A model's own tool-call format (chosen by ``--tool-call-parser``): besides parsing, it can describe the
    tools and write calls and results in that format, for chat templates that know nothing about tools."""

    name: ClassVar[str]

    @abstractmethod
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """Tells the model which tools exist and how to call them in this format."""

    @abstractmethod
    def format_calls(self, calls: list[tuple[str, Any]]) -> str:
        """Earlier ``(name, arguments)`` calls of the assistant, written as the model would have."""

    def format_results(self, results: list[str]) -> str:
        """Tool results handed back to the model (one user turn for consecutive results)."""
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


def read_call(text: str, start: int, *, final: bool) -> tuple[PartialCall, int | None]:
    """The ``{"name": ..., "arguments": {...}}`` object at ``text[start:]`` (``parameters`` is accepted for
    ``arguments``) and the index past it (None while open). Raises :class:`Malformed` for anything else:
    other keys, a name that is not a string, arguments that are not an object (or a string holding one)."""
    obj = scan_object(text, start)
    name: str | None = None
    arguments = ""
    have_args = False
    for key, (v_start, v_end) in obj.members.items():
        if key in NAME_KEYS:
            if v_start < len(text) and text[v_start] != '"':
                raise Malformed("the function name must be a string")
            if v_end is not None:
                name = json.loads(text[v_start:v_end])
                if not name:
                    raise Malformed("empty function name")
        elif key in ARGUMENT_KEYS:
            have_args = True
            arguments = _arguments(text, v_start, v_end)
        else:
            raise Malformed(f"unexpected key {key!r} in a tool call")
    if obj.end is None:
        if final:
            raise Malformed("unfinished tool call")
        return PartialCall(name, arguments, complete=False), None
    if name is None:
        raise Malformed("tool call without a name")
    return PartialCall(name, arguments if have_args else "{}", complete=True), obj.end


def _arguments(text: str, v_start: int, v_end: int | None) -> str:
    """Argument text so far: an object streams as it arrives; a string holding JSON (some models quote their
    arguments) is only known once it is complete."""
    if v_start >= len(text):
        return ""
    c = text[v_start]
    if c == "{":
        return text[v_start : len(text) if v_end is None else v_end]
    if c == '"':
        if v_end is None:
            return ""
        inner = json.loads(text[v_start:v_end])
        try:
            if isinstance(json.loads(inner), dict):
                return inner
        except ValueError:
            pass
        raise Malformed("string arguments that are not a JSON object")
    raise Malformed("tool-call arguments must be a JSON object")


def holdback(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker`` (it may become one)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallStreamer:
    """Feeds one choice's text deltas through a parser and returns what to send: content, then per call a
    first delta with its name (arguments "") and argument fragments.

    If the text stops following the format before any call went out, all of it streams as plain content, as
    a non-streamed reply would have it. A call already sent cannot be taken back: then nothing more is sent
    (no markup leaks into content), and the client sees that call's arguments unfinished, as it would after
    ``max_tokens`` cut one off; the non-streamed reply is all content in that case."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self._content_sent = 0
        self._args_sent: list[int] = []  # per call whose first delta went out: argument chars sent
        self._raw_from: int | None = None  # text index from which everything is plain content
        self._stopped = False  # the format broke after a call went out

    @property
    def called(self) -> bool:
        """Whether any tool call was sent."""
        return bool(self._args_sent)

    def feed(self, delta: str, final: bool = False) -> list[StreamDelta]:
        """The deltas to send after ``delta`` arrived; ``final`` when the output is finished."""
        self.text += delta
        if self._stopped:
            return []
        if self._raw_from is not None:
            return self._raw()
        p = self.parser.parse(self.text, final)
        if p.malformed_at is not None:
            if self._args_sent:
                self._stopped = True
                return []
            self._raw_from = self._content_sent  # no call sent: the content sent so far is a prefix of text
            return self._raw()
        out: list[StreamDelta] = []
        new_content = p.content[self._content_sent :]
        self._content_sent = len(p.content)
        calls_first = self.called
        if new_content and not calls_first:
            out.append(StreamDelta(content=new_content))
        for i, call in enumerate(p.calls):
            if call.name is None:
                break
            if i == len(self._args_sent):
                out.append(StreamDelta(tool_calls=[ToolCallDelta(i, name=call.name)]))
                self._args_sent.append(0)
            fragment = call.arguments[self._args_sent[i] :]
            if fragment:
                self._args_sent[i] = len(call.arguments)
                out.append(StreamDelta(tool_calls=[ToolCallDelta(i, arguments=fragment)]))
        if new_content and calls_first:
            out.append(StreamDelta(content=new_content))
        return out

    def _raw(self) -> list[StreamDelta]:
        assert self._raw_from is not None
        rest = self.text[self._raw_from :]
        self._raw_from = len(self.text)
        return [StreamDelta(content=rest)] if rest else []
