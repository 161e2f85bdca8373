"""`tidellm bench latency`: one batch end to end, with prefill and decode timed separately.

Each iteration sends ``--batch-size`` random prompts of ``--input-len`` tokens to the offline engine at once
(``ignore_eos``, so each produces exactly ``--output-len`` tokens) and runs it to completion; the first
``--num-iters-warmup`` iterations are run the same way and thrown away.

How the phases are split. The bench drives ``LLM.engine`` itself, one ``step()`` at a time, with streamed
(delta) outputs, and reads ``time.perf_counter()`` after every step. All timing is from the same run:

* **prefill** = from adding the requests to the end of the step after which *every* request of the batch
  has its first output token: the time to first token of the whole batch. When the prompts together exceed
  ``--max-num-batched-tokens`` the prefill is chunked over several steps, and requests that started early
  already decode in the later ones; those mixed steps count as prefill, since the batch is not fully started.
* **decode** = the remaining steps. Each gives every unfinished request one token, so the request that
  started last needs ``output_len - 1`` of them: TPOT (time per output token) = decode / (output_len - 1) is
  the per-token latency a member of the batch sees. Decode tokens/s = tokens produced in the decode phase /
  decode time.
* **end to end** = prefill + decode.

The other common method, a second run with ``max_tokens=1`` taken as the prefill and subtracted from the
full run, times two different runs and subtracts noisy numbers; here both phases come out of one run.
Front-end work (detokenization, output building) is inside the timed steps, as it is for any user.

Prefix cache. Every iteration, warm-ups included, gets its own random prompts from one seeded stream, so no
iteration hits blocks cached by an earlier one; the JSON reports ``prefix_cache_hit_tokens`` over the
measured iterations (expected 0) as a check. Prefix caching itself stays at the engine setting (on by
default; ``--no-enable-prefix-caching`` turns it off), so the bench times the configuration users run.

Sampling is random (temperature 1, top-p 1) like ``bench throughput``.

JSON result (``--output-json``; ``schema_version`` changes when a key is renamed or removed):
``benchmark``, ``schema_version``, ``model``, ``dtype`` (resolved), the bench flags ``batch_size``,
``input_len``, ``output_len``, ``num_iters``, ``num_iters_warmup``, ``prompt_seed``; per-iteration token
counts ``input_tokens``, ``output_tokens``; ``prefix_caching``, ``prefix_cache_hit_tokens``; summaries
``e2e_latency_s``, ``prefill_s``, ``decode_s``, ``tpot_ms``, ``prefill_tokens_per_s``,
``decode_tokens_per_s``, each ``{mean, p50 (the median), p90, p99, min, max}`` over the timed iterations
(``tpot_ms`` and ``decode_tokens_per_s`` are null when ``output_len`` is 1); ``iterations``, one record of
``IterationTiming`` per timed iteration; the machine (``cpu``, ``cpu_flags``, ``cpu_count``,
``torch_threads``, ``torch_version``, ``python_version``, ``tidellm_version``); ``engine_args``, every
engine flag.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from tidellm.benchmarks.common import (
    check_fits,
    engine_dtype,
    machine_info,
    random_prompts,
    summarize,
    write_json,
)
from tidellm.entrypoints.cli.args import add_engine_args, engine_kwargs_from_args

logger = logging.getLogger(__name__)

# Bump when a key of the JSON result is renamed or removed (adding keys keeps the version).
SCHEMA_VERSION = 1


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="Requests in the batch (default: %(default)s).")
    p.add_argument(
        "--input-len", type=int, default=128, help="Prompt tokens per request (default: %(default)s)."
    )
    p.add_argument(
        "--output-len", type=int, default=128, help="Output tokens per request (default: %(default)s)."
    )
    p.add_argument("--num-iters", type=int, default=10, help="Timed iterations (default: %(default)s).")
    p.add_argument(
        "--num-iters-warmup", type=int, default=2, help="Untimed iterations first (default: %(default)s)."
    )
    p.add_argument(
        "--prompt-seed", dest="bench_seed", type=int, default=0, help="Seed for the random prompts."
    )
    p.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    p.add_argument("--log-level", default="WARNING")
    add_engine_args(p)


@dataclass
class IterationTiming:
    """One batch, start to finish. Times in seconds; TPOT in milliseconds (None when output_len is 1)."""

    e2e_s: float
    prefill_s: float
    decode_s: float
    tpot_ms: float | None
    decode_tokens_per_s: float | None
    prefill_steps: int
    decode_steps: int
    input_tokens: int
    output_tokens: int
    decode_tokens: int
    cached_tokens: int


def run_batch(engine: Any, prompts: list[list[int]], params: Any) -> IterationTiming:
    """Run ``prompts`` as one batch on an idle ``LLMEngine``, timing the prefill and decode phases."""
    from tidellm.engine.output_processor import OutputKind

    if engine.has_unfinished_requests():
        raise RuntimeError("run_batch needs an idle engine; requests from elsewhere would skew the timing.")
    t0 = time.perf_counter()
    ids = []
    for prompt in prompts:
        rid = engine.next_request_id()
        engine.add_request(rid, prompt, params, kind=OutputKind.DELTA)
        ids.append(rid)
    without_first_token = set(ids)
    cached: dict[str, int] = {}
    steps = out_tokens = 0
    t_prefill = None
    prefill_steps = prefill_tokens = 0
    try:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            steps += 1
            for out in outputs:
                n = sum(len(c.token_ids) for c in out.outputs)
                out_tokens += n
                if n:
                    without_first_token.discard(out.request_id)
                cached[out.request_id] = out.num_cached_tokens
            if t_prefill is None and not without_first_token:
                t_prefill = time.perf_counter()
                prefill_steps, prefill_tokens = steps, out_tokens
    except BaseException:
        engine.abort_request(ids)
        raise
    t_end = time.perf_counter()
    if t_prefill is None:  # cannot happen with ignore_eos and max_tokens >= 1; keep the numbers honest anyway
        raise RuntimeError("Some requests finished without producing a token.")
    decode_s = t_end - t_prefill
    decode_steps = steps - prefill_steps
    decode_tokens = out_tokens - prefill_tokens
    max_tokens = params.max_tokens
    return IterationTiming(
        e2e_s=t_end - t0,
        prefill_s=t_prefill - t0,
        decode_s=decode_s,
        tpot_ms=1000 * decode_s / (max_tokens - 1) if max_tokens > 1 else None,
        decode_tokens_per_s=decode_tokens / decode_s if decode_tokens else None,
        prefill_steps=prefill_steps,
        decode_steps=decode_steps,
        input_tokens=sum(len(p) for p in prompts),
        output_tokens=out_tokens,
        decode_tokens=decode_tokens,
        cached_tokens=sum(cached.values()),
    )


def _validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)}).")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0 (got {args.num_iters_warmup}).")


def main(args: argparse.Namespace) -> int:
    from tidellm.entrypoints.llm import LLM
    from tidellm.sample.params import SamplingParams

    _validate(args)
    llm = LLM(log_level=args.log_level, **engine_kwargs_from_args(args))
    engine = llm.engine
    check_fits(engine, args.input_len, args.output_len)
    tok = engine.tokenizer
    b, n_warm, n_iter = args.batch_size, args.num_iters_warmup, args.num_iters
    if b > args.max_num_seqs:
        logger.warning(
            "--batch-size %d exceeds --max-num-seqs %d: later requests wait for earlier ones to finish, so "
            "'prefill' (time until every request has a token) includes whole lifetimes of the first ones.",
            b,
            args.max_num_seqs,
        )
    # One seeded stream, a fresh batch per iteration: no iteration can hit another's cached blocks.
    prompts = random_prompts(
        tok.vocab_size, tok.all_special_ids, (n_warm + n_iter) * b, args.input_len, args.bench_seed
    )
    batches = [prompts[i * b : (i + 1) * b] for i in range(n_warm + n_iter)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, top_p=1.0)

    for i in range(n_warm):
        t = run_batch(engine, batches[i], params)
        print(f"warm-up {i + 1}/{n_warm}: {t.e2e_s:.3f} s")
    runs: list[IterationTiming] = []
    for i in range(n_iter):
        t = run_batch(engine, batches[n_warm + i], params)
        runs.append(t)
        print(
            f"iteration {i + 1}/{n_iter}: {t.e2e_s:.3f} s (prefill {t.prefill_s:.3f} s, decode {t.decode_s:.3f} s)"
        )

    expected_out = b * args.output_len
    for t in runs:
        if t.output_tokens != expected_out or t.decode_steps != args.output_len - 1:
            logger.warning(
                "An iteration produced %d tokens in %d decode steps (expected %d in %d): preemption or a "
                "batch larger than --max-num-seqs; TPOT is still decode time / (output_len - 1).",
                t.output_tokens,
                t.decode_steps,
                expected_out,
                args.output_len - 1,
            )
            break

    result = build_result(args, engine_dtype(engine), runs)
    print_summary(result)
    if args.output_json:
        write_json(args.output_json, result)
    return 0


def build_result(args: argparse.Namespace, dtype: str, runs: list[IterationTiming]) -> dict[str, Any]:
    def stats(values: list[float | None]) -> dict[str, float] | None:
        return None if any(v is None for v in values) else summarize(values)  # type: ignore[arg-type]

    return {
        "benchmark": "latency",
        "schema_version": SCHEMA_VERSION,
        "model": args.model,
        "dtype": dtype,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup,
        "prompt_seed": args.bench_seed,
        # Per iteration (the same in every one with ignore_eos; each iteration's own count is below).
        "input_tokens": runs[0].input_tokens,
        "output_tokens": runs[0].output_tokens,
        "prefix_caching": args.enable_prefix_caching,
        "prefix_cache_hit_tokens": sum(t.cached_tokens for t in runs),
        "e2e_latency_s": summarize([t.e2e_s for t in runs]),
        "prefill_s": summarize([t.prefill_s for t in runs]),
        "decode_s": summarize([t.decode_s for t in runs]),
        "tpot_ms": stats([t.tpot_ms for t in runs]),
        "prefill_tokens_per_s": summarize([t.input_tokens / t.prefill_s for t in runs], 2),
        "decode_tokens_per_s": stats([t.decode_tokens_per_s for t in runs]),
        "iterations": [_rounded(asdict(t)) for t in runs],
        **machine_info(),
        "engine_args": engine_kwargs_from_args(args),
    }


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


def print_summary(r: dict[str, Any]) -> None:
    def line(label: str, s: dict[str, float] | None, unit: str, fmt: str = ".3f") -> str:
        if s is None:
            return f"  {label:<16} n/a (output_len 1 has no decode phase)"
        cols = "  ".join(f"{k} {s[k]:{fmt}}" for k in ("mean", "p50", "p90", "p99"))
        return f"  {label:<16} {cols} {unit}"

    print(
        f"Latency: batch {r['batch_size']} x {r['input_len']} prompt tokens -> {r['output_len']} output tokens, "
        f"{r['num_iters']} iterations after {r['num_iters_warmup']} warm-up, dtype {r['dtype']}, "
        f"prefix cache hits {r['prefix_cache_hit_tokens']} tokens"
    )
    print(line("end to end", r["e2e_latency_s"], "s"))
    print(line("prefill (TTFT)", r["prefill_s"], "s"))
    print(line("decode", r["decode_s"], "s"))
    print(line("TPOT", r["tpot_ms"], "ms", fmt=".2f"))
    print(line("prefill tok/s", r["prefill_tokens_per_s"], "tokens/s", fmt=".1f"))
    print(line("decode tok/s", r["decode_tokens_per_s"], "tokens/s", fmt=".1f"))
