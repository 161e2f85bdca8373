"""What structured outputs cost: decode tokens/s with and without a JSON-schema constraint, grammar compile
times, and the latency a not-yet-compiled schema adds to a request. Offline ``tidellm.LLM``, SmolLM2-135M.

    .venv/bin/python benchmarks/bench_structured_outputs.py [--batch 1 16] [--repeats 5] [--json out.json]

Throughput: ``batch`` chat prompts, greedy, exactly ``--max-tokens`` tokens each, timed ``--repeats`` times
per side after a warm-up (which also compiles and caches the grammar), the two sides interleaved. Unconstrained requests run with ignore_eos;
constrained ones with a schema that cannot end within max_tokens (an array of at least 1000 person objects:
strings, an email format, bounded integers), so both sides generate the same number of tokens and the
difference is the per-step work of the constraint: filling each row's bitmask (xgrammar, C++), applying it
to the logits, and advancing the matchers. The grammar's share of each step is timed separately.

Compile: a fresh backend (the vocabulary's bytes -> xgrammar's TokenizerInfo) and a cold compile of each of
the test suite's 13 schemas plus json_object, a regex, a choice and an EBNF grammar. Latency: time to the
first token of one request whose schema is new (compiled while it waits), already compiled, or absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "structured_output"))

from schemas import SCHEMAS  # noqa: E402

from tidellm import LLM, SamplingParams  # noqa: E402
from tidellm.platforms import simd_flags  # noqa: E402
from tidellm.sample.params import StructuredOutputsParams  # noqa: E402
from tidellm.structured_output.spec import grammar_spec  # noqa: E402

PERSON = SCHEMAS["person"][1]
LONG_SCHEMA = {"type": "array", "items": PERSON, "minItems": 1000}
PROMPT = [{"role": "user", "content": "List many people (name, age, email) as JSON."}]


class GrammarTimer:
    """Wall time spent in the manager's per-step calls (bitmask fill, matcher advance)."""

    def __init__(self, manager) -> None:
        self.seconds = 0.0
        self.steps = 0
        for name in ("grammar_bitmask", "accept"):
            real = getattr(manager, name)
            setattr(manager, name, self._timed(real, count=name == "grammar_bitmask"))

    def _timed(self, fn, count: bool):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.steps += count

        return wrapper


def throughput(llm: LLM, batch: int, args: argparse.Namespace, timer: GrammarTimer) -> dict:
    """Unconstrained and constrained runs interleaved (alternating which goes first), so that a neighbour
    taking a core for a while hits both sides alike; the ratio is the median of the per-pair ratios."""
    so = StructuredOutputsParams(json=LONG_SCHEMA)
    modes = {
        "unconstrained": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
        "json_schema": SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=so),
    }
    convs = [PROMPT] * batch
    for params in modes.values():
        llm.chat(convs, params, use_tqdm=False)  # warm-up (and compile)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    grammar_ms: list[float] = []
    for r in range(args.repeats):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            timer.seconds, timer.steps = 0.0, 0
            t0 = time.perf_counter()
            outs = llm.chat(convs, modes[mode], use_tqdm=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == batch * args.max_tokens, "every request must run to max_tokens"
            rates[mode].append(tokens / dt)
            if timer.steps:
                grammar_ms.append(1e3 * timer.seconds / timer.steps)
    out: dict = {
        m: {"tok_s_median": statistics.median(v), "tok_s_min": min(v), "tok_s_max": max(v)}
        for m, v in rates.items()
    }
    pairs = [c / u for u, c in zip(rates["unconstrained"], rates["json_schema"], strict=True)]
    out["ratio_median"] = statistics.median(pairs)
    out["grammar_ms_per_step"] = statistics.median(grammar_ms)
    return out


def compile_times(llm: LLM) -> dict:
    from tidellm.structured_output.xgrammar_backend import XGrammarBackend

    tok = llm.get_tokenizer()
    t0 = time.perf_counter()
    backend = XGrammarBackend(tok, llm.engine.core.runner.vocab_size)
    init = time.perf_counter() - t0
    specs = {name: StructuredOutputsParams(json=schema) for name, (_, schema) in SCHEMAS.items()}
    specs["json_object"] = StructuredOutputsParams(json_object=True)
    specs["regex"] = StructuredOutputsParams(regex=r"\(\d{3}\) \d{3}-\d{4}")
    specs["choice"] = StructuredOutputsParams(choice=["yes", "no", "it depends"])
    specs["ebnf"] = StructuredOutputsParams(grammar='root ::= "The answer is " [1-9] [0-9]? "."')
    times = {}
    for name, so in specs.items():
        t0 = time.perf_counter()
        backend.compile(grammar_spec(so))
        times[name] = time.perf_counter() - t0
    schema_times = [times[n] for n in SCHEMAS]
    return {
        "backend_init_s": init,
        "schema_compile_median_s": statistics.median(schema_times),
        "schema_compile_max_s": max(schema_times),
        "per_spec_s": times,
    }


def first_token_latency(llm: LLM, repeats: int) -> dict:
    def ttft(params: SamplingParams) -> float:
        t0 = time.perf_counter()
        llm.chat(PROMPT, params, use_tqdm=False)
        return time.perf_counter() - t0

    none = [ttft(SamplingParams(temperature=0, max_tokens=1)) for _ in range(repeats)]
    fresh, cached = [], []
    for i in range(repeats):
        schema = dict(PERSON, title=f"person {time.time_ns()} {i}")  # a new cache key: compiled while waiting
        so = StructuredOutputsParams(json=schema)
        fresh.append(ttft(SamplingParams(temperature=0, max_tokens=1, structured_outputs=so)))
        cached.append(ttft(SamplingParams(temperature=0, max_tokens=1, structured_outputs=so)))
    return {
        "unconstrained_s": statistics.median(none),
        "new_schema_s": statistics.median(fresh),
        "cached_schema_s": statistics.median(cached),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    llm = LLM("smollm2-135m", dtype=args.dtype, log_level="WARNING")
    timer = GrammarTimer(llm.engine.core.structured_output)
    import torch

    meta = {
        "cpu_flags": simd_flags(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(llm.engine.core.runner.dtype).removeprefix("torch."),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    print(f"cpu flags: {meta['cpu_flags']}; {meta['threads']} threads; dtype {meta['dtype']}")
    results: dict = {"meta": meta, "throughput": {}}
    for batch in args.batch:
        res = throughput(llm, batch, args, timer)
        results["throughput"][batch] = res
        free, fixed = res["unconstrained"], res["json_schema"]
        print(
            f"batch {batch:3d}: unconstrained {free['tok_s_median']:7.1f} tok/s "
            f"[{free['tok_s_min']:.1f}-{free['tok_s_max']:.1f}], json schema {fixed['tok_s_median']:7.1f} tok/s "
            f"[{fixed['tok_s_min']:.1f}-{fixed['tok_s_max']:.1f}]; ratio (median of pairs) "
            f"{res['ratio_median']:.3f}; grammar {res['grammar_ms_per_step']:.2f} ms/step"
        )
    results["compile"] = compile_times(llm)
    c = results["compile"]
    print(
        f"backend init {c['backend_init_s'] * 1e3:.0f} ms; schema compile median "
        f"{c['schema_compile_median_s'] * 1e3:.0f} ms, max {c['schema_compile_max_s'] * 1e3:.0f} ms; "
        + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in c["per_spec_s"].items() if k not in SCHEMAS)
        + " ms"
    )
    results["first_token"] = first_token_latency(llm, args.repeats)
    f = results["first_token"]
    print(
        f"time to first token, batch 1: unconstrained {f['unconstrained_s'] * 1e3:.0f} ms, cached schema "
        f"{f['cached_schema_s'] * 1e3:.0f} ms, new schema {f['new_schema_s'] * 1e3:.0f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
