"""The xgrammar backend: JSON schemas, regexes, EBNF grammars and choices, compiled against our vocabulary.

xgrammar is installed without its declared dependencies (their triton is ~1 GB and unused on CPU); it needs
``apache-tvm-ffi`` and imports ``transformers`` (see the Makefile). It is imported on first use, so the
server starts as fast without it and only requests with a constraint pay the import (~0.5 s once).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tidellm.structured_output.backend import Matcher, StructuredOutputBackend
from tidellm.structured_output.json_schema import string_patterns, unsupported_features
from tidellm.structured_output.spec import GrammarSpec, StructuredOutputError
from tidellm.tokenizer.token_bytes import token_bytes
from tidellm.tokenizer.tokenizer import Tokenizer

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: ...: ".
_LOG_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: .*? is false: ")
# Compile threads per grammar: the engine's pool already runs several compiles side by side.
_COMPILE_THREADS = 2
# Whitespace characters allowed between two JSON tokens when whitespace is free: room for a newline and
# five levels of 4-space indentation, yet a model that starts emitting blank lines (seen with SmolLM2 at
# temperature 0.8) must get back to the JSON within a few tokens instead of running out of max_tokens.
MAX_JSON_WHITESPACE = 21


def _xgr():
    try:
        import xgrammar
    except ImportError as e:
        raise StructuredOutputError(
            f"Structured outputs need the xgrammar package, which failed to import ({e}). Install it with "
            "`make install` (pip install --no-deps xgrammar apache-tvm-ffi transformers)."
        ) from None
    return xgrammar


def _clean(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _CHECK_PREFIX.sub("", _LOG_PREFIX.sub("", text)).rstrip(".")


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF literals in xgrammar (\", \\, \n, \uXXXX escapes).
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XGrammarMatcher(Matcher):
    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        return all(self._m.accept_token(int(t)) for t in token_ids)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)


class XGrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        xgr = _xgr()
        # Our own per-token bytes (RAW = taken as given): the same for GGUF and HF-folder tokenizers, special
        # tokens empty (xgrammar never allows those), ids past the tokenizer up to the model's padded
        # vocabulary size masked by xgrammar, and the tokenizer's every end-of-generation id as stop tokens.
        vocab = [b if b is not None else b"" for b in token_bytes(tokenizer)][:vocab_size]
        stop_ids = [t for t in tokenizer.eos_token_ids if t < vocab_size]
        if not stop_ids:
            raise StructuredOutputError(
                "Structured outputs need the tokenizer's end-of-sequence token, and this one has none."
            )
        self.info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids, add_prefix_space=False
        )
        # Our manager caches compiled grammars by spec; xgrammar's own cache would keep a second copy.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=_COMPILE_THREADS, cache_enabled=False)

    # ------------------------------------------------------------------ validation (no tokenizer)
    @classmethod
    def validate(cls, spec: GrammarSpec) -> None:
        xgr = _xgr()
        if spec.kind == "json":
            schema = json.loads(spec.text)
            problems = unsupported_features(schema)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StructuredOutputError(f"Unsupported JSON schema: {problems[0]}{more}.")
            for path, pattern in string_patterns(schema):
                try:
                    xgr.Grammar.from_regex(pattern)
                except Exception as e:
                    raise StructuredOutputError(
                        f"Unsupported JSON schema: the pattern {pattern!r} at {path} cannot be enforced: {_clean(e)}."
                    ) from None
            what, build = "JSON schema", lambda: xgr.Grammar.from_json_schema(spec.text, **cls._json_kw(spec))
        elif spec.kind == "regex":
            what, build = "regex", lambda: xgr.Grammar.from_regex(spec.text)
        elif spec.kind == "grammar":
            what, build = "grammar", lambda: xgr.Grammar.from_ebnf(spec.text)
        elif spec.kind == "choice":
            what, build = "choice", lambda: xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(spec.text)))
        else:
            return  # json_object: a fixed grammar
        try:
            build()
        except Exception as e:  # xgrammar raises RuntimeError with the parser's message
            hint = (
                ' (EBNF/GBNF with a \'root\' rule, e.g. root ::= "yes" | "no")' if what == "grammar" else ""
            )
            raise StructuredOutputError(f"Invalid {what}{hint}: {_clean(e)}.") from None

    @staticmethod
    def _json_kw(spec: GrammarSpec, strict: bool = True) -> dict[str, Any]:
        # strict_mode: no properties or items beyond those the schema names (still valid JSON-schema
        # output, and what a small model needs to stay on track). Without free whitespace xgrammar writes
        # json.dumps' default separators: {"a": 1, "b": [2, 3]}.
        ws = MAX_JSON_WHITESPACE if spec.any_whitespace else None
        return {"any_whitespace": spec.any_whitespace, "strict_mode": strict, "max_whitespace_cnt": ws}

    # ------------------------------------------------------------------ compile / match
    def compile(self, spec: GrammarSpec) -> Any:
        c = self.compiler
        try:
            if spec.kind == "json":
                return c.compile_json_schema(spec.text, **self._json_kw(spec))
            if spec.kind == "json_object":
                # Any JSON object (not any JSON value): the object schema without strict mode.
                return c.compile_json_schema('{"type": "object"}', **self._json_kw(spec, strict=False))
            if spec.kind == "regex":
                return c.compile_regex(spec.text)
            if spec.kind == "grammar":
                return c.compile_grammar(spec.text)
            if spec.kind == "choice":
                return c.compile_grammar(_choice_ebnf(json.loads(spec.text)))
        except Exception as e:
            raise StructuredOutputError(f"Invalid {spec.kind}: {_clean(e)}.") from None
        raise StructuredOutputError(f"Unknown constraint kind {spec.kind!r}.")

    def matcher(self, compiled: Any) -> Matcher:
        return XGrammarMatcher(_xgr().GrammarMatcher(compiled))
