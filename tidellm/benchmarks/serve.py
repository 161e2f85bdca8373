"""`tidellm bench serve`: a load generator for any OpenAI-compatible server (tidellm, vLLM, llama.cpp's server).

It streams every request and timestamps each chunk, so the metrics mean what vLLM's serving benchmark means:
  - TTFT: request sent → first streamed chunk that carries generated text (a chat stream's role-only
    opener and a bare finish chunk do not count: they say nothing about when tokens came).
  - ITL: gaps between consecutive chunks of one request (all requests pooled).
  - TPOT: per request, (E2E − TTFT) / (output tokens − 1); requests with one output token are skipped.
  - E2E: request sent → last byte of the stream.
  - Throughputs divide by the benchmark's wall time (first request sent → last one finished), warm-ups excluded.
  - Goodput: requests per second that meet every SLO given with ``--goodput`` (e.g. ``ttft:500 tpot:50``, ms).
Output tokens are the server's ``usage.completion_tokens`` when it sends usage, else the re-tokenized text.
Arrivals follow a Poisson process at ``--request-rate`` (gamma intervals with ``--burstiness``), or all at
once when the rate is ``inf``; ``--max-concurrency`` caps requests in flight in both cases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and the tokenizer load only when a benchmark runs, not on every CLI start
    from tidellm.benchmarks.datasets import SampleRequest

SCHEMA_VERSION = 1
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root (default: %(default)s).")
    g.add_argument(
        "--endpoint",
        default="/v1/completions",
        choices=["/v1/completions", "/v1/chat/completions"],
        help="API to load (default: %(default)s). Chat sends each prompt as one user message.",
    )
    g.add_argument("--model", default=None, help="Model name sent in requests (default: the server's first).")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tidellm model (name, path) whose tokenizer builds prompts and counts tokens (default: --model).",
    )
    g.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key ($OPENAI_API_KEY)."
    )
    g.add_argument("--timeout", type=float, default=3600.0, help="Per-request timeout in seconds.")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random", choices=["random", "sharegpt", "prefix"])
    g.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file, for --dataset sharegpt.")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--seed", type=int, default=0, help="Seed for prompts and arrival times.")
    g.add_argument("--random-input-len", type=int, default=100)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths uniform in len*[1-r, 1+r] (default: 0).",
    )
    g.add_argument("--prefix-num-prefixes", type=int, default=4)
    g.add_argument("--prefix-len", type=int, default=512, help="Tokens in each shared prefix.")
    g.add_argument("--prefix-suffix-len", type=int, default=32, help="Unique tokens after the prefix.")
    g.add_argument("--prefix-output-len", type=int, default=64)
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="Override the replies' lengths.")

    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=float("inf"), help="Requests/s; inf = all at once.")
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of arrivals; 1 = Poisson.")
    g.add_argument("--max-concurrency", type=int, default=None, help="Cap on requests in flight.")
    g.add_argument("--num-warmups", type=int, default=0, help="Untimed requests sent first.")
    g.add_argument("--ignore-eos", action="store_true", help="Generate exactly the requested output lengths.")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None, help="Sent with every request when given.")

    g = p.add_argument_group("results")
    g.add_argument(
        "--goodput", nargs="+", default=None, metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50."
    )
    g.add_argument("--percentiles", default="50,90,99", help="Percentiles to report (default: %(default)s).")
    g.add_argument("--save-result", default=None, metavar="FILE", help="Write the results as JSON here.")
    g.add_argument("--save-detailed", action="store_true", help="Include per-request figures in the JSON.")
    g.add_argument("--label", default=None, help="Free-form name recorded in the JSON (e.g. the engine).")
    g.add_argument("--disable-tqdm", action="store_true")


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in METRICS:
            raise ValueError(
                f"--goodput {item!r}: expected METRIC:MS with METRIC one of {', '.join(METRICS)}."
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds.") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be positive.")
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        ps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--percentiles {text!r}: expected comma-separated numbers like 50,90,99.") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"--percentiles {text!r}: each must be in (0, 100].")
    return ps


def _pct_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


async def _send(session, url: str, headers: dict, payload: dict, chat: bool, timeout: float) -> RequestResult:
    """One streamed request; timestamps every chunk that carries output."""
    import aiohttp

    res = RequestResult()
    usage: dict = {}
    parts: list[str] = []
    start = time.perf_counter()
    last = start
    try:
        async with session.post(
            url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                msgs, buf = _sse_messages(buf + chunk.replace(b"\r\n", b"\n"))
                for msg in msgs:
                    if "error" in msg:
                        res.error = f"stream error: {json.dumps(msg['error'])[:500]}"
                        return res
                    usage = msg.get("usage") or usage
                    has_output, text = _chunk_tokens((msg.get("choices") or [{}])[0], chat)
                    if not has_output:  # usage-only, a role-only opener or a bare finish chunk: no token
                        continue
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    parts.append(text)
            res.latency = time.perf_counter() - start
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"[:500]
        return res
    if res.ttft == 0.0:
        res.error = "the stream ended without any output chunk"
        return res
    res.text = "".join(parts)
    res.output_len = int(usage.get("completion_tokens") or 0)
    res.prompt_len = int(usage.get("prompt_tokens") or 0)
    res.success = True
    return res


def _sse_messages(buf: bytes) -> tuple[list[dict], bytes]:
    """The JSON messages of the complete server-sent events in ``buf``, and the incomplete tail."""
    *events, rest = buf.split(b"\n\n")
    msgs = []
    for event in events:
        for line in event.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and (data := line[5:].strip()) != b"[DONE]":
                msgs.append(json.loads(data))
    return msgs, rest


def _chunk_tokens(choice: dict, chat: bool) -> tuple[bool, str]:
    """(does this chunk carry generated output, its text)."""
    if not chat:
        text = choice.get("text") or ""
        return bool(text), text
    delta = choice.get("delta") or {}
    text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return bool(text or delta.get("tool_calls")), text


def _payload(args: argparse.Namespace, model: str, req: SampleRequest, chat: bool) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": req.expected_output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM / tidellm / llama.cpp extension
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _intervals(rng, n: int, rate: float, burstiness: float) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return rng.gamma(shape=burstiness, scale=theta, size=n).tolist()


async def _resolve_model(session, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise ValueError(f"{base_url}/v1/models answered HTTP {resp.status}; pass --model NAME.")
        models = (await resp.json()).get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model NAME.")
    return models[0]["id"]


async def benchmark(
    args: argparse.Namespace,
    requests: list[SampleRequest],
    warmups: list[SampleRequest],
    tokenizer,
    slos: dict[str, float],
    percentiles: list[float],
) -> dict:
    import aiohttp

    chat = args.endpoint.endswith("/chat/completions")
    base = args.base_url.rstrip("/")
    url = base + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or 0
    # A fresh connection per request: some servers (llama.cpp's) close theirs after each stream, and a reused
    # one they have just closed fails the next request. On loopback a connect costs well under a millisecond.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        try:
            model = args.model or await _resolve_model(session, base, headers)
        except aiohttp.ClientError as e:
            raise ValueError(f"cannot reach {base}: {e}. Is the server up?") from None

        # The cap is a semaphore taken before a request's clock starts, so client-side queueing never counts
        # as TTFT.
        sem = asyncio.Semaphore(limit) if limit else contextlib.nullcontext()
        in_flight = peak = 0

        async def send(r: SampleRequest, bar=None) -> RequestResult:
            nonlocal in_flight, peak
            async with sem:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await _send(
                        session, url, headers, _payload(args, model, r, chat), chat, args.timeout
                    )
                finally:
                    in_flight -= 1
                    if bar is not None:
                        bar.update(1)

        # Warm-ups: untimed, under the same cap, on prompts of their own (so a prefix cache cannot turn a
        # measured prefill into a hit).
        if warmups:
            warm_res = await asyncio.gather(*(send(r) for r in warmups))
            bad = [r.error for r in warm_res if not r.success]
            if bad:
                raise ValueError(f"{len(bad)} of {len(warmups)} warm-up requests failed; first: {bad[0]}")
            peak = 0

        from tqdm import tqdm

        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")
        import numpy as np

        rng = np.random.default_rng(args.seed)
        waits = _intervals(rng, len(requests), args.request_rate, args.burstiness)
        t0 = time.perf_counter()
        tasks = []
        for r, w in zip(requests, waits, strict=True):
            if w > 0:
                await asyncio.sleep(w)
            tasks.append(asyncio.create_task(send(r, bar)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    for r, req in zip(results, requests, strict=True):
        if r.success:
            r.prompt_len = r.prompt_len or req.prompt_len
            r.output_len = r.output_len or len(tokenizer.encode(r.text, add_special_tokens=False))
    summary = summarize(results, duration, slos, percentiles)
    summary["model"] = model
    summary["max_concurrent_requests"] = peak
    return {"summary": summary, "results": results}


def _stats(values_s: list[float], percentiles: list[float], name: str) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values_s, dtype=np.float64) * 1000.0
    if v.size == 0:
        v = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(v.mean()),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(v.std()),
    }
    for p in percentiles:
        out[f"{_pct_key(p)}_{name}_ms"] = float(np.percentile(v, p))
    return out


def summarize(
    results: list[RequestResult], duration: float, slos: dict[str, float], percentiles: list[float]
) -> dict:
    """The vLLM-style metric set from per-request results (pure: unit-testable without a server)."""
    ok = [r for r in results if r.success]
    # TPOT per request; None for one-token outputs, which have no time per *next* token.
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else None for r in ok]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    good = 0
    for r, t in zip(ok, tpot, strict=True):
        values = {"ttft": r.ttft, "tpot": t or 0.0, "e2el": r.latency, "itl": max(r.itl, default=0.0)}
        if all(values[k] * 1000.0 <= slo for k, slo in slos.items()):
            good += 1
    summary = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "request_goodput": (good / duration if duration > 0 else 0.0) if slos else None,
        "output_throughput": n_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (n_in + n_out) / duration if duration > 0 else 0.0,
    }
    summary.update(_stats([r.ttft for r in ok], percentiles, "ttft"))
    summary.update(_stats([t for t in tpot if t is not None], percentiles, "tpot"))
    summary.update(_stats([x for r in ok for x in r.itl], percentiles, "itl"))
    summary.update(_stats([r.latency for r in ok], percentiles, "e2el"))
    summary["errors"] = [r.error for r in results if not r.success][:20]
    return summary


def format_table(s: dict, percentiles: list[float]) -> str:
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40}{value:>10}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if s.get("max_concurrency"):
        row("Maximum request concurrency:", s["max_concurrency"])
    row("Benchmark duration (s):", f"{s['duration']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    if s.get("request_goodput") is not None:
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    for m in METRICS:
        lines.append("{s:{c}^{n}}".format(s=" " + METRIC_NAMES[m] + " ", n=w, c="-"))
        row(f"Mean {m.upper()} (ms):", f"{s[f'mean_{m}_ms']:.2f}")
        row(f"Median {m.upper()} (ms):", f"{s[f'median_{m}_ms']:.2f}")
        for p in percentiles:
            if p != 50:  # the median, printed above
                row(f"P{p:g} {m.upper()} (ms):", f"{s[f'{_pct_key(p)}_{m}_ms']:.2f}")
    lines.append("=" * w)
    return "\n".join(lines)


def build_requests(args: argparse.Namespace, tokenizer, n: int, seed: int) -> list[SampleRequest]:
    from tidellm.benchmarks.datasets import sample_prefix, sample_random, sample_sharegpt

    if args.dataset == "random":
        return sample_random(
            tokenizer,
            n,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            seed,
        )
    if args.dataset == "prefix":
        return sample_prefix(
            tokenizer,
            n,
            args.prefix_num_prefixes,
            args.prefix_len,
            args.prefix_suffix_len,
            args.prefix_output_len,
            seed,
        )
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json (a ShareGPT-format JSON list).")
    return sample_sharegpt(tokenizer, args.dataset_path, n, seed, args.sharegpt_output_len)


def _validate(args: argparse.Namespace) -> tuple[dict[str, float], list[float]]:
    """Checks the flags before any work; returns the parsed SLOs and percentiles."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1.")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1.")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be positive (inf sends all requests at once).")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be positive (1 = Poisson).")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be 0 or more.")
    if not (args.tokenizer or args.model):
        raise ValueError("pass --tokenizer (a tidellm model name or path) to build prompts and count tokens.")
    return parse_goodput(args.goodput), parse_percentiles(args.percentiles)


def main(args: argparse.Namespace) -> int:
    from tidellm import __version__
    from tidellm.benchmarks.common import machine_info, write_json
    from tidellm.model_executor.loader import load_model_source

    slos, percentiles = _validate(args)
    tokenizer = load_model_source(args.tokenizer or args.model).tokenizer
    # Warm-ups come from another seed: the measured prompts do not depend on --num-warmups, and a prefix cache
    # cannot turn a measured prefill into a hit (a ShareGPT warm-up may, rarely, repeat a measured conversation).
    requests = build_requests(args, tokenizer, args.num_prompts, args.seed)
    warmups = build_requests(args, tokenizer, args.num_warmups, args.seed + 1) if args.num_warmups else []
    started = datetime.now(timezone.utc)
    out = asyncio.run(benchmark(args, requests, warmups, tokenizer, slos, percentiles))
    s = out["summary"]
    s["max_concurrency"] = args.max_concurrency
    print(format_table(s, percentiles))
    if s["errors"]:
        print(f"{s['failed']} requests failed; first error: {s['errors'][0]}")
    if args.save_result:
        result = {
            "schema_version": SCHEMA_VERSION,
            "date": started.isoformat(timespec="seconds"),
            "tidellm_version": __version__,
            "label": args.label,
            "base_url": args.base_url,
            "endpoint": args.endpoint,
            "tokenizer": args.tokenizer or args.model,
            "dataset": args.dataset,
            "dataset_path": args.dataset_path,
            "num_prompts": args.num_prompts,
            "seed": args.seed,
            "random_input_len": args.random_input_len,
            "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio,
            "prefix_num_prefixes": args.prefix_num_prefixes,
            "prefix_len": args.prefix_len,
            "prefix_suffix_len": args.prefix_suffix_len,
            "prefix_output_len": args.prefix_output_len,
            "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
            "burstiness": args.burstiness,
            "num_warmups": args.num_warmups,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "goodput_slos_ms": slos,
            "percentiles": percentiles,
            "machine": machine_info(),  # the client's; on one machine, the server's too
            **s,
        }
        if args.save_detailed:
            rs = out["results"]
            result["input_lens"] = [r.prompt_len for r in rs]
            result["output_lens"] = [r.output_len for r in rs]
            result["ttfts"] = [r.ttft for r in rs]
            result["e2els"] = [r.latency for r in rs]
            result["itls"] = [r.itl for r in rs]
            result["request_errors"] = [r.error for r in rs]
        write_json(args.save_result, result)
    return 0 if s["failed"] == 0 else 1
