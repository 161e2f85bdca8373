"""One shared `tidellm serve` for the endpoint tests (the model loads once per session)."""

from __future__ import annotations

import openai
import pytest
from server_utils import API_KEY, ENGINE_ARGS, MODEL, RemoteServer


@pytest.fixture(scope="session")
def server():
    """The main test server: SmolLM2 fp32, with an API key so the auth paths are exercised too."""
    srv = RemoteServer([MODEL, *ENGINE_ARGS, "--api-key", API_KEY])
    yield srv
    code = srv.stop()
    assert code == 0, srv.log


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
