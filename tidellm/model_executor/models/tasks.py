"""What a model is for: generating text or producing embeddings, decided by its architecture.

Torch-free so the API process can ask it. The engine core, the offline ``LLM`` and the HTTP server all use
the same check and the same message, so a request of the wrong kind is refused alike everywhere.
"""

from __future__ import annotations

from typing import Literal

Task = Literal["generate", "embed"]

# Encoder architectures whose output is a pooled embedding (no LM head, no KV cache).
POOLING_ARCHITECTURES: frozenset[str] = frozenset({"BertModel", "RobertaModel", "XLMRobertaModel"})
# Their model_types (an encoder never has an LM head to tie).
ENCODER_MODEL_TYPES: frozenset[str] = frozenset({"bert", "roberta", "xlm-roberta"})


class TaskMismatchError(ValueError):
    """A request of one kind (generate / embed) sent to a model of the other kind."""


def model_task(architecture: str) -> Task:
    return "embed" if architecture in POOLING_ARCHITECTURES else "generate"


def check_task(architecture: str, wanted: Task, model: str) -> None:
    """Raise :class:`TaskMismatchError` naming the model and the fix when it cannot do ``wanted``."""
    task = model_task(architecture)
    if task == wanted:
        return
    if wanted == "embed":
        raise TaskMismatchError(
            f"The model {model!r} ({architecture}) is a generative model and does not produce embeddings. "
            "Serve an embedding model (e.g. all-minilm-l6-v2) for embeddings, or use completions/chat."
        )
    raise TaskMismatchError(
        f"The model {model!r} ({architecture}) is an embedding model and cannot generate text. Ask it for "
        "embeddings (LLM.embed, POST /v1/embeddings), or load a generative model for completions/chat."
    )
