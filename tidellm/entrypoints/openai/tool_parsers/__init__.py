"""Tool-call parsers: one per model output format, chosen with ``--tool-call-parser`` or from the chat template.

Adding a format = one module with a :class:`ToolFormat` subclass and one line in ``TOOL_PARSERS`` (the names
are also listed in ``tidellm.config.server.TOOL_CALL_PARSERS`` for the CLI).
"""

from __future__ import annotations

from tidellm.entrypoints.openai.tool_parsers.base import (
    ExtractedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    ToolFormat,
    ToolParser,
)
from tidellm.entrypoints.openai.tool_parsers.constrained import NamedCallParser, RequiredCallsParser
from tidellm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from tidellm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolFormat]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}
DEFAULT_TOOL_PARSER = HermesToolParser.name


def get_tool_parser(name: str) -> ToolFormat:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown tool-call parser {name!r}; choose one of: {', '.join(TOOL_PARSERS)}."
        ) from None


def detect_tool_parser(chat_template: str | None) -> str:
    """The parser whose markup the chat template teaches (hermes when it teaches none: the format we then
    describe to the model ourselves)."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser.name
    if "<|python_tag|>" in template or '"parameters"' in template:
        return Llama3JsonToolParser.name
    return DEFAULT_TOOL_PARSER


__all__ = [
    "DEFAULT_TOOL_PARSER",
    "TOOL_PARSERS",
    "ExtractedOutput",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "NamedCallParser",
    "RequiredCallsParser",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamer",
    "ToolFormat",
    "ToolParser",
    "detect_tool_parser",
    "get_tool_parser",
]
