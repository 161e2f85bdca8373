"""The interface every grammar backend implements (xgrammar today; llguidance would be a second class).

A backend compiles a ``GrammarSpec`` against the model's vocabulary once; each request then gets its own
``Matcher``, which walks the grammar as tokens are sampled and says which tokens may come next as a
bitmask. The bitmask format is the one xgrammar and llguidance share: int32 rows of ``ceil(V / 32)``
words, bit ``j`` of word ``w`` set = token ``32 * w + j`` allowed; bits past the vocabulary are ignored.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from tidellm.structured_output.spec import GrammarSpec
from tidellm.tokenizer.tokenizer import Tokenizer


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """An all-allowed bitmask [num_rows, ceil(V / 32)] int32."""
    return np.full((num_rows, bitmask_width(vocab_size)), -1, dtype=np.int32)


class Matcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance over sampled tokens; False if the grammar rejects one (the state is then undefined)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (EOS only once the grammar can end)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar has ended (a stop token was accepted after a complete match)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (for speculative decoding)."""


class StructuredOutputBackend(ABC):
    """Compiles specs for one tokenizer; ``validate`` needs no tokenizer, so the API process can run it."""

    name = ""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits width); may exceed the tokenizer's

    @classmethod
    @abstractmethod
    def validate(cls, spec: GrammarSpec) -> None:
        """Raise ``StructuredOutputError`` naming what is wrong if ``spec`` cannot be compiled or enforced."""

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (opaque; thread-safe to share between matchers). Slow: run off the step."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of ``compiled``."""


BACKENDS = {"xgrammar": "tidellm.structured_output.xgrammar_backend:XGrammarBackend"}
DEFAULT_BACKEND = "xgrammar"


def backend_class(name: str = DEFAULT_BACKEND) -> type[StructuredOutputBackend]:
    if name not in BACKENDS:
        raise ValueError(f"Unknown structured-output backend {name!r}; available: {', '.join(BACKENDS)}.")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
