"""Server lifecycle on the shared server: client disconnects, 64 concurrent streams, Prometheus metrics."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from server_utils import MODEL


def scrape(server) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} (labels kept verbatim, model_name dropped)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        kept = [lb for lb in labels.rstrip("}").split(",") if lb and not lb.startswith("model_name=")]
        out[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return out


def wait_metrics(server, pred, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server)
        if pred(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


ABORTED = 'tidellm:request_finished_total{finished_reason="abort"}'
KV = "tidellm:kv_cache_usage_perc"
RUNNING = "tidellm:num_requests_running"


def test_stream_disconnect_aborts_and_frees_kv(server, auth_headers):
    before = scrape(server)[ABORTED]
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(headers=auth_headers, timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            got = 0
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got == 3:
                    break
        assert wait_metrics(server, lambda m: m[RUNNING] == 1 or m[ABORTED] > before)[KV] >= 0
    m = wait_metrics(server, lambda m: m[ABORTED] == before + 1 and m[KV] == 0 and m[RUNNING] == 0)
    assert m[ABORTED] == before + 1 and m[KV] == 0.0 and m[RUNNING] == 0


def test_non_streaming_disconnect_aborts(server, auth_headers):
    before = scrape(server)[ABORTED]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers=auth_headers, timeout=1.5)
    m = wait_metrics(server, lambda m: m[ABORTED] == before + 1 and m[KV] == 0 and m[RUNNING] == 0)
    assert m[ABORTED] == before + 1 and m[KV] == 0.0 and m[RUNNING] == 0


def test_64_concurrent_streams(server, async_client):
    n_clients, max_tokens = 64, 8
    peak_running = 0

    async def one(i: int) -> tuple[int, str | None, int]:
        stream = await async_client.completions.create(
            model=MODEL,
            prompt=f"Request number {i}: the weather today is",
            max_tokens=max_tokens,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, reason, usage = 0, None, None
        async for ch in stream:
            for c in ch.choices:
                chunks += 1
                reason = c.finish_reason or reason
            usage = ch.usage or usage
        return chunks, reason, usage.completion_tokens

    async def watch(done: asyncio.Event) -> None:
        nonlocal peak_running
        async with httpx.AsyncClient() as http:
            while not done.is_set():
                text = (await http.get(server.url + "/metrics")).text
                m = re.search(r"^tidellm:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.M)
                peak_running = max(peak_running, int(float(m.group(1))))
                await asyncio.sleep(0.1)

    async def main():
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_clients))), timeout=240)
        done.set()
        await watcher
        return results

    before = scrape(server)
    results = asyncio.run(main())
    assert len(results) == n_clients
    for chunks, reason, completion_tokens in results:
        assert reason == "length" and completion_tokens == max_tokens and chunks >= 2
    assert peak_running > 16, f"continuous batching expected, saw at most {peak_running} running"
    after = scrape(server)
    fin = 'tidellm:request_finished_total{finished_reason="length"}'
    assert after[fin] - before[fin] == n_clients
    gen = "tidellm:generation_tokens_total"
    assert after[gen] - before[gen] == n_clients * max_tokens
    assert after[KV] == 0.0


def test_metrics_exposition(server, client):
    prompt = "A long shared prefix for the prefix cache. " * 6  # > 2 blocks of 16 tokens
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    m = scrape(server)
    for name in (
        "tidellm:num_requests_running",
        "tidellm:num_requests_waiting",
        "tidellm:kv_cache_usage_perc",
        "tidellm:prompt_tokens_total",
        "tidellm:generation_tokens_total",
        "tidellm:prefix_cache_queries_total",
        "tidellm:prefix_cache_hits_total",
        'tidellm:request_finished_total{finished_reason="stop"}',
        "tidellm:time_to_first_token_seconds_count",
        "tidellm:time_per_output_token_seconds_count",
        "tidellm:e2e_request_latency_seconds_count",
        "tidellm:request_queue_time_seconds_count",
    ):
        assert name in m, name
    assert m["tidellm:prefix_cache_hits_total"] >= 32
    assert m["tidellm:prompt_tokens_total"] > 0 and m["tidellm:e2e_request_latency_seconds_count"] > 0
    assert (
        m["tidellm:time_to_first_token_seconds_count"]
        >= m["tidellm:e2e_request_latency_seconds_count"] - m[ABORTED]
    )
