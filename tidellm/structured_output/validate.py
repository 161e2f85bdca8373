"""The front end's check of a constraint, before a request is queued: bad specs fail fast, as a 400.

Parsing a schema, regex or grammar takes well under a millisecond and needs no tokenizer; compiling it
against the vocabulary (tens of ms or more) happens later, in the engine core. Specs that passed are
remembered, so a repeated schema (or the ``n`` children of one request) is checked once.
"""

from __future__ import annotations

from collections import OrderedDict

from tidellm.sample.params import StructuredOutputsParams
from tidellm.structured_output.backend import DEFAULT_BACKEND, backend_class
from tidellm.structured_output.spec import GrammarSpec, grammar_spec


class StructuredOutputValidator:
    def __init__(self, backend: str = DEFAULT_BACKEND, max_cached: int = 256) -> None:
        self.backend = backend
        self.max_cached = max_cached
        self._ok: OrderedDict[GrammarSpec, None] = OrderedDict()

    def validate(self, params: StructuredOutputsParams) -> GrammarSpec:
        """The spec of ``params``; raises ``StructuredOutputError`` (a ``ValueError``) naming the problem."""
        spec = grammar_spec(params)
        if spec in self._ok:
            self._ok.move_to_end(spec)
            return spec
        backend_class(self.backend).validate(spec)
        self._ok[spec] = None
        if len(self._ok) > self.max_cached:
            self._ok.popitem(last=False)
        return spec
