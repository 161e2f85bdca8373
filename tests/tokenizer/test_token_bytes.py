"""The bytes behind each token id, for grammar matching: byte-level BPE (SmolLM2's GGUF and the same
vocabulary as a Hugging Face folder), SentencePiece-style byte fallback, and plain vocabularies."""

from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tidellm.tokenizer.token_bytes import VocabEncoding, token_bytes, vocab_encoding
from tidellm.tokenizer.tokenizer import Tokenizer

TEXTS = ["Hello, world!", " naïve café — 😀 ünï", '{"a": [1, 2.5e-3], "b": null}\n\t  done', "日本語"]


def _joined(tb: list[bytes | None], ids: list[int]) -> bytes:
    return b"".join(tb[i] for i in ids)


def test_smollm2_gguf_bytes_rebuild_every_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert vocab_encoding(tok) is VocabEncoding.BYTE_LEVEL
    tb = token_bytes(tok)
    assert len(tb) == tok.vocab_size
    assert all(tb[i] is None for i in tok.all_special_ids) and tb[0] is None  # <|endoftext|>
    for text in TEXTS:  # tokens that split a multi-byte character still add up to its bytes
        assert _joined(tb, tok.encode(text, add_special_tokens=False)) == text.encode()
    assert tb[tok.encode(" the", add_special_tokens=False)[0]] == b" the"


def test_hf_folder_tokenizer_gives_the_same_bytes(smollm2_tokenizer, tmp_path):
    """The same vocabulary read through the Hugging Face folder path (tokenizer.json + config)."""
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"})
    )
    folder_tok = Tokenizer.from_hf_folder(tmp_path)
    assert token_bytes(folder_tok) == token_bytes(smollm2_tokenizer)


def _byte_fallback_tokenizer(tmp_path) -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁the", "▁", "t", "h", "e", "th", "the"]
    merges = [("t", "h"), ("th", "e"), ("▁", "the")]
    bpe = models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True)
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    backend.add_tokens([AddedToken("<tool>", special=False)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_hf_folder(tmp_path)


def test_byte_fallback_pieces_and_spaces(tmp_path):
    tok = _byte_fallback_tokenizer(tmp_path)
    assert vocab_encoding(tok) is VocabEncoding.BYTE_FALLBACK
    tb = token_bytes(tok)
    assert tb[:3] == [None, None, None]
    assert tb[3 + 0xC3] == b"\xc3" and tb[3 + 0x0A] == b"\n"
    assert tb[tok.token_to_id("▁the")] == b" the" and tb[tok.token_to_id("▁")] == b" "
    assert tb[tok.token_to_id("<tool>")] == b"<tool>"  # an added token is its own text
    ids = tok.encode("the ö", add_special_tokens=False)
    assert _joined(tb, ids) == " the ö".encode()  # the Metaspace prefix space is part of the first piece


def test_plain_vocabulary_is_taken_as_text(tmp_path):
    backend = HFTokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "there": 2}, unk_token="[UNK]"))
    backend.add_special_tokens([AddedToken("[UNK]", special=True)])
    tok = Tokenizer(backend)
    assert vocab_encoding(tok) is VocabEncoding.RAW
    assert token_bytes(tok) == [None, b"hi", b"there"]
