"""How an embedding checkpoint turns token states into one vector, read from its sentence-transformers files.

sentence-transformers folders declare it: ``modules.json`` lists the pipeline (Transformer -> Pooling ->
optional Normalize), and the Pooling module's ``config.json`` (usually ``1_Pooling/config.json``) names the
mode. A plain Hugging Face folder declares nothing: we then use the [CLS] token, L2-normalized, as vLLM does
for BERT-style encoders.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tidellm.model_executor.loader.errors import ModelLoadError

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "last"]

_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_TRANSFORMER = "sentence_transformers.models.Transformer"
# 1_Pooling/config.json flag -> our mode (the modes we implement).
_MODE_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_UNSUPPORTED_FLAGS = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


@dataclass(frozen=True)
class PoolingConfig:
    mode: PoolingMode = "cls"
    normalize: bool = True
    declared: bool = False  # read from the checkpoint (False: the default above)

    def describe(self) -> str:
        how = "declared by the checkpoint" if self.declared else "default: no sentence-transformers config"
        return f"{self.mode} pooling{', L2-normalized' if self.normalize else ''} ({how})"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); restore it from the original model.") from e


def read_pooling_config(folder: Path) -> PoolingConfig:
    """The pooling ``folder`` declares (``folder`` is a model folder; anything else gets the default)."""
    modules_file = folder / "modules.json" if folder.is_dir() else None
    if modules_file is None or not modules_file.is_file():
        return PoolingConfig()
    modules = _read(modules_file)
    if not isinstance(modules, list):
        raise ModelLoadError(
            f"{modules_file} must be a JSON list of modules; restore it from the original model."
        )
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    others = [t for t in types if t not in (_POOLING, _NORMALIZE, _TRANSFORMER)]
    if others:
        raise ModelLoadError(
            f"{modules_file} declares sentence-transformers modules tidellm does not run: {', '.join(others)}. "
            "Supported pipelines are Transformer -> Pooling (-> Normalize)."
        )
    normalize = _NORMALIZE in types
    pooling = next((m for m in modules if isinstance(m, dict) and m.get("type") == _POOLING), None)
    if pooling is None:
        return PoolingConfig(normalize=normalize, declared=True)
    config_file = folder / str(pooling.get("path", "1_Pooling")) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{modules_file} names a Pooling module but {config_file} is missing; restore it from the original "
            "model."
        )
    config = _read(config_file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} must be a JSON object; restore it from the original model.")
    modes = [mode for flag, mode in _MODE_FLAGS.items() if config.get(flag)]
    unsupported = [flag for flag in _UNSUPPORTED_FLAGS if config.get(flag)]
    if unsupported or len(modes) != 1:
        asked = ", ".join(unsupported + [f for f in _MODE_FLAGS if config.get(f)]) or "none"
        raise ModelLoadError(
            f"{config_file}: tidellm supports exactly one of the pooling modes mean, cls or lasttoken; this "
            f"checkpoint asks for: {asked}."
        )
    return PoolingConfig(mode=modes[0], normalize=normalize, declared=True)
