"""`tidellm bench throughput`: offline throughput on random prompts of fixed lengths."""

from __future__ import annotations

import argparse
import json
import platform
import time

from tidellm.entrypoints.cli.args import add_engine_args, engine_kwargs_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="Benchmarks.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    t = bsub.add_parser("throughput", help="Offline throughput on N random prompts.")
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, default=128)
    t.add_argument("--output-len", type=int, default=128)
    t.add_argument(
        "--prompt-seed", dest="bench_seed", type=int, default=0, help="Seed for the random prompts."
    )
    t.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    t.add_argument("--log-level", default="WARNING")
    add_engine_args(t)
    t.set_defaults(func=run_throughput)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def random_prompts(vocab_size: int, special: set[int], n: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(special, dtype=np.int64))
    return [rng.choice(allowed, size=length).tolist() for _ in range(n)]


def run_throughput(args: argparse.Namespace) -> int:
    from tidellm.entrypoints.llm import LLM
    from tidellm.platforms import cpu_flags
    from tidellm.sample.params import SamplingParams

    llm = LLM(log_level=args.log_level, **engine_kwargs_from_args(args))
    engine = llm.engine
    tok = engine.tokenizer
    prompts = random_prompts(
        tok.vocab_size, tok.all_special_ids, args.num_prompts, args.input_len, args.bench_seed
    )
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, top_p=1.0)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    result = {
        "model": args.model,
        "dtype": str(engine.core.runner.dtype).removeprefix("torch."),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(outs) / elapsed, 3),
        "output_tokens_per_s": round(n_out / elapsed, 2),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 2),
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} output tokens/s, "
        f"{result['total_tokens_per_s']:.1f} total tokens/s ({len(outs)} requests, {n_in} prompt + {n_out} output "
        f"tokens in {elapsed:.2f} s, dtype {result['dtype']})"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
