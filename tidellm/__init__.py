"""tidellm: a fast, easy LLM inference and serving engine on PyTorch.

``from tidellm import LLM, SamplingParams``; imports are lazy so ``import tidellm`` stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while waiting turn every matmul into a ~16 ms stall as soon as another process
# (the API server, a test runner, a neighbour) takes a core: measured 15.8 ms → 0.33 ms for an [8, 576] x
# [576, 1728] linear on 2 busy cores. Sleeping waits cost little when the machine is quiet. This must be set
# before torch loads OpenMP, hence here; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "PoolingParams",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "__version__",
]

if TYPE_CHECKING:
    from tidellm.entrypoints.llm import LLM
    from tidellm.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
    from tidellm.pooling_params import PoolingParams
    from tidellm.sample.params import SamplingParams

_LAZY = {
    "LLM": "tidellm.entrypoints.llm",
    "SamplingParams": "tidellm.sample.params",
    "RequestOutput": "tidellm.outputs",
    "CompletionOutput": "tidellm.outputs",
    "PoolingParams": "tidellm.pooling_params",
    "EmbeddingRequestOutput": "tidellm.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tidellm' has no attribute {name!r}")
