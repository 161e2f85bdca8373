"""A request's constraint as a hashable key: the same spec compiles once and is shared by every request.

Free of torch and of the grammar backend, so the API process can build it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tidellm.sample.params import StructuredOutputsParams

GrammarKind = Literal["json", "json_object", "regex", "grammar", "choice"]


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled or enforced; the message names what is wrong and the fix."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to compile. ``text``: the schema as compact JSON text, the regex, the EBNF grammar, or the
    choices as a JSON list ("" for json_object). Dict and text forms of one schema give the same key."""

    kind: GrammarKind
    text: str
    any_whitespace: bool = True

    def describe(self) -> str:
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return f"{self.kind} {shown}".rstrip()


def grammar_spec(so: StructuredOutputsParams) -> GrammarSpec:
    """The cache key of a ``StructuredOutputsParams`` (raises ``StructuredOutputError`` on JSON that does not
    parse: a schema given as text must be JSON)."""
    so.validate(require_one=True)
    ws = not so.disable_any_whitespace
    kind = so.kind
    if kind == "json":
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise StructuredOutputError(f"The JSON schema is not valid JSON: {e}.") from None
        return GrammarSpec("json", _compact(schema), ws)
    if kind == "json_object":
        return GrammarSpec("json_object", "", ws)
    if kind == "choice":
        return GrammarSpec("choice", _compact(so.choice), ws)
    return GrammarSpec(kind, so.regex if kind == "regex" else so.grammar, ws)  # type: ignore[arg-type]


def _compact(value: object) -> str:
    # Key order is kept: it is the order in which properties are generated.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
