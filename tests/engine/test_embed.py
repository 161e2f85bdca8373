"""``LLM.embed`` on the real all-MiniLM-L6-v2 against transformers + the declared pooling (mean, normalize):
varied texts alone and batched in one forward, token-id input, the 512-token limit and truncation, the
refusals both ways between embedding and generative models."""

from __future__ import annotations

import numpy as np
import pytest
from embedding_utils import HFEmbedder, cosine, long_text

from tidellm import LLM
from tidellm.engine.input_processor import PromptTooLongError
from tidellm.model_executor.models.tasks import TaskMismatchError
from tidellm.pooling_params import PoolingParams

MODEL = "all-minilm-l6-v2"
MIN_COS = 0.9999


@pytest.fixture(scope="module")
def hf(minilm_path) -> HFEmbedder:
    ref = HFEmbedder(minilm_path)
    assert (ref.mode, ref.normalize) == ("pooling_mode_mean_tokens", True)  # what the checkpoint declares
    return ref


@pytest.fixture(scope="module")
def llm(minilm_path) -> LLM:
    # A budget that fits every test batch, so "batched" means one forward.
    return LLM(MODEL, dtype="float32", max_num_batched_tokens=2048, log_level="WARNING")


@pytest.fixture(scope="module")
def texts(hf) -> list[str]:
    near_limit = long_text(hf.tokenizer, 510)
    assert 500 <= len(hf.tokenizer(near_limit)["input_ids"]) <= 512
    return [
        "hello world",
        "A man is eating food.",
        near_limit,
        "Ünïcödé façade — 日本語のテキストと絵文字 😀🚀, Ελληνικά και русский.",
        "",
        " ",
        "?",
    ]


def _embs(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs], dtype=np.float64)


def test_alone_matches_transformers(llm, hf, texts):
    ref = hf.embed(texts)
    for i, text in enumerate(texts):
        (out,) = llm.embed([text], use_tqdm=False)
        emb = out.outputs.embedding
        assert isinstance(emb, list) and len(emb) == 384 and out.outputs.hidden_size == 384
        assert cosine(emb, ref[i]) >= MIN_COS, (i, cosine(emb, ref[i]))
        assert abs(np.linalg.norm(emb) - 1) < 1e-5
        assert out.prompt == text and out.prompt_token_ids == hf.tokenizer(text)["input_ids"] and out.finished


def test_batched_in_one_forward_matches_transformers_and_alone(llm, hf, texts):
    engine = llm.engine
    for i, text in enumerate(texts):
        engine.add_pooling_request(f"b{i}", text, PoolingParams())
    outs = (
        engine.step()
    )  # one scheduler step = one forward over every prompt (mixed lengths, padded attention)
    assert sorted(o.request_id for o in outs) == sorted(f"b{i}" for i in range(len(texts)))
    assert not engine.has_unfinished_requests()
    by_id = {o.request_id: o for o in outs}
    batched = _embs([by_id[f"b{i}"] for i in range(len(texts))])
    ref = hf.embed(texts)
    alone = _embs([llm.embed([t], use_tqdm=False)[0] for t in texts])
    for i in range(len(texts)):
        assert cosine(batched[i], ref[i]) >= MIN_COS, i
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # And the public call on the whole list gives the same vectors, in input order.
    np.testing.assert_allclose(_embs(llm.embed(texts, use_tqdm=False)), batched, atol=1e-5)


def test_token_id_prompts(llm, hf):
    ids = hf.tokenizer("The tide is high")["input_ids"]
    by_ids = llm.embed([ids, ids[:3]], use_tqdm=False)
    by_text = llm.embed("The tide is high", use_tqdm=False)[0]
    assert by_ids[0].prompt is None and by_ids[0].prompt_token_ids == ids
    np.testing.assert_allclose(by_ids[0].outputs.embedding, by_text.outputs.embedding, atol=1e-6)
    single = llm.embed(ids, use_tqdm=False)  # one prompt given as a flat list of ids
    assert len(single) == 1
    with pytest.raises(ValueError, match=r"out of range \[0, 30522\)"):
        llm.embed([[101, 30522, 102]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]], use_tqdm=False)


def test_too_long_is_an_error_unless_truncation_is_asked(llm, hf):
    text = long_text(hf.tokenizer, 700)
    n = len(hf.tokenizer(text)["input_ids"])
    assert n > 512
    with pytest.raises(
        PromptTooLongError, match=rf"has {n} tokens .*\(max_model_len\) is 512 tokens.*truncate_prompt_tokens"
    ):
        llm.embed([text], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    for keep, expect_len in [(-1, 512), (10, 10)]:
        (out,) = llm.embed([text], truncate_prompt_tokens=keep, use_tqdm=False)
        ref_ids = hf.tokenizer(text, truncation=True, max_length=expect_len)["input_ids"]
        assert out.prompt_token_ids == ref_ids  # [CLS] ... [SEP], as transformers truncates
        assert cosine(out.outputs.embedding, hf.embed([text], max_length=expect_len)[0]) >= MIN_COS
    ids = list(range(1000, 1600))
    (out,) = llm.embed([ids], pooling_params=PoolingParams(truncate_prompt_tokens=5), use_tqdm=False)
    assert out.prompt_token_ids == ids[:5]
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be at most max_model_len=512"):
        llm.embed(["x"], truncate_prompt_tokens=600, use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be a positive integer or -1"):
        PoolingParams(truncate_prompt_tokens=0)


def test_dimensions_must_match(llm):
    assert len(llm.embed(["x"], PoolingParams(dimensions=384), use_tqdm=False)[0].outputs.embedding) == 384
    with pytest.raises(ValueError, match=r"dimensions must be 384.*\(got 128\)"):
        llm.embed(["x"], PoolingParams(dimensions=128), use_tqdm=False)


def test_embedding_model_refuses_to_generate(llm):
    with pytest.raises(TaskMismatchError, match=r"'all-minilm-l6-v2' \(BertModel\) is an embedding model"):
        llm.generate(["hello"], use_tqdm=False)
    with pytest.raises(TaskMismatchError, match="embedding model"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_generative_model_refuses_to_embed(llm_fp32):
    with pytest.raises(TaskMismatchError, match=r"'smollm2-135m' \(LlamaForCausalLM\) is a generative model"):
        llm_fp32.embed(["hello"], use_tqdm=False)


def test_max_model_len_is_the_position_table(minilm_path):
    with pytest.raises(
        ValueError, match=r"max_model_len=1024 exceeds the model's maximum input length \(512"
    ):
        LLM(MODEL, dtype="float32", max_model_len=1024, log_level="WARNING")
    short = LLM(MODEL, dtype="float32", max_model_len=16, log_level="WARNING")
    assert short.engine.max_model_len == 16
    with pytest.raises(PromptTooLongError, match="max_model_len\\) is 16"):
        short.embed(["word " * 20], use_tqdm=False)


def test_bfloat16_is_close(hf, texts):
    """The default dtype on CPUs with native bf16: embeddings stay close to the fp32 reference."""
    bf16 = LLM(MODEL, dtype="bfloat16", log_level="WARNING")
    ref = hf.embed(texts)
    for emb, r in zip(_embs(bf16.embed(texts, use_tqdm=False)), ref, strict=True):
        assert cosine(emb, r) >= 0.999
