"""ModelSource: everything the engine needs from a model, whatever its format.

Opening a source reads only metadata (config, tokenizer, tensor tables); weights are streamed later by
``iter_weights`` one tensor at a time, so the model is never held twice in memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.models.tasks import ENCODER_MODEL_TYPES
from tidellm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:  # the API process opens sources for their tokenizer and never needs torch (0.7 s to import)
    import torch

logger = logging.getLogger(__name__)

# Bump when the GGUF -> tokenizer conversion changes, so cached conversions are redone.
_TOKENIZER_CACHE_VERSION = 1


class WeightStream(Protocol):
    def names(self) -> list[str]: ...
    def num_params(self) -> int: ...
    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class ModelSource:
    arch: ArchConfig
    tokenizer: Tokenizer
    description: str  # one line for start-up logs
    path: Path
    format: str  # "gguf" | "safetensors"
    weights: WeightStream = field(repr=False)

    def num_params(self) -> int:
        """Parameter count from tensor shapes (no data read): for the memory check before loading."""
        return self.weights.num_params()

    def iter_weights(self, keep_blocks: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, CPU tensor) pairs; float32, or the checkpoint's bf16/fp16. GGUF
        tensors named in ``keep_blocks`` come as ``QuantizedTensor`` where their type allows it."""
        if keep_blocks and self.format == "gguf":
            return self.weights.iter_weights(keep_blocks)
        return self.weights.iter_weights()


def _params_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def open_gguf(path: Path, name: str, cache_root: Path) -> ModelSource:
    from gguf import LlamaFileType

    from tidellm.model_executor.loader.gguf_arch import arch_from_gguf
    from tidellm.model_executor.loader.gguf_file import GGUFFile
    from tidellm.model_executor.loader.gguf_weights import GGUFWeights
    from tidellm.tokenizer.gguf_tokenizer import GGUFTokenizerError

    gguf = GGUFFile(path)
    arch = arch_from_gguf(gguf)
    weights = GGUFWeights(gguf, arch)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_file = cache_root / "tokenizers" / f"{path.stem}-{key}-v{_TOKENIZER_CACHE_VERSION}.json"
    try:
        tokenizer = Tokenizer.from_gguf(gguf.metadata, cache_file=cache_file)
    except GGUFTokenizerError as e:
        raise ModelLoadError(f"GGUF file {path}: cannot build its tokenizer: {e}.") from e
    try:
        quant = LlamaFileType(int(gguf.get("general.file_type"))).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quant = "mixed"
    description = (
        f"{name}: GGUF {quant}, {arch.model_type}, {_params_label(weights.num_params())} params at {path}"
    )
    return ModelSource(arch, tokenizer, description, path, "gguf", weights)


def open_hf_folder(folder: Path, name: str) -> ModelSource:
    from tidellm.model_executor.loader.hf_config import arch_from_hf_config
    from tidellm.model_executor.loader.safetensors_weights import SafetensorsWeights, find_weight_files
    from tidellm.tokenizer.hf_tokenizer import HFTokenizerError, read_json

    try:
        config = read_json(folder / "config.json")
        tokenizer = Tokenizer.from_hf_folder(folder)
    except HFTokenizerError as e:
        raise ModelLoadError(str(e)) from e
    arch = arch_from_hf_config(config, folder)
    files = find_weight_files(folder)
    weights = SafetensorsWeights(files)
    names = set(weights.names())
    if (
        arch.model_type not in ENCODER_MODEL_TYPES
        and not arch.tie_word_embeddings
        and "lm_head.weight" not in names
    ):
        logger.info("%s has no lm_head.weight: using tied embeddings", folder)
        arch.tie_word_embeddings = True
    shards = f" in {len(files)} shards" if len(files) > 1 else ""
    description = (
        f"{name}: safetensors {arch.checkpoint_dtype or 'unknown dtype'}{shards}, {arch.model_type}, "
        f"{_params_label(weights.num_params())} params at {folder}"
    )
    return ModelSource(arch, tokenizer, description, folder, "safetensors", weights)
