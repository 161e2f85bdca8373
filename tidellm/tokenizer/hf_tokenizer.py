"""Tokenizer settings from a Hugging Face folder, read as plain JSON (no transformers at run time).

The bos/eos policy is what transformers would do: ``add_bos_token``/``add_eos_token`` from
tokenizer_config.json when given, otherwise whatever the tokenizer.json post-processor adds (e.g. BERT's
[CLS] ... [SEP], Llama 3's <|begin_of_text|>). Generation-ending ids also come from generation_config.json.
The chat template is looked up where transformers v5 writes it (chat_template.jinja) and where older
versions did (tokenizer_config.json, as a string or a list of named templates).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)


class HFTokenizerError(ValueError):
    """The folder has no usable tokenizer; the message names the fix."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFTokenizerError(
            f"{path} is not valid JSON ({e}); restore the file from the original model."
        ) from e
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def chat_template_from_folder(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template") or read_json(folder / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _post_processor_specials(backend: BackendTokenizer) -> tuple[list[int], list[int]]:
    """Ids the post-processor puts before and after a sequence (probe with a one-character text)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def tokenizer_kwargs_from_hf_folder(folder: Path) -> tuple[BackendTokenizer, dict[str, Any]]:
    """The backend and the ``Tokenizer`` keyword arguments for a Hugging Face model folder."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise HFTokenizerError(
            f"{folder} has no tokenizer.json (only 'fast' tokenizers are supported). Create it with "
            f"transformers: AutoTokenizer.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r})."
        )
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as e:
        raise HFTokenizerError(f"{path} could not be read ({e}); restore it from the original model.") from e
    # Some tokenizer.json files (sentence-transformers exports) pad and truncate to a fixed length.
    backend.no_padding()
    backend.no_truncation()
    config = read_json(folder / "tokenizer_config.json")
    generation = read_json(folder / "generation_config.json")
    prefix, suffix = _post_processor_specials(backend)

    def special_id(name: str, fallback: int | None) -> int | None:
        token = _token_str(config.get(name))
        if token is None:
            return fallback
        tid = backend.token_to_id(token)
        if tid is None:
            logger.warning("%s %r from tokenizer_config.json is not in the vocabulary", name, token)
        return tid

    bos = special_id("bos_token", prefix[0] if prefix else None)
    eos = special_id("eos_token", suffix[-1] if suffix else None)
    extra_eos = [i for i in _ids(generation.get("eos_token_id")) if i != eos]
    return backend, {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "add_bos_token": bool(config.get("add_bos_token", bool(prefix))),
        "add_eos_token": bool(config.get("add_eos_token", bool(suffix))),
        "chat_template": chat_template_from_folder(folder, config),
        "extra_eos_token_ids": extra_eos,
    }
