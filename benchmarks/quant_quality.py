"""Quality cost of each --quantization setting against the dense fp32 model (--quantization none):
perplexity of a fixed text and the drift of every token's logprob (prompt logprobs: the batched prefill
path), and greedy decoding of 64 tokens (the one-row decode path): how many tokens agree before the first
difference, and the drift of the sampled tokens' logprobs while they agree.

    .venv/bin/python benchmarks/quant_quality.py [--model smollm2-135m] [--out benchmarks/results/quant-quality.json]
        [--methods none,auto,q8_0,q4_1,none@bfloat16,auto@bfloat16,auto@bfloat16+none]
        # METHOD@DTYPE runs in that dtype (else fp32); +ACT sets --activation-quantization (else none)

The first entry is the reference. bf16 entries measure what a CPU with native bf16 runs by default (dtype auto
is bf16 there): the drift of bf16 compute itself, with and without the GGUF blocks, and with int8 activations
(``+auto``: what such a CPU runs by default when it also has AVX-512 VNNI; ``+int8``: int8 in any dtype).
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


DECODE_PROMPTS = ["The three most important inventions of the last century are", "def quicksort(items):"]


def run(
    model: str, quantization: str, dtype: str = "float32", activations: str = "none"
) -> tuple[list[float], list[tuple[list[int], list[float]]], float]:
    """(prompt logprobs of TEXT, [(greedy tokens, their logprobs)] per decode prompt, load seconds)."""
    from tidellm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model, dtype=dtype, quantization=quantization, activation_quantization=activations,
        kv_cache_memory_gb=0.5, max_model_len=2048,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=0)
    decoded = []
    for o in llm.generate(DECODE_PROMPTS, greedy, use_tqdm=False):
        toks = o.outputs[0].token_ids
        decoded.append((toks, [d[t].logprob for d, t in zip(o.outputs[0].logprobs, toks, strict=True)]))
    out = llm.generate(
        [TEXT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False
    )[0]
    ids = out.prompt_token_ids
    lps = []
    for pos, entry in enumerate(out.prompt_logprobs or []):
        if entry is None:
            continue
        lp = entry[ids[pos]]
        lps.append(lp.logprob)
    return lps, decoded, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="none,auto,q8_0,q4_1")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    base = base_dec = None
    for method in args.methods.split(","):
        setting, _, activations = method.partition("+")
        quantization, _, dtype = setting.partition("@")
        lps, decoded, load_s = run(args.model, quantization, dtype or "float32", activations or "none")
        if base is None:
            base, base_dec = lps, decoded
        drift = [abs(a - b) for a, b in zip(lps, base, strict=True)]
        agree, dec_drift = [], []
        for (toks, tlps), (btoks, blps) in zip(decoded, base_dec, strict=True):
            n = next((i for i, (a, b) in enumerate(zip(toks, btoks, strict=False)) if a != b), len(toks))
            agree.append(n)
            dec_drift += [abs(a - b) for a, b in zip(tlps[:n], blps[:n], strict=True)]
        results[method] = {
            "tokens": len(lps),
            "perplexity": math.exp(-sum(lps) / len(lps)),
            "mean_abs_logprob_drift": sum(drift) / len(drift),
            "max_abs_logprob_drift": max(drift),
            "greedy_tokens_agreeing": agree,
            "greedy_max_abs_logprob_drift": max(dec_drift, default=0.0),
            "load_s": round(load_s, 2),
        }
        r = results[method]
        print(
            f"{method:>14}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens, prompt-logprob drift "
            f"mean {r['mean_abs_logprob_drift']:.1e} max {r['max_abs_logprob_drift']:.1e}; greedy decode agrees "
            f"for {agree} of 64 tokens, logprob drift max {r['greedy_max_abs_logprob_drift']:.1e}",
            flush=True,
        )
    if args.out:
        import torch

        from tidellm.platforms import device_summary

        args.out.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "reference": args.methods.split(",")[0],
                    "device": device_summary(torch.device("cpu")),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
