"""`tidellm bench throughput`: offline throughput on random prompts of fixed lengths.

All prompts go to ``LLM.generate`` at once with ``ignore_eos``, so every request produces exactly
``--output-len`` tokens and the scheduler batches as it would for any offline job. A short warm-up on two
extra prompts (never among the measured ones, so the measured run gets no prefix-cache hits from it) takes
first-call costs out of the figure.
"""

from __future__ import annotations

import argparse
import time

from tidellm.benchmarks.common import check_fits, engine_dtype, machine_info, random_prompts, write_json
from tidellm.entrypoints.cli.args import add_engine_args, engine_kwargs_from_args

_NUM_WARMUP_PROMPTS = 2

# Bump when a key of the JSON result is renamed or removed (adding keys keeps the version).
SCHEMA_VERSION = 1


def add_cli_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, default=128)
    t.add_argument("--output-len", type=int, default=128)
    t.add_argument(
        "--prompt-seed", dest="bench_seed", type=int, default=0, help="Seed for the random prompts."
    )
    t.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    t.add_argument("--log-level", default="WARNING")
    add_engine_args(t)


def main(args: argparse.Namespace) -> int:
    from tidellm.entrypoints.llm import LLM
    from tidellm.sample.params import SamplingParams

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)}).")
    llm = LLM(log_level=args.log_level, **engine_kwargs_from_args(args))
    engine = llm.engine
    check_fits(engine, args.input_len, args.output_len)
    tok = engine.tokenizer
    prompts = random_prompts(
        tok.vocab_size,
        tok.all_special_ids,
        args.num_prompts + _NUM_WARMUP_PROMPTS,
        args.input_len,
        args.bench_seed,
    )
    prompts, warmup = prompts[: args.num_prompts], prompts[args.num_prompts :]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, top_p=1.0)
    llm.generate(warmup, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    result = {
        "benchmark": "throughput",
        "schema_version": SCHEMA_VERSION,
        "model": args.model,
        "dtype": engine_dtype(engine),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "input_tokens": n_in,
        "output_tokens": n_out,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(outs) / elapsed, 3),
        "output_tokens_per_s": round(n_out / elapsed, 2),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 2),
        "prefix_cache_hit_tokens": sum(o.num_cached_tokens for o in outs),
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        **machine_info(),
        "engine_args": engine_kwargs_from_args(args),
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} output tokens/s, "
        f"{result['total_tokens_per_s']:.1f} total tokens/s ({len(outs)} requests, {n_in} prompt + {n_out} output "
        f"tokens in {elapsed:.2f} s, dtype {result['dtype']})"
    )
    if args.output_json:
        write_json(args.output_json, result)
    return 0
