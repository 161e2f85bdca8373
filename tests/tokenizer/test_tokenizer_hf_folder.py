"""Tokenizer settings from Hugging Face folders: bos/eos policy (config flags or the post-processor), extra
eos ids from generation_config.json, and the chat template in each place transformers has written it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tidellm.tokenizer.hf_tokenizer import HFTokenizerError
from tidellm.tokenizer.tokenizer import Tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|eot|>", "hello", "world", "!"]


def _folder(tmp_path: Path, *, post: str | None = None, padding: bool = False, **files: object) -> Path:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(w, special=True) for w in WORDS[:7] if w not in ("[UNK]",)])
    if post == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    elif post == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    if padding:
        tok.enable_padding(length=16)
        tok.enable_truncation(max_length=16)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        path = tmp_path / name.replace("__", ".")
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_bert_post_processor_gives_cls_and_sep(tmp_path):
    tok = Tokenizer.from_hf_folder(
        _folder(tmp_path, post="bert", padding=True, tokenizer_config__json={"cls_token": "[CLS]"})
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token, tok.add_eos_token) == (2, 3, True, True)
    assert tok.encode("hello world") == [2, 7, 8, 3]  # no padding to 16, no truncation
    assert tok.encode("hello world", add_special_tokens=False) == [7, 8]
    assert tok.decode([2, 7, 8, 3]) == "hello world"


def test_config_flags_override_post_processor(tmp_path):
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": False}
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, post="bos", tokenizer_config__json=cfg))
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (4, 5, False)
    assert tok.encode("hello") == [7]
    cfg["add_bos_token"], cfg["add_eos_token"] = True, True
    tok = Tokenizer.from_hf_folder(_folder(tmp_path / "b", tokenizer_config__json=cfg))
    assert tok.encode("hello") == [4, 7, 5]


def test_post_processor_bos_without_config(tmp_path):
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, post="bos"))
    assert (tok.bos_token_id, tok.add_bos_token, tok.eos_token_id) == (4, True, None)
    assert tok.encode("hello") == [4, 7]


def test_generation_config_eos_ids(tmp_path):
    folder = _folder(
        tmp_path,
        tokenizer_config__json={"eos_token": "</s>"},
        generation_config__json={"eos_token_id": [5, 6]},
    )
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.eos_token_id == 5 and tok.eos_token_ids == [5, 6]
    tok = Tokenizer.from_hf_folder(_folder(tmp_path / "int", generation_config__json={"eos_token_id": 6}))
    assert tok.eos_token_id is None and tok.eos_token_ids == [6]


def test_chat_template_locations(tmp_path):
    cfg = {"chat_template": "FROM_CONFIG"}
    assert (
        Tokenizer.from_hf_folder(_folder(tmp_path / "a", tokenizer_config__json=cfg)).chat_template
        == "FROM_CONFIG"
    )
    both = _folder(tmp_path / "b", tokenizer_config__json=cfg, chat_template__jinja="FROM_JINJA")
    assert Tokenizer.from_hf_folder(both).chat_template == "FROM_JINJA"  # v5 file wins
    named = {
        "chat_template": [{"name": "rag", "template": "RAG"}, {"name": "default", "template": "DEFAULT"}]
    }
    assert (
        Tokenizer.from_hf_folder(_folder(tmp_path / "c", tokenizer_config__json=named)).chat_template
        == "DEFAULT"
    )
    processor = _folder(tmp_path / "d", chat_template__json={"chat_template": "FROM_JSON"})
    assert Tokenizer.from_hf_folder(processor).chat_template == "FROM_JSON"
    assert Tokenizer.from_hf_folder(_folder(tmp_path / "e")).chat_template is None


def test_rendering_uses_special_tokens(tmp_path):
    cfg = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
    }
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, tokenizer_config__json=cfg))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(HFTokenizerError, match="no tokenizer.json.*save_pretrained"):
        Tokenizer.from_hf_folder(tmp_path)
    folder = _folder(tmp_path / "x", tokenizer_config__json="{not json")
    with pytest.raises(HFTokenizerError, match="not valid JSON"):
        Tokenizer.from_hf_folder(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(HFTokenizerError, match="could not be read"):
        Tokenizer.from_hf_folder(folder)


def test_unknown_special_token_is_ignored(tmp_path, caplog):
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, tokenizer_config__json={"eos_token": "<nope>"}))
    assert tok.eos_token_id is None and "not in the vocabulary" in caplog.text
