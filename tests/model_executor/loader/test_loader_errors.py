"""Every user-facing failure is a ModelLoadError whose message names the cause and the fix."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest

from tidellm.model_executor.loader import ModelLoadError, load_model_source

Q = gguf.GGMLQuantizationType


def _load(path, tmp_path):
    return load_model_source(str(path), cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model, hf_gguf_writer):
    return hf_gguf_writer(tiny_model("llama"), tmp_path / "tiny.gguf", "llama")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_source(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_source("./no-such-folder")


def test_unknown_name_lists_named_models():
    with pytest.raises(ModelLoadError, match=r"Unknown model 'gpt-17'.*smollm2-135m.*qwen2.5-coder-0.5b"):
        load_model_source("gpt-17")


def test_folder_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="neither a Hugging Face model folder"):
        _load(tmp_path, tmp_path)


def test_folder_with_one_gguf_is_that_file(tmp_path, tiny_gguf):
    source = _load(tmp_path, tmp_path)
    assert source.path == tiny_gguf and source.format == "gguf"


def test_folder_with_several_ggufs(tmp_path, tiny_gguf):
    (tmp_path / "other.gguf").write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ModelLoadError, match="holds 2 .gguf files.*pass the path"):
        _load(tmp_path, tmp_path)


def test_file_inside_hf_folder_opens_the_folder(hf_folder, tmp_path):
    assert _load(hf_folder / "config.json", tmp_path).path == hf_folder
    assert _load(hf_folder / "model.safetensors", tmp_path).format == "safetensors"


def test_split_gguf_shard(tmp_path, tiny_gguf):
    shard = tmp_path / "model-00001-of-00002.gguf"
    shard.write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ModelLoadError, match="llama-gguf-split --merge"):
        _load(shard, tmp_path)


def test_bad_magic(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        _load(path, tmp_path)


def test_tiny_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        _load(path, tmp_path)


def test_unsupported_version(tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="version 1; only versions 2 and 3"):
        _load(tiny_gguf, tmp_path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 30 / 100_000])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: max(24, int(len(data) * keep))])
    with pytest.raises(ModelLoadError, match=r"truncated or corrupt.*fetch it again"):
        _load(tiny_gguf, tmp_path)


def test_corrupt_metadata_count(tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 40)  # kv_count
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt"):
        _load(tiny_gguf, tmp_path)


def test_unsupported_architecture(tmp_path, gguf_writer):
    path = gguf_writer(
        tmp_path / "f.gguf", "falcon", {"block_count": 1}, [("token_embd.weight", np.ones((4, 32)), Q.F32)]
    )
    with pytest.raises(
        ModelLoadError, match=r"'falcon'.*Supported GGUF architectures: llama, qwen2, qwen3, gemma3"
    ):
        _load(path, tmp_path)


def test_missing_hyperparameter(tmp_path, gguf_writer):
    path = gguf_writer(
        tmp_path / "m.gguf", "llama", {"block_count": 1}, [("token_embd.weight", np.ones((4, 32)), Q.F32)]
    )
    with pytest.raises(ModelLoadError, match="lacks metadata key llama.embedding_length"):
        _load(path, tmp_path)


def test_gguf_without_tokenizer(tmp_path, gguf_writer):
    meta = {"block_count": 1, "embedding_length": 32, "feed_forward_length": 32, "attention.head_count": 1}
    path = gguf_writer(
        tmp_path / "m.gguf",
        "llama",
        meta,
        [("token_embd.weight", np.ones((4, 32)), Q.F32)],
        with_tokenizer=False,
    )
    with pytest.raises(ModelLoadError, match="cannot build its tokenizer.*no tokenizer.ggml.tokens"):
        _load(path, tmp_path)


# ---------------------------------------------------------------- Hugging Face folders
@pytest.fixture
def hf_folder(tmp_path, make_hf_folder):
    return make_hf_folder(tmp_path / "hf")


def test_unsupported_hf_architecture(hf_folder, tmp_path):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"'gpt_neox' is not supported\. Supported: llama, mistral, qwen2, qwen3, .*gemma3, bert",
    ):
        _load(hf_folder, tmp_path)


def test_corrupt_safetensors_header(hf_folder, tmp_path):
    st = hf_folder / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:16] = b"{garbage"
    st.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="truncated or corrupt.*not valid JSON"):
        _load(hf_folder, tmp_path)


def test_truncated_safetensors(hf_folder, tmp_path):
    st = hf_folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt.*download the model again"):
        _load(hf_folder, tmp_path)


def test_no_weights(hf_folder, tmp_path):
    (hf_folder / "model.safetensors").rename(hf_folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no safetensors weights.*PyTorch .bin"):
        _load(hf_folder, tmp_path)


def test_no_tokenizer(hf_folder, tmp_path):
    (hf_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json.*save_pretrained"):
        _load(hf_folder, tmp_path)


def test_missing_shard(tmp_path, make_hf_folder):
    folder = make_hf_folder(tmp_path / "sharded", max_shard_size="20KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="missing weight shards.*incomplete"):
        _load(folder, tmp_path)
