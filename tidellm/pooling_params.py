"""Per-request parameters of an embedding request (the pooling counterpart of ``SamplingParams``).

Torch-free and validated on construction, like ``SamplingParams``: the API process imports it and it travels
to the engine core inside msgspec messages (``__post_init__`` runs again on decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class PoolingParams:
    """How to turn one prompt into an embedding.

    ``truncate_prompt_tokens``: keep only the first ``k`` tokens of a prompt longer than that (a text prompt
    keeps its closing special token, e.g. BERT's [SEP], as the tokenizer would); ``-1`` means the model's
    ``max_model_len``. Without it, a prompt longer than ``max_model_len`` is an error.
    ``dimensions``: the size the caller expects; it must equal the model's embedding size (no truncation of
    embeddings is done).
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None

    def __post_init__(self) -> None:
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer or -1 (got {k!r})")
        d = self.dimensions
        if d is not None and (not _is_int(d) or d < 1):
            raise ValueError(f"dimensions must be a positive integer (got {d!r})")
