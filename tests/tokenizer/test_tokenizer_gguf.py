"""Tokenizers rebuilt from GGUF metadata encode and decode exactly like transformers' GGUF converter.

Covers the real SmolLM2 byte-level BPE (fetched once by the session fixture), tiny SentencePiece-style
vocabularies written to GGUF here (llama and gemma3 flavours), the pre-tokenizer table, and the
conversion cache. Qwen2.5 and Gemma 3 parity run only with ``-m slow`` (hundreds of MB and ~30 s).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

import tidellm.tokenizer.gguf_tokenizer as gt
from tidellm.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "日本語のテキストと中文混合",
    "emoji 😀👍🏽🇫🇷 done",
    "numbers 1234567 3.14159 1,000,000 0x1F",
    "\t\ttabs\r\nwindows",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhello<end_of_turn>",
    "don't I'LL we've THEY'RE",
    "a  b   c    d",
    "naïve café résumé",
    "",
    " ",
    "\n",
    "Привет мир",
    "مرحبا بالعالم",
    "   \n\n   x",
    "<|endoftext|>hello",
]


def _assert_parity(ours: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (
                text
            )


def _transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol_ref(smollm2_source):
    return _transformers_tokenizer(Path(smollm2_source.path))


def test_smollm2_parity_with_transformers(smollm2_source, smol_ref):
    ours = smollm2_source.tokenizer
    assert ours.vocab_size == len(smol_ref) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (smol_ref.bos_token_id, smol_ref.eos_token_id)
    assert not ours.add_bos_token
    _assert_parity(ours, smol_ref, TEXTS)
    im_start = ours.encode("<|im_start|>", add_special_tokens=False)
    assert (
        im_start == [1]
        and ours.decode(im_start) == ""
        and ours.decode(im_start, skip_special_tokens=False) == "<|im_start|>"
    )


def test_smollm2_chat_template_matches_transformers(smollm2_source, smol_ref):
    ours = smollm2_source.tokenizer
    assert ours.chat_template == smol_ref.chat_template
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Sure?"},
    ]
    expected = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert expected.startswith("<|im_start|>system\n")


def test_smollm2_from_path_equals_source_tokenizer(smollm2_source):
    direct = Tokenizer.from_gguf(smollm2_source.path)
    text = "Streaming 123 tokens, 😀!"
    assert direct.encode(text) == smollm2_source.tokenizer.encode(text)


# ---------------------------------------------------------------- SentencePiece-style vocabularies
PIECES = [
    "▁",
    "▁t",
    "he",
    "▁the",
    "▁w",
    "or",
    "ld",
    "▁wor",
    "▁world",
    "h",
    "e",
    "t",
    "w",
    "o",
    "r",
    "l",
    "d",
    "a",
    "▁a",
]


def _write_spm(path: Path, arch: str) -> Path:
    """A tiny llama.cpp-style SentencePiece vocabulary: unk, bos/eos, 256 byte tokens, pieces, a control
    token, and (gemma) a whitespace token stored with real spaces."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", 1)
    writer.add_tokenizer_model("llama")
    extra = ["  "] if arch == "gemma3" else []
    tokens = (
        ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES + extra + ["<start_of_turn>"]
    )
    types = [2, 3, 3] + [6] * 256 + [1] * (len(PIECES) + len(extra)) + [3]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(arch != "gemma3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SPM_TEXTS = [
    "the world",
    " the  world",
    "hello wörld 😀",
    "a<start_of_turn>the",
    "",
    "  ",
    "the\nworld",
    "zzz",
]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_parity_with_transformers(tmp_path, arch):
    path = _write_spm(tmp_path / f"{arch}.gguf", arch)
    ours = Tokenizer.from_gguf(path)
    assert ours.add_bos_token  # llama.cpp's default for SentencePiece vocabularies
    _assert_parity(ours, _transformers_tokenizer(path), SPM_TEXTS)
    # byte fallback: characters outside the vocabulary become <0xNN> tokens and decode back
    ids = ours.encode("ö", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in ids][-2:] == ["<0xC3>", "<0xB6>"] and ours.decode(ids).strip() == "ö"


def test_derive_merges_order():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    merges = gt.derive_merges(vocab, {t: -i for t, i in vocab.items()})
    # "ab" (rank -2) before "abb"'s splits (rank -3: longer left part "ab"+"b" first), then "bb".
    assert merges == [("a", "b"), ("ab", "b"), ("a", "bb"), ("b", "b")]


# ---------------------------------------------------------------- pre-tokenizer table and errors
@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("llama-bpe", ["Ġ", "123", "45"]),
        ("qwen2", ["Ġ", "1", "2", "3", "4", "5"]),
        ("smollm", ["Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", ["Ġ12345"]),
        ("no-such-pre", ["Ġ12345"]),
    ],
)
def test_pre_tokenizer_digit_splits(pre, expected):
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.merges": [],
    }
    backend = gt.build_backend(meta)
    assert [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(" 12345")] == expected


def test_unsupported_tokenizer_model():
    with pytest.raises(gt.GGUFTokenizerError, match="'bert'.*not supported"):
        gt.build_backend({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(gt.GGUFTokenizerError, match="corrupt"):
        gt.build_backend(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a", "b"],
                "tokenizer.ggml.token_type": [1],
            }
        )


def test_end_of_generation_ids():
    meta = {
        "tokenizer.ggml.tokens": ["<eos>", "x", "<end_of_turn>", "<|im_end|>"],
        "tokenizer.ggml.token_type": [3, 1, 3, 1],  # a NORMAL "<|im_end|>" is just text
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": 2,
    }
    assert gt.gguf_eos_ids(meta) == [0, 2]


def test_sentencepiece_conversion_is_cached(tmp_path, monkeypatch):
    path = _write_spm(tmp_path / "g.gguf", "gemma3")
    cache = tmp_path / "cache" / "tok.json"
    first = Tokenizer.from_gguf(path, cache_file=cache)
    assert cache.is_file()

    def boom(_):
        raise AssertionError("should load from the cache")

    monkeypatch.setattr(gt, "build_backend", boom)
    again = Tokenizer.from_gguf(path, cache_file=cache)
    assert again.encode("the world") == first.encode("the world")


# ---------------------------------------------------------------- the big vocabularies (slow)
def _named_path(name: str) -> Path:
    from tidellm.model_executor.loader import fetch_named_model

    return fetch_named_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_big_vocab_parity_with_transformers(name):
    from tidellm.model_executor.loader import load_model_source

    source = load_model_source(name)
    ref = _transformers_tokenizer(source.path)
    # Our encode does not add a second BOS when the text already starts with one (transformers does).
    _assert_parity(source.tokenizer, ref, [t for t in TEXTS if not t.startswith("<bos>")])
    if source.tokenizer.chat_template:
        assert source.tokenizer.chat_template == ref.chat_template
