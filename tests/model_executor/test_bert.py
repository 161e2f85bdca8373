"""Our BertModel against transformers' on a tiny random BERT: last hidden states alone and packed (mixed
lengths, equal lengths), every pooling mode, checkpoint-name handling, refused variants, and the reader of
the sentence-transformers pooling declaration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tidellm.model_executor.layers.attention.encoder import EncoderMetadata
from tidellm.model_executor.layers.pooler import Pooler
from tidellm.model_executor.loader import ModelLoadError
from tidellm.model_executor.loader.hf_config import arch_from_hf_config
from tidellm.model_executor.loader.pooling_config import PoolingConfig, read_pooling_config
from tidellm.model_executor.models.registry import get_model_class
from tidellm.model_executor.models.tasks import model_task

VOCAB = 300


def random_hf_bert(seed: int = 0, **overrides) -> transformers.BertModel:
    """A small BERT with weights large enough that attention is far from uniform."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_act="gelu",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def ours_from(hf: transformers.BertModel, state: dict[str, torch.Tensor] | None = None):
    arch = arch_from_hf_config(hf.config.to_dict(), Path("tiny-bert"))
    model = get_model_class(arch)(arch)
    model.load_weights((state if state is not None else hf.state_dict()).items())
    return model.eval()


@pytest.fixture(scope="module")
def hf_bert():
    return random_hf_bert()


@pytest.fixture(scope="module")
def ours(hf_bert):
    return ours_from(hf_bert)


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _ours_packed(model, prompts: list[list[int]]) -> tuple[torch.Tensor, EncoderMetadata]:
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    meta = EncoderMetadata.build([len(p) for p in prompts], torch.device("cpu"))
    return model(ids, pos, meta), meta


@torch.no_grad()
def _hf_alone(hf, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).last_hidden_state[0]


def test_registry_and_task(ours):
    assert type(ours).__name__ == "BertModel" and model_task("BertModel") == "embed"
    assert model_task("LlamaForCausalLM") == "generate"


@pytest.mark.parametrize("lengths", [[1], [7], [64], [5, 17, 1, 40], [8, 8, 8]])
def test_hidden_states_match_transformers(hf_bert, ours, lengths):
    """Alone (one request) and packed (mixed lengths: padded attention with a key mask; equal lengths: no
    mask) against transformers run one prompt at a time."""
    prompts = _prompts(lengths)
    hidden, meta = _ours_packed(ours, prompts)
    assert hidden.shape == (sum(lengths), 64)
    starts = meta.query_start_loc.tolist()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(
            hidden[starts[i] : starts[i + 1]], _hf_alone(hf_bert, p), atol=2e-5, rtol=1e-5
        )


def test_packed_equals_hf_padded_batch(hf_bert, ours):
    """The same batch through transformers with padding + attention_mask gives the same rows."""
    prompts = _prompts([3, 12, 6], seed=4)
    hidden, meta = _ours_packed(ours, prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    with torch.no_grad():
        ref = hf_bert(ids, attention_mask=mask).last_hidden_state
    starts = meta.query_start_loc.tolist()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(hidden[starts[i] : starts[i + 1]], ref[i, : len(p)], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_modes(hf_bert, ours, mode, normalize):
    prompts = _prompts([4, 1, 9], seed=2)
    hidden, meta = _ours_packed(ours, prompts)
    pooled = Pooler(PoolingConfig(mode, normalize))(hidden, meta)
    assert pooled.shape == (3, 64) and pooled.dtype == torch.float32
    for i, p in enumerate(prompts):
        h = _hf_alone(hf_bert, p)
        ref = {"mean": h.mean(0), "cls": h[0], "last": h[-1]}[mode]
        if normalize:
            ref = torch.nn.functional.normalize(ref, dim=0)
        torch.testing.assert_close(pooled[i], ref, atol=2e-5, rtol=1e-5)
    if normalize:
        torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))


def test_other_activation_and_token_types(ours):
    hf = random_hf_bert(seed=3, hidden_act="gelu_new", type_vocab_size=1)
    model = ours_from(hf)
    (p,) = _prompts([11], seed=5)
    hidden, _ = _ours_packed(model, [p])
    torch.testing.assert_close(hidden, _hf_alone(hf, p), atol=2e-5, rtol=1e-5)


def test_task_checkpoint_names_load(hf_bert):
    """BertForMaskedLM-style checkpoints: a ``bert.`` prefix, pre-training heads and index buffers, old
    gamma/beta LayerNorm names: all accepted, heads skipped."""
    state = {}
    for k, v in hf_bert.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"bert.{k}"] = v
    state["cls.predictions.bias"] = torch.zeros(VOCAB)
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    model = ours_from(hf_bert, state)
    (p,) = _prompts([6], seed=6)
    torch.testing.assert_close(_ours_packed(model, [p])[0], _hf_alone(hf_bert, p), atol=2e-5, rtol=1e-5)


def test_missing_and_unexpected_weights_are_named(hf_bert):
    state = dict(hf_bert.state_dict())
    del state["encoder.layer.1.attention.self.key.bias"]
    state["encoder.layer.0.surprise.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing weights: \['encoder\.layer\.1\.attention\.self\.key\.bias'\]"
    ) as e:
        ours_from(hf_bert, state)
    assert "unexpected weights: ['encoder.layer.0.surprise.weight']" in str(e.value)
    bad = dict(hf_bert.state_dict())
    bad["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        ValueError, match=r"Cannot load weight 'encoder\.layer\.0\.intermediate\.dense\.weight'"
    ):
        ours_from(hf_bert, bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ({"hidden_act": "swish"}, "hidden_act='swish'"),
        ({"is_decoder": True}, "decoder"),
    ],
)
def test_unsupported_variants_are_refused(overrides, message):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    arch = arch_from_hf_config({**cfg.to_dict(), **overrides}, Path("x"))
    with pytest.raises(ValueError, match=message):
        get_model_class(arch)(arch)


def test_encoder_metadata_refuses_empty_requests():
    for lens in ([], [3, 0]):
        with pytest.raises(ValueError, match="at least one token"):
            EncoderMetadata.build(lens, torch.device("cpu"))


def test_hf_folder_runs_end_to_end(tmp_path, hf_bert):
    """save_pretrained folder -> our loader -> model: the same hidden states (no tokenizer needed here)."""
    from tidellm.model_executor.loader.hf_config import arch_from_hf_config as parse

    folder = tmp_path / "bert"
    hf_bert.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    arch = parse(config, folder)
    assert (arch.architecture, arch.model_type) == ("BertModel", "bert")
    from tidellm.model_executor.loader.safetensors_weights import SafetensorsWeights, find_weight_files

    model = get_model_class(arch)(arch)
    model.load_weights(SafetensorsWeights(find_weight_files(folder)).iter_weights())
    (p,) = _prompts([13], seed=8)
    torch.testing.assert_close(_ours_packed(model, [p])[0], _hf_alone(hf_bert, p), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the declared pooling
def _st_folder(tmp_path: Path, modules: list[dict] | None, pooling: dict | None) -> Path:
    folder = tmp_path / "st"
    folder.mkdir()
    if modules is not None:
        (folder / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def _flags(**on: bool) -> dict:
    base = {
        "word_embedding_dimension": 64,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    return {**base, **on}


@pytest.mark.parametrize(
    ("modules", "flags", "expected"),
    [
        (None, None, PoolingConfig("cls", True, declared=False)),
        (
            [TRANSFORMER, POOLING, NORMALIZE],
            _flags(pooling_mode_mean_tokens=True),
            PoolingConfig("mean", True, True),
        ),
        ([TRANSFORMER, POOLING], _flags(pooling_mode_cls_token=True), PoolingConfig("cls", False, True)),
        ([TRANSFORMER, POOLING], _flags(pooling_mode_lasttoken=True), PoolingConfig("last", False, True)),
    ],
)
def test_read_pooling_config(tmp_path, modules, flags, expected):
    assert read_pooling_config(_st_folder(tmp_path, modules, flags)) == expected


@pytest.mark.parametrize(
    ("modules", "flags", "message"),
    [
        ([TRANSFORMER, POOLING], _flags(pooling_mode_max_tokens=True), "pooling_mode_max_tokens"),
        ([TRANSFORMER, POOLING], _flags(), "asks for: none"),
        (
            [TRANSFORMER, POOLING],
            _flags(pooling_mode_mean_tokens=True, pooling_mode_cls_token=True),
            "exactly one",
        ),
        ([TRANSFORMER, POOLING], None, "1_Pooling/config.json is missing"),
        (
            [
                TRANSFORMER,
                POOLING,
                {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ],
            _flags(pooling_mode_mean_tokens=True),
            "models.Dense",
        ),
    ],
)
def test_unsupported_pooling_declarations_are_named(tmp_path, modules, flags, message):
    with pytest.raises(ModelLoadError, match=message):
        read_pooling_config(_st_folder(tmp_path, modules, flags))


# ---------------------------------------------------------------------- RoBERTa / XLM-R
def random_hf_roberta(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """RoBERTa or XLM-R: BERT whose positions start at pad_token_id + 1 (66 rows for 64 tokens)."""
    config_cls, model_cls = {
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
        "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
    }[kind]
    cfg = config_cls(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(cfg, add_pooling_layer=False).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p)
                if name.endswith("LayerNorm.weight")
                else 0.15 * torch.randn_like(p)
            )
    return model


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
def test_roberta_family_matches_transformers(tmp_path, kind):
    """From a saved folder (with the ``roberta.`` prefix of task checkpoints) through LLM.embed: the offset
    positions give transformers' hidden states, the 64 usable positions bound max_model_len, and the
    declared mean pooling matches."""
    from test_families import _write_tokenizer

    from tidellm import LLM
    from tidellm.model_executor.models.bert import max_input_positions

    hf = random_hf_roberta(kind)
    folder = tmp_path / kind
    hf.save_pretrained(folder, safe_serialization=True)
    arch = arch_from_hf_config(json.loads((folder / "config.json").read_text()), folder)
    assert arch.architecture == type(hf).__name__ and max_input_positions(arch) == 64
    assert model_task(arch.architecture) == "embed"
    model = get_model_class(arch)(arch)
    model.load_weights((f"roberta.{k}", v) for k, v in hf.state_dict().items())
    prompts = _prompts([5, 64, 17], seed=9)
    hidden, meta = _ours_packed(model.eval(), prompts)
    starts = meta.query_start_loc.tolist()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(hidden[starts[i] : starts[i + 1]], _hf_alone(hf, p), atol=2e-5, rtol=1e-5)

    _write_tokenizer(folder)  # word-level "t0".."t255"
    (folder / "modules.json").write_text(json.dumps([TRANSFORMER, POOLING]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(_flags(pooling_mode_mean_tokens=True)))
    llm = LLM(str(folder), dtype="float32", log_level="WARNING")
    assert llm.engine.max_model_len == 64
    texts = [" ".join(f"t{t % 256}" for t in p) for p in prompts]
    got = [o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)]
    for p, vector in zip(prompts, got, strict=True):
        ids = [t % 256 for t in p]
        torch.testing.assert_close(torch.tensor(vector), _hf_alone(hf, ids).mean(0), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="64"):
        llm.embed([" ".join(["t5"] * 65)], use_tqdm=False)
