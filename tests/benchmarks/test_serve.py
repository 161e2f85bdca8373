"""`tidellm bench serve` against a real `tidellm serve`: metrics present and sane, token counts exact with
ignore_eos, a stable JSON schema, and clear failures. Plus the datasets and the metric arithmetic alone."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from server_utils import ENGINE_ARGS, MODEL, REPO_ROOT, RemoteServer

from tidellm.benchmarks.datasets import sample_prefix, sample_random, sample_sharegpt
from tidellm.benchmarks.serve import RequestResult, parse_goodput, parse_percentiles, summarize

METRIC_KEYS = {
    f"{stat}_{m}_ms"
    for m in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p50", "p90", "p99")
}
SUMMARY_KEYS = {
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_concurrency",
    "max_concurrent_requests",
    "model",
    "errors",
} | METRIC_KEYS
RUN_KEYS = {
    "schema_version",
    "date",
    "tidellm_version",
    "label",
    "base_url",
    "endpoint",
    "tokenizer",
    "dataset",
    "dataset_path",
    "num_prompts",
    "seed",
    "random_input_len",
    "random_output_len",
    "random_range_ratio",
    "prefix_num_prefixes",
    "prefix_len",
    "prefix_suffix_len",
    "prefix_output_len",
    "request_rate",
    "burstiness",
    "num_warmups",
    "ignore_eos",
    "temperature",
    "top_p",
    "goodput_slos_ms",
    "percentiles",
    "machine",
}
DETAIL_KEYS = {"input_lens", "output_lens", "ttfts", "e2els", "itls", "request_errors"}


@pytest.fixture(scope="module")
def bench_server():
    srv = RemoteServer([MODEL, *ENGINE_ARGS])
    yield srv
    assert srv.stop() == 0, srv.log


def run_bench(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "tidellm.entrypoints.cli.main", "bench", "serve", "--tokenizer", MODEL]
    cmd += ["--save-result", str(out), "--save-detailed", "--disable-tqdm", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def assert_sane(r: dict, n: int) -> None:
    assert r["failed"] == 0 and r["errors"] == [], r["errors"]
    assert r["completed"] == n
    assert len(r["ttfts"]) == len(r["e2els"]) == n
    for ttft, e2e, itl, n_out in zip(r["ttfts"], r["e2els"], r["itls"], r["output_lens"], strict=True):
        assert 0 < ttft <= e2e
        assert 1 <= len(itl) + 1 <= n_out  # one chunk per token at most, the first one being the TTFT
        assert sum(itl) <= e2e - ttft + 1e-6
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"p50_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"]
        assert r[f"median_{m}_ms"] == r[f"p50_{m}_ms"]
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["request_throughput"] == pytest.approx(n / r["duration"])
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / r["duration"]
    )
    # Every request ends inside the benchmark's wall time.
    assert max(r["e2els"]) <= r["duration"]


def test_completions_fixed_concurrency(bench_server, tmp_path):
    hits_before = _prefix_hits(bench_server.url)
    proc, r = run_bench(
        tmp_path,
        *("--base-url", bench_server.url, "--num-prompts", "8", "--max-concurrency", "4"),
        *("--random-input-len", "32", "--random-output-len", "12", "--ignore-eos", "--num-warmups", "2"),
        *("--goodput", "ttft:600000", "tpot:600000", "--label", "tidellm"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Median TTFT (ms)" in proc.stdout
    assert set(r) == RUN_KEYS | SUMMARY_KEYS | DETAIL_KEYS
    assert r["schema_version"] == 1 and r["label"] == "tidellm" and r["model"] == MODEL
    assert_sane(r, 8)
    assert r["output_lens"] == [12] * 8  # ignore_eos: exactly what was asked
    assert r["input_lens"] == [32] * 8  # the server's count of the random prompts
    assert 1 <= r["max_concurrent_requests"] <= 4
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # SLOs nobody misses
    assert _prefix_hits(bench_server.url) == hits_before  # warm-ups use prompts of their own


def test_chat_poisson_and_length_ranges(bench_server, smollm2_tokenizer, tmp_path):
    args = ("--num-prompts", "6", "--random-input-len", "24", "--random-output-len", "10")
    args += ("--random-range-ratio", "0.5", "--seed", "3")
    proc, r = run_bench(
        tmp_path,
        *("--base-url", bench_server.url, "--endpoint", "/v1/chat/completions", *args),
        *("--request-rate", "20", "--burstiness", "0.5", "--ignore-eos", "--goodput", "ttft:0.001"),
        *("--temperature", "0.8", "--top-p", "0.9"),  # sampled requests
    )
    assert proc.returncode == 0, proc.stderr
    assert_sane(r, 6)
    assert (r["temperature"], r["top_p"]) == (0.8, 0.9)
    asked = sample_random(smollm2_tokenizer, 6, 24, 10, 0.5, seed=3)
    assert r["output_lens"] == [s.expected_output_len for s in asked]
    assert len(set(r["output_lens"])) > 1  # the range ratio really varies them
    assert r["request_goodput"] == 0.0  # a 1 µs TTFT SLO is missed by every request
    assert all(n > 24 * 0.5 for n in r["input_lens"])  # chat template tokens come on top


def _prefix_hits(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tidellm:prefix_cache_hits_total")
    )


def test_prefix_dataset_hits_the_prefix_cache(bench_server, tmp_path):
    before = _prefix_hits(bench_server.url)
    proc, r = run_bench(
        tmp_path,
        *(
            "--base-url",
            bench_server.url,
            "--dataset",
            "prefix",
            "--num-prompts",
            "6",
            "--max-concurrency",
            "1",
        ),
        *("--prefix-len", "96", "--prefix-num-prefixes", "2", "--prefix-suffix-len", "8"),
        *("--prefix-output-len", "3", "--ignore-eos"),
    )
    assert proc.returncode == 0, proc.stderr
    assert_sane(r, 6)
    # Requests 3..6 reuse a prefix already computed: at least its full 16-token blocks hit.
    assert _prefix_hits(bench_server.url) - before >= 4 * 80


def test_server_errors_are_counted_not_fatal(bench_server, tmp_path):
    proc, r = run_bench(
        tmp_path,
        *("--base-url", bench_server.url, "--num-prompts", "3", "--random-input-len", "8"),
        *("--random-output-len", "5000", "--ignore-eos"),
    )
    assert proc.returncode == 1
    assert r["completed"] == 0 and r["failed"] == 3
    assert r["errors"][0].startswith("HTTP 400") and "max_tokens" in r["errors"][0]
    assert "3 requests failed" in proc.stdout


def test_unreachable_server_and_bad_flags(tmp_path):
    proc, r = run_bench(tmp_path, "--base-url", "http://127.0.0.1:9", "--num-prompts", "1")
    assert proc.returncode == 1 and r is None
    assert "cannot reach http://127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = run_bench(tmp_path, "--goodput", "latency:5")
    assert proc.returncode == 1 and "METRIC:MS" in proc.stderr
    proc, _ = run_bench(tmp_path, "--dataset", "sharegpt")
    assert proc.returncode == 1 and "--dataset-path" in proc.stderr


# ---- pure parts ------------------------------------------------------------------------------------------


def test_summarize_arithmetic():
    rs = [
        RequestResult(True, 10, 11, ttft=0.1, latency=1.1, itl=[0.1] * 10),  # TPOT 100 ms
        RequestResult(True, 20, 1, ttft=0.3, latency=0.3),  # one token: no TPOT, no ITL
        RequestResult(False, error="HTTP 500: boom"),
    ]
    s = summarize(rs, duration=2.0, slos={"ttft": 200, "tpot": 150}, percentiles=[50, 99])
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 12)
    assert (
        s["request_throughput"] == 1.0
        and s["output_throughput"] == 6.0
        and s["total_token_throughput"] == 21.0
    )
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["mean_tpot_ms"] == pytest.approx(100.0) and s["std_tpot_ms"] == 0
    assert s["median_itl_ms"] == pytest.approx(100.0)
    assert s["mean_e2el_ms"] == pytest.approx(700.0)
    assert s["request_goodput"] == 0.5  # the second request misses the 200 ms TTFT SLO
    assert summarize(rs, 2.0, {}, [50])["request_goodput"] is None


def test_flag_parsers():
    assert parse_goodput(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["ttft:x"], ["foo:1"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50,99.9") == [50.0, 99.9]
    for bad in ("", "0", "101", "a,b"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


def test_random_dataset(smollm2_tokenizer):
    a = sample_random(smollm2_tokenizer, 20, 100, 16, 0.0, seed=1)
    assert [s.prompt_len for s in a] == [100] * 20
    assert [len(smollm2_tokenizer.encode(s.prompt)) for s in a] == [100] * 20
    assert a == sample_random(smollm2_tokenizer, 20, 100, 16, 0.0, seed=1)  # deterministic
    assert a != sample_random(smollm2_tokenizer, 20, 100, 16, 0.0, seed=2)
    b = sample_random(smollm2_tokenizer, 50, 40, 20, 0.25, seed=1)
    assert all(30 <= s.prompt_len <= 50 and 15 <= s.expected_output_len <= 25 for s in b)
    with pytest.raises(ValueError, match="range-ratio"):
        sample_random(smollm2_tokenizer, 1, 10, 10, 1.0, seed=0)


def test_prefix_dataset_shares_prefixes(smollm2_tokenizer):
    rows = sample_prefix(
        smollm2_tokenizer, 6, num_prefixes=2, prefix_len=64, suffix_len=8, output_len=5, seed=0
    )
    ids = [smollm2_tokenizer.encode(r.prompt) for r in rows]
    assert ids[0][:64] == ids[2][:64] == ids[4][:64] and ids[1][:64] == ids[3][:64]
    assert ids[0][:64] != ids[1][:64] and ids[0] != ids[2]
    assert all(r.expected_output_len == 5 for r in rows)


def test_sharegpt_dataset(smollm2_tokenizer, tmp_path):
    long_reply = "word " * 50
    data = [
        {
            "conversations": [
                {"from": "human", "value": "Tell me about the tides of the sea."},
                {"from": "gpt", "value": long_reply},
            ]
        },
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": long_reply}]
        },  # too short
        {"conversations": [{"from": "human", "value": "Only one turn here, nothing else."}]},
        {
            "conversation": [
                {"from": "human", "value": "Why is the sky blue, in one paragraph?"},
                {"from": "gpt", "value": "Rayleigh scattering of sunlight by air molecules."},
            ]
        },
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    rows = sample_sharegpt(smollm2_tokenizer, str(path), 2, seed=0)
    assert {r.prompt for r in rows} == {
        data[0]["conversations"][0]["value"],
        data[3]["conversation"][0]["value"],
    }
    enc = smollm2_tokenizer.encode
    want = {
        c[0]["value"]: len(enc(c[1]["value"], add_special_tokens=False))
        for c in (data[0]["conversations"], data[3]["conversation"])
    }
    assert {r.prompt: r.expected_output_len for r in rows} == want
    assert all(
        r.expected_output_len == 7 for r in sample_sharegpt(smollm2_tokenizer, str(path), 2, 0, output_len=7)
    )
    with pytest.raises(ValueError, match="only 2 usable"):
        sample_sharegpt(smollm2_tokenizer, str(path), 3, seed=0)
    with pytest.raises(FileNotFoundError, match="--dataset-path"):
        sample_sharegpt(smollm2_tokenizer, str(tmp_path / "nope.json"), 1, seed=0)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sample_sharegpt(smollm2_tokenizer, str(path), 1, seed=0)
