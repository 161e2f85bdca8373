"""Architecture name (Hugging Face ``architectures[0]``) -> model class, imported only when asked for."""

from __future__ import annotations

import importlib

from torch import nn

from tidellm.config.arch import ArchConfig

# arch name -> "module:Class". Adding a family = one file + one line here.
_MODELS: dict[str, str] = {
    "BertModel": "tidellm.model_executor.models.bert:BertModel",  # embeddings (models/tasks.py)
    "RobertaModel": "tidellm.model_executor.models.bert:BertModel",  # BERT with offset positions
    "XLMRobertaModel": "tidellm.model_executor.models.bert:BertModel",
    "Gemma3ForCausalLM": "tidellm.model_executor.models.gemma3:Gemma3ForCausalLM",
    "LlamaForCausalLM": "tidellm.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tidellm.model_executor.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "tidellm.model_executor.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "tidellm.model_executor.models.moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "tidellm.model_executor.models.moe:Qwen3MoeForCausalLM",
    "Qwen2ForCausalLM": "tidellm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "tidellm.model_executor.models.qwen2:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "tidellm.model_executor.models.phi3:Phi3ForCausalLM",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MODELS))


def get_model_class(arch: ArchConfig | str) -> type[nn.Module]:
    """The class for ``arch`` (an ArchConfig or its ``architecture`` string); ValueError if unsupported."""
    name = arch.architecture if isinstance(arch, ArchConfig) else arch
    target = _MODELS.get(name)
    if target is None:
        raise ValueError(
            f"Model architecture {name!r} is not supported. Supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (`tidellm models` lists them with the named models)."
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
