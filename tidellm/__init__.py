"""tidellm: a fast, easy LLM inference and serving engine on PyTorch.

``from tidellm import LLM, SamplingParams``; imports are lazy so ``import tidellm`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from tidellm.entrypoints.llm import LLM
    from tidellm.outputs import CompletionOutput, RequestOutput
    from tidellm.sample.params import SamplingParams

_LAZY = {
    "LLM": "tidellm.entrypoints.llm",
    "SamplingParams": "tidellm.sample.params",
    "RequestOutput": "tidellm.outputs",
    "CompletionOutput": "tidellm.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tidellm' has no attribute {name!r}")
