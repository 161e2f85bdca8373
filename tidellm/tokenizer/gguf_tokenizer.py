"""Build a ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.*``), without transformers.

A GGUF carries the vocabulary, merges (or scores) and token types, but not the normalizer/pre-tokenizer
pipeline of the original tokenizer.json; ``tokenizer.ggml.pre`` names it. We rebuild the pipeline the way
llama.cpp interprets these names, so that ids match both llama.cpp and the model's original tokenizer:

* ``gpt2`` model: byte-level BPE; the split regex comes from ``tokenizer.ggml.pre``.
* ``llama`` model: SentencePiece-style BPE with byte fallback; merges are derived from the vocabulary
  (ranked by score, or by file order for Gemma, whose scores do not follow merge order).

Token types (llama.cpp's enum): control -> special added tokens, user-defined -> plain added tokens, so
``<|im_start|>`` stays whole.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes, as in the original tokenizer.json files (llama.cpp adapts the same expressions).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> list of (regex, ignore_merges); the regexes are applied in order.
_PRE_SPLITS: dict[str, tuple[list[str], bool]] = {
    "gpt2": ([GPT2_SPLIT], False),
    "default": ([GPT2_SPLIT], False),
    **{name: ([r"\p{N}", GPT2_SPLIT], False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: ([LLAMA3_SPLIT], True) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")},
    **{name: ([QWEN2_SPLIT], False) for name in ("qwen2", "deepseek-r1-qwen")},
}


class GGUFTokenizerError(ValueError):
    """The GGUF metadata describes a tokenizer we cannot build."""


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_backend(metadata: Mapping[str, Any]) -> BackendTokenizer:
    """The tokenizers backend for the tokenizer a GGUF file's metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: Sequence[str] | None = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFTokenizerError("the GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    scores = metadata.get("tokenizer.ggml.scores")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise GGUFTokenizerError(
            f"tokenizer.ggml.tokens has {len(tokens)} entries but token_type/scores have {len(types)}/"
            f"{len(scores) if scores is not None else '-'}; the file is corrupt"
        )
    if kind == "gpt2":
        backend, vocab_tokens = _byte_level(metadata, list(tokens))
    elif kind == "llama":
        backend, vocab_tokens = _sentencepiece(metadata, list(tokens), types)
    else:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' "
            "SentencePiece BPE)"
        )
    _add_special_tokens(backend, vocab_tokens, types, byte_level=kind == "gpt2")
    return backend


def _byte_level(metadata: Mapping[str, Any], tokens: list[str]) -> tuple[BackendTokenizer, list[str]]:
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # Tokens outside the byte alphabet (mislabelled raw text) are re-spelled as their UTF-8 bytes.
    spelled = [t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_SPLITS:
        logger.warning("Unknown tokenizer.ggml.pre %r: using GPT-2's split regex", pre)
    regexes, ignore_merges = _PRE_SPLITS.get(pre, _PRE_SPLITS["default"])
    backend = BackendTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            ignore_merges=ignore_merges,
            continuing_subword_prefix="",
        )
    )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int]
) -> tuple[BackendTokenizer, list[str]]:
    gemma = metadata.get("general.architecture", "").startswith("gemma")
    if gemma:
        # Gemma files store whitespace-only tokens with real spaces; the normalizer produces "▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        # Gemma's scores do not follow its merge order; the order of the vocabulary does.
        rank = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        rank = (
            dict(zip(tokens, scores, strict=True))
            if scores is not None
            else {t: -i for i, t in enumerate(tokens)}
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    unk = tokens[int(unk_id)] if unk_id is not None else None
    bpe = BPE(
        vocab=vocab, merges=derive_merges(vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    backend = BackendTokenizer(bpe)
    replace, fallback, fuse = decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([replace, fallback, fuse])
    else:
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [replace, fallback, fuse] + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        backend.decoder = decoders.Sequence(steps)
    return backend, tokens


def derive_merges(vocab: Mapping[str, int], rank: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two known pieces.

    A merge inherits the rank of the piece it produces (higher first); ties go to the longer left part,
    then the longer right part, then vocabulary order, which is how SentencePiece-converted tokenizer.json
    files are ordered.
    """
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in rank.items():
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        found.extend((score, len(left), len(right), left, right) for _, _, left, right in local)
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for *_, left, right in found]


def _add_special_tokens(
    backend: BackendTokenizer, tokens: list[str], types: list[int], byte_level: bool
) -> None:
    chars = set(_byte_alphabet().values()) if byte_level else None
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        # A byte-level "control" token outside the byte alphabet is a converter mislabel; adding it would
        # grow the vocabulary past the embedding.
        if kind == TOKEN_CONTROL and (chars is None or set(t) <= chars)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


# Control tokens that end a turn. llama.cpp treats these texts as end-of-generation whatever the eos id says
# (e.g. Gemma's <end_of_turn>, Qwen's <|endoftext|>), as do the models' own generation configs.
_END_OF_GENERATION = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
)


def gguf_eos_ids(metadata: Mapping[str, Any]) -> list[int]:
    """Every id that ends generation: eos first, then eot/eom and end-of-turn control tokens."""
    ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type")
    if types is not None:
        wanted = set(_END_OF_GENERATION)
        ids += [
            i
            for i, (t, kind) in enumerate(zip(tokens, types, strict=False))
            if kind == TOKEN_CONTROL and t in wanted
        ]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def tokenizer_config_from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Tokenizer`` keyword arguments (special ids, bos/eos policy, chat template) from GGUF metadata."""

    def token_id(name: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    sentencepiece = metadata.get("tokenizer.ggml.model") == "llama"
    eos = token_id("eos")
    extra = [i for i in gguf_eos_ids(metadata) if i != eos]
    return {
        "bos_token_id": token_id("bos"),
        "eos_token_id": eos,
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "extra_eos_token_ids": extra,
    }


def load_gguf_backend(metadata: Mapping[str, Any], cache_file: Path | None = None) -> BackendTokenizer:
    """``build_backend`` with an on-disk cache for the slow SentencePiece conversion."""
    if cache_file is not None and cache_file.is_file():
        try:
            return BackendTokenizer.from_file(str(cache_file))
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            logger.warning("Ignoring unreadable tokenizer cache %s: %s", cache_file, e)
    backend = build_backend(metadata)
    if cache_file is not None and metadata.get("tokenizer.ggml.model") == "llama":
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            backend.save(str(tmp))
            os.replace(tmp, cache_file)
        except OSError as e:
            logger.warning("Could not cache the converted tokenizer at %s: %s", cache_file, e)
    return backend
