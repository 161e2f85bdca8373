"""Per-request sampling parameters (the OpenAI / vLLM set, with vLLM's defaults).

Validated on construction: a bad value raises ``ValueError`` naming the parameter, the value and the
allowed range, so the HTTP layer can return it as-is. This module stays torch-free: the API process
imports it, and it travels to the engine core inside msgspec messages (``__post_init__`` runs again on
decode, so normalisation must be idempotent).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

# Temperatures below this are greedy decoding (argmax).
SAMPLING_EPS = 1e-5
# Hard cap on top logprobs per position (OpenAI allows 20); the engine may allow fewer (`verify`).
MAX_LOGPROBS = 20
# Range of penalties and logit biases, as in the OpenAI API.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed} (got {value!r})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output (vLLM's ``StructuredOutputsParams``): exactly one field is set.

    ``json`` is a JSON schema (a dict, or its text); ``json_object`` asks for any JSON object; ``regex`` and
    ``grammar`` (EBNF / GBNF) are matched in full; ``choice`` is a list of strings, one of which is the output.
    ``disable_any_whitespace`` makes JSON single-line with json.dumps' separators (``{"a": 1, "b": [2, 3]}``)
    instead of allowing any whitespace between tokens (up to a short run; see the xgrammar backend).

    Only types and "exactly one" are checked here (this module stays free of the grammar backend); whether
    a schema, regex or grammar compiles is checked by ``tidellm.structured_output`` before a request is queued.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        """The one constraint set: "json", "regex", "choice", "grammar" or "json_object"."""
        return self._set_fields()[0]

    def _set_fields(self) -> list[str]:
        names = ("json", "regex", "choice", "grammar")
        found = [n for n in names if getattr(self, n) is not None]
        if self.json_object:
            found.append("json_object")
        return found

    def validate(self, require_one: bool = False) -> None:
        """Types, and at most one constraint (exactly one with ``require_one``: an empty instance may be
        built first and filled in later, as vLLM's front end does)."""
        found = self._set_fields()
        if len(found) > 1 or (require_one and not found):
            got = ", ".join(found) if found else "none"
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar or json_object "
                f"(got {got}); send one constraint per request."
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise _fail("structured_outputs.json", self.json, "a JSON schema (an object, or its JSON text)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise _fail(f"structured_outputs.{name}", v, "a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise _fail("structured_outputs.choice", self.choice, "a non-empty list of strings")
            for c in self.choice:
                if not isinstance(c, str):
                    raise _fail("structured_outputs.choice", c, "strings")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise _fail("structured_outputs.json_object", self.json_object, "true or false")
        if not isinstance(self.disable_any_whitespace, bool):
            raise _fail(
                "structured_outputs.disable_any_whitespace", self.disable_any_whitespace, "true or false"
            )


@dataclass
class SamplingParams:
    """How to sample one request's completion(s). See the OpenAI / vLLM docs for the meaning of each field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on input) = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None  # top logprobs besides the sampled token; 0 = only the sampled one
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        self.validate()
        if self.greedy:
            # Greedy ignores the truncation knobs; reset them so batches can skip that work.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments in which ``None`` means "use the default" (OpenAI request bodies)."""
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        nullable = {
            "logit_bias",
            "seed",
            "stop",
            "stop_token_ids",
            "max_tokens",
            "logprobs",
            "prompt_logprobs",
        }
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k in nullable})

    @staticmethod
    def _normalise_logit_bias(bias: dict) -> dict[int, float]:
        out: dict[int, float] = {}
        for k, v in bias.items():
            try:
                tok = int(k)  # JSON bodies carry string keys
            except (TypeError, ValueError):
                raise _fail("logit_bias keys", k, "token ids (integers)") from None
            out[tok] = float(v)
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid parameter, its value and the allowed range."""
        if not _is_int(self.n) or self.n < 1:
            raise _fail("n", self.n, "an integer >= 1")
        self._check_float("temperature", self.temperature, 0.0, math.inf, ">= 0")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", self.top_p, "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _fail("top_k", self.top_k, "-1 or 0 (disabled) or an integer >= 1")
        self._check_float("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_float(name, getattr(self, name), -MAX_PENALTY, MAX_PENALTY, "in [-2, 2]")
        rp = self.repetition_penalty
        if not _is_num(rp) or not 0.0 < rp < math.inf:
            raise _fail("repetition_penalty", self.repetition_penalty, "> 0")
        if self.seed is not None and not _is_int(self.seed):
            raise _fail("seed", self.seed, "an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _fail("max_tokens", self.max_tokens, "an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise _fail(name, v, f"an integer in [0, {MAX_LOGPROBS}] or None")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0:
                raise _fail("logit_bias token id", tok, ">= 0")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise _fail(f"logit_bias[{tok}]", bias, "in [-100, 100]")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", s, "non-empty strings")
        for tok in self.stop_token_ids:
            if not _is_int(tok) or tok < 0:
                raise _fail("stop_token_ids", tok, "non-negative integers")
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise _fail("structured_outputs", so, "a StructuredOutputsParams or None")
            so.validate(require_one=True)

    @staticmethod
    def _check_float(name: str, value: Any, lo: float, hi: float, allowed: str) -> None:
        if not _is_num(value) or not lo <= value <= hi:
            raise _fail(name, value, allowed)  # NaN fails the range test too

    def verify(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the engine: the model's vocabulary and the engine's logprobs cap."""
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > min(max_logprobs, vocab_size):
                raise _fail(name, v, f"<= {min(max_logprobs, vocab_size)} (this engine's max_logprobs)")
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise _fail("logit_bias token id", tok, f"< the vocabulary size ({vocab_size})")
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise _fail("stop_token_ids", tok, f"< the vocabulary size ({vocab_size})")

    # ------------------------------------------------------------------ helpers
    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def child(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of the ``n`` fanned-out requests: ``n=1``, seed offset by the index."""
        c = self.clone()
        c.n = 1
        if c.seed is not None:
            c.seed += index
        return c

    def child_params(self) -> list[SamplingParams]:
        """The ``n`` child params the front end turns into ``n`` independent engine requests."""
        return [self.child(i) for i in range(self.n)]
