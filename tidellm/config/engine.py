"""The engine's settings. Defaults work without flags; each field documents itself for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
QUANTIZATION_CHOICES = ("auto", "none", "q8_0", "q4_1")  # see model_executor/quant/method.py
ACTIVATION_QUANTIZATION_CHOICES = ("auto", "int8", "none")
PREFILL_BATCHING_CHOICES = ("auto", "adaptive", "budget")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str = _f(
        DEFAULT_MODEL,
        "Model: a named model (smollm2-135m...), a local HF folder or .gguf file, or a HF repo id.",
    )
    dtype: str = _f(
        "auto",
        "Weight and activation dtype. 'auto' picks bfloat16 on GPUs and on CPUs with native bf16, else float32.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    max_model_len: int | None = _f(
        None, "Maximum tokens per sequence (prompt + output). Default: the model's context length."
    )
    seed: int = _f(0, "Seed for unseeded random sampling.")
    revision: str | None = _f(None, "Revision of a Hugging Face repo id.")
    max_logprobs: int = _f(20, "Largest number of logprobs a request may ask for.")
    quantization: str = _f(
        "auto",
        "Weight-only quantization on CPU. auto: keep GGUF Q4_0/Q4_1/Q8_0 weights as they are in the file "
        "(exact); none: dense weights; q8_0 / q4_1: quantize every linear to 8 or 4 bits (smaller, faster, "
        "slightly less accurate).",
        choices=QUANTIZATION_CHOICES,
    )
    activation_quantization: str = _f(
        "auto",
        "Activations of the block-quantized matmuls on CPU. auto: int8 (per block of 32, with VNNI dot "
        "products, as llama.cpp does) where the CPU has AVX-512 VNNI and the model runs in bfloat16; fp32 "
        "stays exact. int8: also in float32. none: activations stay in the model dtype.",
        choices=ACTIVATION_QUANTIZATION_CHOICES,
    )

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (got {self.max_model_len}).")
        if self.activation_quantization not in ACTIVATION_QUANTIZATION_CHOICES:
            raise ValueError(
                "activation_quantization must be one of "
                f"{', '.join(ACTIVATION_QUANTIZATION_CHOICES)} (got {self.activation_quantization!r})."
            )
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} (got {self.quantization!r})."
            )


@dataclass
class LoadConfig:
    cache_dir: str | None = _f(
        None, "Folder for fetched and converted models (default: $TIDELLM_CACHE_DIR or ~/.cache/tidellm)."
    )


@dataclass
class CacheConfig:
    block_size: int = _f(16, "Tokens per KV-cache block.")
    kv_cache_memory_gb: float | None = _f(
        None, "Memory for the KV cache in GiB. Default: 4 GiB, capped at a quarter of available memory."
    )
    enable_prefix_caching: bool = _f(True, "Reuse KV blocks of identical prompt prefixes across requests.")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (got {self.block_size}).")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0 (got {self.kv_cache_memory_gb}).")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _f(256, "Maximum number of sequences running at once.")
    max_num_batched_tokens: int = _f(
        512, "Token budget per engine step; long prompts are prefilled in chunks of at most this many tokens."
    )
    long_prefill_token_threshold: int = _f(
        0, "Cap on the tokens one request may prefill in a step (0: no cap beyond the step budget)."
    )
    policy: str = _f(
        "fcfs", "Scheduling policy: fcfs, or priority (lower value first).", choices=("fcfs", "priority")
    )
    prefill_batching: str = _f(
        "auto",
        "How many waiting prompts a step starts. adaptive: the number that gets them their first tokens "
        "soonest, from the measured cost of steps (core/sched/admission.py); budget: as many as the step's "
        "token budget holds (the fewest steps). auto: adaptive, except in the offline LLM, whose outputs come "
        "back all at once.",
        choices=PREFILL_BATCHING_CHOICES,
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 (got {self.max_num_seqs}).")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens}).")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority' (got {self.policy!r}).")
        if self.prefill_batching not in PREFILL_BATCHING_CHOICES:
            raise ValueError(
                f"prefill_batching must be one of {', '.join(PREFILL_BATCHING_CHOICES)} "
                f"(got {self.prefill_batching!r})."
            )


@dataclass
class DeviceConfig:
    device: str = _f(
        "auto", "Device: auto (cuda when available, else cpu), cpu or cuda.", choices=("auto", "cpu", "cuda")
    )
    num_threads: int | None = _f(None, "CPU threads for torch (default: all cores).")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``LLM(model=..., dtype=..., max_num_seqs=...)``)."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        owner = {f.name: section for section, klass in SECTIONS.items() for f in fields(klass)}
        for key, value in kwargs.items():
            if key not in owner:
                raise TypeError(
                    f"Unknown engine argument {key!r}. Valid arguments: {', '.join(sorted(owner))}."
                )
            parts[owner[key]][key] = value
        return cls(**{section: SECTIONS[section](**vals) for section, vals in parts.items()})


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "load": LoadConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "device": DeviceConfig,
}
