"""`tidellm generate`, `tidellm chat` and `tidellm bench throughput` as real processes."""

from __future__ import annotations

import json
import subprocess
import sys

ENGINE = ["--dtype", "float32", "--kv-cache-memory-gb", "0.1", "--max-model-len", "512"]


def _run(args: list[str], stdin: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tidellm.entrypoints.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_greedy_matches_offline_api(llm_fp32):
    from tidellm import SamplingParams

    res = _run(["generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0", *ENGINE])
    assert res.returncode == 0, res.stderr
    expected = llm_fp32.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert res.stdout.rstrip("\n") == expected[0].outputs[0].text


def test_chat_streams_replies_and_keeps_history():
    res = _run(
        ["chat", "--max-tokens", "6", "--temperature", "0", *ENGINE],
        stdin="Hello!\n/reset\nWhat is 2+2?\n/exit\n",
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2  # one reply per message


def test_bench_throughput_reports_figures(tmp_path):
    out = tmp_path / "bench.json"
    res = _run(
        [
            "bench",
            "throughput",
            "--num-prompts",
            "4",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--output-json",
            str(out),
            *ENGINE,
        ]
    )
    assert res.returncode == 0, res.stderr
    assert "requests/s" in res.stdout and "output tokens/s" in res.stdout
    data = json.loads(out.read_text())
    assert data["num_prompts"] == 4 and data["output_tokens_per_s"] > 0 and data["dtype"] == "float32"


def test_bad_model_path_is_one_clear_line(tmp_path):
    res = _run(["generate", "hi", "--model", str(tmp_path / "nope.gguf")])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "nope.gguf" in res.stderr


def test_models_lists_architectures_and_named_models(smollm2_source):
    from tidellm.model_executor.loader import NAMED_MODELS
    from tidellm.model_executor.models.registry import SUPPORTED_ARCHITECTURES

    res = _run(["models", "--json"], timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (
        info["architectures"] == list(SUPPORTED_ARCHITECTURES) and "LlamaForCausalLM" in info["architectures"]
    )
    by_name = {m["name"]: m for m in info["named_models"]}
    assert set(by_name) == set(NAMED_MODELS)
    assert (
        by_name["smollm2-135m"]["default"] and by_name["smollm2-135m"]["cached"]
    )  # smollm2_source fetched it
    text = _run(["models"], timeout=60)
    assert text.returncode == 0 and "smollm2-135m" in text.stdout and "LlamaForCausalLM" in text.stdout
