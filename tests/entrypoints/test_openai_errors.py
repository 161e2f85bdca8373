"""Every documented error: status code and OpenAI's body shape, naming the parameter at fault."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_utils import MODEL


def _check(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err["message"]


@pytest.fixture(scope="module")
def http(server, auth_headers):
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=60) as c:
        yield c


def test_malformed_json(http):
    r = http.post(
        "/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in _check(r, 400)


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"temperature": -1}, "temperature", "temperature"),
        ({"top_p": 2.0}, "top_p", "top_p"),
        ({"n": 0}, "n", "n must be"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"max_tokens": "lots"}, "max_tokens", "max_tokens"),
        ({"logprobs": 50}, "logprobs", "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty", "presence_penalty"),
        ({"top_k": -5}, "top_k", "top_k"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids", "vocabulary"),
        ({"seed": 2**70}, "seed", "seed"),
        ({"stop": [""]}, "stop", "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"suffix": "x"}, "suffix", "suffix"),
        ({"prompt": []}, "prompt", "prompt"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": [10**9]}, "prompt", "out of range"),
        ({"stop": 5}, "stop", "stop"),
    ],
)
def test_completion_invalid_params(http, body, param, needle):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", **body})
    msg = _check(r, 400, param)
    assert needle in msg


def test_missing_required(http):
    assert "prompt" in _check(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert "messages" in _check(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")
    _check(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),  # test_openai_structured_outputs.py
        ({"tool_choice": "required"}, "tool_choice"),  # no tools; the rest: test_openai_tools.py
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ],
)
def test_chat_invalid_params(http, body, param):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    _check(http.post("/v1/chat/completions", json=payload), 400, param)


def test_prompt_too_long(http):
    long_prompt = "hello" + " hello" * 2999  # 3000 tokens, over max_model_len=2048
    msg = _check(
        http.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert "2048" in msg and "3000" in msg
    msg = _check(
        http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]},
        ),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert "2048" in msg


def test_prompt_plus_max_tokens_over_context(http):
    r = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2044}
    )
    msg = _check(r, 400, "max_tokens", "context_length_exceeded")
    assert "2048" in msg and "2049" in msg and "2044" in msg  # 5 prompt tokens + 2044
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4000},
    )
    _check(r, 400, "max_completion_tokens", "context_length_exceeded")


def test_unknown_model(http, client):
    _check(
        http.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi"}), 404, "model", "model_not_found"
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])


def test_unknown_route_and_method(http):
    _check(http.get("/v1/nope"), 404)
    _check(http.get("/v1/completions"), 405)


def test_api_key(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    _check(httpx.post(server.url + "/v1/completions", json=body), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer not-the-key"}
    _check(httpx.post(server.url + "/v1/completions", json=body, headers=wrong), 401, code="invalid_api_key")
    _check(httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic abc"}), 401)
    _check(httpx.post(server.url + "/tokenize", json={"prompt": "Hi"}), 401)
    bad_client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    # Probes stay open.
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_models_version_tokenize(http, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = http.get("/v1/models").json()["data"][0]
    assert raw["max_model_len"] == 2048 and raw["object"] == "model"
    tok = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tok["count"]  # the template adds role markers
    _check(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens[0]")
    _check(http.post("/tokenize", json={}), 400, "prompt")
