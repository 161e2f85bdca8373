"""`tidellm bench latency` and `tidellm bench throughput` through the real CLI on the real default model, at
tiny sizes: every documented JSON key present (and no undocumented one), values sane, token counts exact
with ignore_eos, no prefix-cache hits between iterations. Plus the statistics helper alone."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tidellm.benchmarks.common import STAT_KEYS, summarize
from tidellm.entrypoints.cli.main import main as cli_main

ENGINE = ["--dtype", "float32", "--kv-cache-memory-gb", "0.1", "--max-model-len", "256"]
BATCH, INPUT_LEN, OUTPUT_LEN, ITERS = 2, 16, 8, 3

MACHINE_KEYS = {
    "cpu",
    "cpu_flags",
    "cpu_count",
    "torch_threads",
    "torch_version",
    "python_version",
    "tidellm_version",
}
LATENCY_KEYS = {
    "benchmark",
    "schema_version",
    "model",
    "dtype",
    "batch_size",
    "input_len",
    "output_len",
    "num_iters",
    "num_iters_warmup",
    "prompt_seed",
    "input_tokens",
    "output_tokens",
    "prefix_caching",
    "prefix_cache_hit_tokens",
    "e2e_latency_s",
    "prefill_s",
    "decode_s",
    "tpot_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "iterations",
    "engine_args",
} | MACHINE_KEYS
LATENCY_STAT_FIELDS = (
    "e2e_latency_s",
    "prefill_s",
    "decode_s",
    "tpot_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
)
ITERATION_KEYS = {
    "e2e_s",
    "prefill_s",
    "decode_s",
    "tpot_ms",
    "decode_tokens_per_s",
    "prefill_steps",
    "decode_steps",
    "input_tokens",
    "output_tokens",
    "decode_tokens",
    "cached_tokens",
}
THROUGHPUT_KEYS = {
    "benchmark",
    "schema_version",
    "model",
    "dtype",
    "num_prompts",
    "input_len",
    "output_len",
    "input_tokens",
    "output_tokens",
    "elapsed_s",
    "requests_per_s",
    "output_tokens_per_s",
    "total_tokens_per_s",
    "prefix_cache_hit_tokens",
    "max_num_seqs",
    "max_num_batched_tokens",
    "engine_args",
} | MACHINE_KEYS


def _cli(argv: list[str]) -> tuple[int, str]:
    """The `tidellm` console script in-process (one torch import for the whole file); rc and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def latency(tmp_path_factory) -> tuple[int, str, dict]:
    path = tmp_path_factory.mktemp("latency") / "latency.json"
    # A step budget of 24 tokens splits the 2 x 16 prompt tokens over two steps: the first request already
    # decodes while the second finishes its prefill, so the phase split is exercised, not just one step.
    rc, stdout = _cli(
        [
            "bench",
            "latency",
            *("--batch-size", str(BATCH), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN)),
            *("--num-iters", str(ITERS), "--num-iters-warmup", "1", "--max-num-batched-tokens", "24"),
            *("--output-json", str(path), *ENGINE),
        ]
    )
    return rc, stdout, json.loads(path.read_text()) if path.exists() else {}


def test_latency_json_has_a_stable_schema(latency):
    rc, _, data = latency
    assert rc == 0
    assert set(data) == LATENCY_KEYS
    assert data["benchmark"] == "latency" and data["schema_version"] == 1
    for field in LATENCY_STAT_FIELDS:
        assert set(data[field]) == set(STAT_KEYS), field
    assert len(data["iterations"]) == ITERS
    for it in data["iterations"]:
        assert set(it) == ITERATION_KEYS
    assert data["engine_args"]["max_num_batched_tokens"] == 24 and data["engine_args"]["dtype"] == "float32"
    assert isinstance(data["cpu_flags"], list) and data["torch_threads"] >= 1


def test_latency_figures_are_sane(latency):
    _, _, d = latency
    assert (d["batch_size"], d["input_len"], d["output_len"]) == (BATCH, INPUT_LEN, OUTPUT_LEN)
    assert d["dtype"] == "float32" and d["model"] == "smollm2-135m"
    assert d["input_tokens"] == BATCH * INPUT_LEN and d["output_tokens"] == BATCH * OUTPUT_LEN
    # Fresh prompts per iteration: nothing is served from blocks cached by a warm-up or earlier iteration.
    assert d["prefix_caching"] is True and d["prefix_cache_hit_tokens"] == 0
    for it in d["iterations"]:
        assert it["prefill_s"] > 0 and it["decode_s"] > 0
        assert it["e2e_s"] >= it["prefill_s"]
        assert it["e2e_s"] == pytest.approx(it["prefill_s"] + it["decode_s"], abs=1e-5)
        assert (it["input_tokens"], it["output_tokens"]) == (BATCH * INPUT_LEN, BATCH * OUTPUT_LEN)
        assert it["prefill_steps"] == 2  # chunked over the 24-token budget
        # The request that started last needs output_len - 1 more steps; the earlier one got a token early.
        assert it["decode_steps"] == OUTPUT_LEN - 1
        assert it["decode_tokens"] == BATCH * OUTPUT_LEN - (BATCH + 1)
        assert it["tpot_ms"] == pytest.approx(1000 * it["decode_s"] / (OUTPUT_LEN - 1), rel=1e-4)
        assert it["decode_tokens_per_s"] == pytest.approx(it["decode_tokens"] / it["decode_s"], rel=1e-4)
        assert it["cached_tokens"] == 0
    for field in LATENCY_STAT_FIELDS:
        s = d[field]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], field
        assert s["min"] <= s["mean"] <= s["max"], field
    e2e = [it["e2e_s"] for it in d["iterations"]]
    assert d["e2e_latency_s"]["min"] == min(e2e) and d["e2e_latency_s"]["max"] == max(e2e)
    assert d["e2e_latency_s"]["p50"] >= d["prefill_s"]["p50"]


def test_latency_prints_a_readable_summary(latency):
    _, stdout, _ = latency
    assert "Latency: batch 2 x 16 prompt tokens -> 8 output tokens" in stdout
    for label in ("end to end", "prefill (TTFT)", "decode", "TPOT", "decode tok/s"):
        assert label in stdout
    assert stdout.count("iteration ") == ITERS


def test_latency_rejects_bad_sizes_before_loading_the_model(capsys):
    assert cli_main(["bench", "latency", "--num-iters", "0", *ENGINE]) == 1
    assert "--num-iters must be >= 1" in capsys.readouterr().err


def test_latency_refuses_lengths_the_engine_would_cap(capsys):
    # 250 + 10 > 256 would silently cap the output, and every per-token figure with it.
    argv = ["bench", "latency", "--input-len", "250", "--output-len", "10", "--num-iters", "1", *ENGINE]
    assert cli_main(argv) == 1
    assert "exceeds max_model_len 256" in capsys.readouterr().err


def test_throughput_json_keys_and_exact_token_counts(tmp_path):
    path = tmp_path / "throughput.json"
    n, inp, out = 3, 16, 8
    rc, stdout = _cli(
        [
            "bench",
            "throughput",
            *("--num-prompts", str(n), "--input-len", str(inp), "--output-len", str(out)),
            *("--output-json", str(path), *ENGINE),
        ]
    )
    assert rc == 0
    assert "output tokens/s" in stdout
    d = json.loads(path.read_text())
    assert set(d) == THROUGHPUT_KEYS
    assert d["benchmark"] == "throughput" and d["schema_version"] == 1 and d["dtype"] == "float32"
    assert (d["num_prompts"], d["input_len"], d["output_len"]) == (n, inp, out)
    assert d["input_tokens"] == n * inp and d["output_tokens"] == n * out  # ignore_eos: exact
    assert d["prefix_cache_hit_tokens"] == 0  # the warm-up prompts are not among the measured ones
    assert d["elapsed_s"] > 0
    assert d["output_tokens_per_s"] == pytest.approx(n * out / d["elapsed_s"], rel=0.02)
    assert d["total_tokens_per_s"] > d["output_tokens_per_s"] > 0
    assert d["requests_per_s"] == pytest.approx(n / d["elapsed_s"], rel=0.02)


def test_summarize_percentiles():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert set(s) == set(STAT_KEYS)
    assert (s["min"], s["p50"], s["mean"], s["max"]) == (1.0, 3.0, 3.0, 5.0)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["p90"] == pytest.approx(4.6) and s["p99"] == pytest.approx(4.96)
    assert summarize([2.5]) == dict.fromkeys(STAT_KEYS, 2.5)
    with pytest.raises(ValueError):
        summarize([])
