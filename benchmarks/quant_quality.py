"""Quality cost of each --quantization setting: perplexity of a fixed text and the drift of every token's
logprob against the dense fp32 model (--quantization none), from the engine's own prompt logprobs.

    .venv/bin/python benchmarks/quant_quality.py [--model smollm2-135m] [--out benchmarks/results/quant-quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# A fixed text (written for this benchmark), long enough for a stable perplexity, short enough to run in seconds.
TEXT = (
    "The river town woke slowly. Fishermen carried their nets down to the water while the baker pulled the "
    "first loaves from the oven, and the smell of bread drifted over the market square. Children ran between "
    "the stalls, chasing a dog that had stolen a sausage from the butcher. At the edge of the square an old "
    "woman sold apples, pears and plums from three wooden crates, counting the coins twice before she put "
    "them in her apron. By noon the sun was high and the square was full: farmers had come from the hills to "
    "sell cheese and wool, a travelling musician played the fiddle by the fountain, and the mayor, in his best "
    "coat, walked from stall to stall asking about the harvest. In the afternoon clouds gathered over the "
    "mountains. The wind turned cold, the traders packed their goods, and by the time the first drops of rain "
    "fell the square was empty again, except for the dog, asleep under a cart with the last of the sausage. "
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
    "    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
    "        if i >= window:\n            total -= values[i - window]\n        out.append(total / min(i + 1, window))\n"
    "    return out\n"
)


def prompt_logprobs(model: str, quantization: str) -> tuple[list[float], float]:
    from tidellm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, dtype="float32", quantization=quantization, kv_cache_memory_gb=0.5, max_model_len=2048)
    load_s = time.perf_counter() - t0
    out = llm.generate([TEXT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    lps = []
    for pos, entry in enumerate(out.prompt_logprobs or []):
        if entry is None:
            continue
        lp = entry[ids[pos]]
        lps.append(lp.logprob if hasattr(lp, "logprob") else float(lp))
    return lps, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="none,auto,q8_0,q4_1")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    base = None
    for method in args.methods.split(","):
        lps, load_s = prompt_logprobs(args.model, method)
        base = base if base is not None else lps
        drift = [abs(a - b) for a, b in zip(lps, base)]
        results[method] = {
            "tokens": len(lps),
            "perplexity": math.exp(-sum(lps) / len(lps)),
            "mean_abs_logprob_drift": sum(drift) / len(drift),
            "max_abs_logprob_drift": max(drift),
            "load_s": round(load_s, 2),
        }
        r = results[method]
        print(
            f"{method:>5}: {r['tokens']} tokens, perplexity {r['perplexity']:.4f}, logprob drift vs "
            f"{args.methods.split(',')[0]}: mean {r['mean_abs_logprob_drift']:.2e} max {r['max_abs_logprob_drift']:.2e}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "reference": args.methods.split(",")[0], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
