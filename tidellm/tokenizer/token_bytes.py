"""The bytes each token id stands for, as a grammar matcher needs them.

``decode([id])`` cannot answer this: a token holding half of a UTF-8 character decodes to U+FFFD, and
SentencePiece decoders strip a leading space. So we read the vocabulary the way the tokenizer's decoder
would: byte-level BPE spells bytes with GPT-2's printable alphabet ("Ġ" = b" "); SentencePiece-style BPE
writes spaces as "▁" and unknown bytes as "<0xNN>" pieces; anything else is taken as its UTF-8 text.
Special (control) tokens are ``None``: a grammar must never produce them as text.
"""

from __future__ import annotations

import enum
import functools
import json
import re

from tidellm.tokenizer.tokenizer import Tokenizer


class VocabEncoding(enum.Enum):
    BYTE_LEVEL = "byte_level"  # GPT-2 / Llama 3 / Qwen / SmolLM
    BYTE_FALLBACK = "byte_fallback"  # SentencePiece BPE: "▁" spaces, "<0xNN>" bytes (Llama 2, Gemma)
    RAW = "raw"  # tokens are their own text (WordLevel / tiktoken-style vocabularies)


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's printable character -> byte (the inverse of its byte -> character table)."""
    from tidellm.tokenizer.gguf_tokenizer import _byte_alphabet

    return {c: b for b, c in _byte_alphabet().items()}


def _decoder_types(node: object) -> list[str]:
    """Every decoder ``type`` in a (possibly nested Sequence) decoder description."""
    if isinstance(node, dict):
        out = [node["type"]] if isinstance(node.get("type"), str) else []
        for child in node.get("decoders") or []:
            out += _decoder_types(child)
        return out
    return []


def vocab_encoding(tokenizer: Tokenizer) -> VocabEncoding:
    """How the vocabulary spells bytes, read from the tokenizer's own decoder."""
    decoder = tokenizer.backend.decoder
    types = _decoder_types(json.loads(decoder.__getstate__())) if decoder is not None else []
    if "ByteLevel" in types:
        return VocabEncoding.BYTE_LEVEL
    if "ByteFallback" in types or getattr(tokenizer.backend.model, "byte_fallback", False):
        return VocabEncoding.BYTE_FALLBACK
    if "Metaspace" in types:  # SentencePiece without byte pieces
        return VocabEncoding.BYTE_FALLBACK
    return VocabEncoding.RAW


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """``out[id]``: the bytes token ``id`` adds to the text, or ``None`` for special tokens and ids the
    vocabulary skips. Length = the tokenizer's vocabulary size (added tokens included)."""
    encoding = vocab_encoding(tokenizer)
    added = tokenizer.backend.get_added_tokens_decoder()
    special = tokenizer.all_special_ids
    inverse = _byte_level_inverse() if encoding is VocabEncoding.BYTE_LEVEL else {}
    out: list[bytes | None] = []
    for tid in range(tokenizer.vocab_size):
        if tid in special:
            out.append(None)
            continue
        if tid in added:  # added tokens are stored as plain text, whatever the vocabulary's spelling
            out.append(added[tid].content.encode("utf-8"))
            continue
        piece = tokenizer.backend.id_to_token(tid)
        if piece is None:
            out.append(None)
        elif encoding is VocabEncoding.BYTE_LEVEL:
            if all(c in inverse for c in piece):
                out.append(bytes(inverse[c] for c in piece))
            else:  # outside the byte alphabet: a mislabelled raw-text token
                out.append(piece.encode("utf-8"))
        elif encoding is VocabEncoding.BYTE_FALLBACK:
            m = _BYTE_PIECE.match(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace(_SPIECE_SPACE, " ").encode())
        else:
            out.append(piece.encode("utf-8"))
    return out
