"""The model families the loader accepts, in one place (the model registry reconciles against this)."""

from __future__ import annotations

from tidellm.model_executor.loader.errors import ModelLoadError

# HF model_type -> HF architecture class name the loader reports in ArchConfig.architecture.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# config.json spellings that mean one of the families above.
MODEL_TYPE_ALIASES: dict[str, str] = {"gemma3_text": "gemma3"}

# GGUF general.architecture -> HF model_type. Mistral-style GGUFs say "llama", and so do Mixtral's (the
# loader tells them apart by their expert count).
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}


def check_model_type(model_type: str, where: str) -> str:
    """Normalise ``model_type`` to a supported family or raise naming the supported list."""
    family = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if family not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{where}: model architecture {model_type!r} is not supported. Supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Pick a model of one of these families."
        )
    return family
