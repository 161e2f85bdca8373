"""tidellm: a fast, easy LLM inference and serving engine on PyTorch.

``from tidellm import LLM, SamplingParams``; imports are lazy so ``import tidellm`` stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# How long an idle OpenMP thread spins before it sleeps. A decode step is a few hundred short parallel regions;
# threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) pay a wake-up in every one: served SmolLM2 on 2 cores,
# 16 streams 361 -> 571 tok/s and 1 stream 89 -> 191 tok/s (136 with small steps on one thread, the earlier
# workaround) with a 20000-iteration spin, tens of microseconds.
# libgomp's default spin (300000, about a millisecond) instead stalls a region for milliseconds whenever another
# process takes a core; with this one a fully busy neighbour core still costs a [8, 576] x [576, 1728] linear
# ~1 ms at p90 (vs 0.1 ms sleeping). Set before torch loads OpenMP, hence here; values the user set win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

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
