"""``POST /v1/embeddings`` on a real `tidellm serve all-minilm-l6-v2`, through the official openai client:
string, list, token-id inputs, base64 equal to floats, usage counts, the 400s both ways between embedding and
generative models, and the other routes still working with an embedding model."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from embedding_utils import HFEmbedder, cosine, long_text
from server_utils import RemoteServer

EMBED_MODEL = "all-minilm-l6-v2"
MIN_COS = 0.9999
TEXTS = ["hello world", "Ünïcödé — 日本語 😀", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def embed_server(minilm_path):
    srv = RemoteServer([EMBED_MODEL, "--dtype", "float32"])
    yield srv
    code = srv.stop()
    assert code == 0, srv.log


@pytest.fixture(scope="module")
def eclient(embed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(minilm_path) -> HFEmbedder:
    return HFEmbedder(minilm_path)


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


def test_string_input_matches_transformers(eclient, hf):
    r = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS[0], encoding_format="float")
    assert r.object == "list" and r.model == EMBED_MODEL and len(r.data) == 1
    d = r.data[0]
    assert d.object == "embedding" and d.index == 0 and len(d.embedding) == 384
    assert cosine(d.embedding, hf.embed([TEXTS[0]])[0]) >= MIN_COS
    n = len(hf.tokenizer(TEXTS[0])["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n, n)


def test_list_input_in_order_with_usage(eclient, hf):
    r = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    ref = hf.embed(TEXTS)
    for d, expected in zip(r.data, ref, strict=True):
        assert cosine(d.embedding, expected) >= MIN_COS
    n = sum(len(hf.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n


def test_token_id_inputs_equal_text(eclient, hf):
    ids = [hf.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    by_text = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS[:2], encoding_format="float")
    one = eclient.embeddings.create(model=EMBED_MODEL, input=ids[0], encoding_format="float")
    many = eclient.embeddings.create(model=EMBED_MODEL, input=ids, encoding_format="float")
    assert len(one.data) == 1 and len(many.data) == 2
    np.testing.assert_allclose(one.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    for a, b in zip(many.data, by_text.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    assert many.usage.prompt_tokens == sum(len(x) for x in ids)


def test_base64_decodes_to_the_float_result(eclient, embed_server):
    """A single input always runs alone, so two requests give bit-identical vectors: base64 must decode to
    exactly the float32 values of the float response. A list may be batched differently from one request to
    the next (padding changes the summation order), so there the match is to float32 rounding."""

    def raw(inp) -> dict:
        body = {"model": EMBED_MODEL, "input": inp, "encoding_format": "base64"}
        r = httpx.post(embed_server.url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def decode(item: dict) -> np.ndarray:
        assert isinstance(item["embedding"], str)
        return np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")

    one = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS[1], encoding_format="float")
    body = raw(TEXTS[1])
    assert body["object"] == "list" and body["usage"] == one.usage.model_dump()
    np.testing.assert_array_equal(
        decode(body["data"][0]), np.asarray(one.data[0].embedding, dtype=np.float32)
    )

    floats = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS, encoding_format="float")
    for item, f in zip(raw(TEXTS)["data"], floats.data, strict=True):
        assert decode(item).shape == (384,)
        np.testing.assert_allclose(decode(item), f.embedding, atol=1e-6)
    # The openai client asks for base64 by default and decodes it itself.
    default = eclient.embeddings.create(model=EMBED_MODEL, input=TEXTS[1])
    assert default.data[0].embedding == [float(x) for x in np.asarray(one.data[0].embedding, np.float32)]


def test_limits_and_truncation(eclient, hf):
    text = long_text(hf.tokenizer, 600)
    with pytest.raises(openai.BadRequestError) as e:
        eclient.embeddings.create(model=EMBED_MODEL, input=text)
    err = _error(e.value)
    assert err["param"] == "input" and err["code"] == "context_length_exceeded" and "512" in err["message"]
    r = eclient.embeddings.create(
        model=EMBED_MODEL, input=text, encoding_format="float", extra_body={"truncate_prompt_tokens": -1}
    )
    assert r.usage.prompt_tokens == 512
    assert cosine(r.data[0].embedding, hf.embed([text], max_length=512)[0]) >= MIN_COS


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"input": "x", "dimensions": 128}, "dimensions", "dimensions must be 384"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": [[101, 102], []]}, "input", "input[1] is an empty list"),
        ({"input": [10**9]}, "input", "out of range"),
        ({"input": "x", "extra_body": {"truncate_prompt_tokens": 0}}, "truncate_prompt_tokens", "positive"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ],
)
def test_bad_requests_are_400s_naming_the_parameter(eclient, kwargs, param, needle):
    with pytest.raises(openai.BadRequestError) as e:
        eclient.embeddings.create(model=EMBED_MODEL, **kwargs)
    err = _error(e.value)
    assert err["param"] == param and needle in err["message"], err


def test_dimensions_equal_to_the_model_is_accepted(eclient):
    r = eclient.embeddings.create(model=EMBED_MODEL, input="x", dimensions=384, encoding_format="float")
    assert len(r.data[0].embedding) == 384


def test_embedding_model_refuses_completions_and_chat(eclient):
    with pytest.raises(openai.BadRequestError) as e:
        eclient.completions.create(model=EMBED_MODEL, prompt="hello", max_tokens=4)
    err = _error(e.value)
    assert err["param"] == "model" and err["code"] == "model_not_supported"
    assert "is an embedding model and cannot generate text" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        eclient.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in _error(e.value)["message"]


def test_generative_model_refuses_embeddings(client):
    """The shared SmolLM2 server (tests/entrypoints/conftest.py)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2-135m", input="hello")
    err = _error(e.value)
    assert err["param"] == "model" and err["code"] == "model_not_supported"
    assert "is a generative model and does not produce embeddings" in err["message"]


def test_other_routes_work_with_an_embedding_model(embed_server, eclient, hf):
    models = eclient.models.list()
    assert [m.id for m in models.data] == [EMBED_MODEL] and models.data[0].max_model_len == 512
    tok = httpx.post(embed_server.url + "/tokenize", json={"prompt": "hello world"}, timeout=30).json()
    assert tok["tokens"] == hf.tokenizer("hello world")["input_ids"] and tok["max_model_len"] == 512
    assert httpx.get(embed_server.url + "/health", timeout=30).status_code == 200
    served = eclient.embeddings.create(model=EMBED_MODEL, input="counted")
    metrics = httpx.get(embed_server.url + "/metrics", timeout=30)
    assert metrics.status_code == 200
    # Embedding requests are counted: their prompt tokens and their finish.
    lines = [ln for ln in metrics.text.splitlines() if ln.startswith("tidellm:prompt_tokens_total")]
    assert lines and float(lines[0].split()[-1]) >= served.usage.prompt_tokens > 0, metrics.text[:2000]
    stops = [ln for ln in metrics.text.splitlines() if ln.startswith("tidellm:request_finished_total")]
    assert any('finished_reason="stop"' in ln and float(ln.split()[-1]) >= 1 for ln in stops), stops
    assert "Serving 'all-minilm-l6-v2'" in embed_server.log and "embeddings" in embed_server.log
