"""Prompt sets for the serving benchmark: random token prompts, ShareGPT conversations, and a shared-prefix set.

Every sampler returns plain ``SampleRequest`` rows and is deterministic for a given seed, so two servers
measured with the same flags receive exactly the same prompts in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidellm.benchmarks.common import non_special_ids
from tidellm.tokenizer.tokenizer import Tokenizer


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens, as this tokenizer counts them (the server's own count wins when it reports one)
    expected_output_len: int


def _text_of_length(tokenizer: Tokenizer, ids: list[int], length: int, pool: np.ndarray, rng) -> str:
    """Decode ``ids`` to text whose re-encoding is ``length`` tokens (or as close as a few rounds get).

    Decoding random ids and encoding the text again merges or splits tokens, so the count drifts; trim or
    top up with fresh random ids until it settles.
    """
    text = tokenizer.decode(ids)
    for _ in range(10):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == length:
            break
        enc = enc[:length] if len(enc) > length else enc + rng.choice(pool, size=length - len(enc)).tolist()
        text = tokenizer.decode(enc)
    return text


def _lengths(rng, mean: int, range_ratio: float, n: int) -> np.ndarray:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def sample_random(
    tokenizer: Tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[SampleRequest]:
    """Prompts of random tokens; lengths uniform in ``len * [1 - ratio, 1 + ratio]``."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}.")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be at least 1.")
    rng = np.random.default_rng(seed)
    pool = non_special_ids(tokenizer.vocab_size, tokenizer.all_special_ids)
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    out = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        text = _text_of_length(tokenizer, rng.choice(pool, size=int(n_in)).tolist(), int(n_in), pool, rng)
        out.append(SampleRequest(text, len(tokenizer.encode(text)), int(n_out)))
    return out


def sample_prefix(
    tokenizer: Tokenizer,
    num_prompts: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int,
) -> list[SampleRequest]:
    """Many prompts over a few long common prefixes, interleaved, to measure prefix caching.

    Each prompt is one of ``num_prefixes`` random prefixes of ``prefix_len`` tokens followed by its own random
    suffix of ``suffix_len`` tokens; prompts cycle through the prefixes so consecutive requests differ.
    """
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 1:
        raise ValueError("--prefix-num-prefixes, --prefix-len and --prefix-suffix-len must be at least 1.")
    rng = np.random.default_rng(seed)
    pool = non_special_ids(tokenizer.vocab_size, tokenizer.all_special_ids)
    prefixes = [
        _text_of_length(tokenizer, rng.choice(pool, size=prefix_len).tolist(), prefix_len, pool, rng)
        for _ in range(num_prefixes)
    ]
    out = []
    for i in range(num_prompts):
        # A newline keeps the suffix from merging with the prefix's last token, so the prefix tokens match.
        suffix = _text_of_length(tokenizer, rng.choice(pool, size=suffix_len).tolist(), suffix_len, pool, rng)
        text = prefixes[i % num_prefixes] + "\n" + suffix
        out.append(SampleRequest(text, len(tokenizer.encode(text)), output_len))
    return out


def sample_sharegpt(
    tokenizer: Tokenizer,
    path: str,
    num_prompts: int,
    seed: int,
    output_len: int | None = None,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[SampleRequest]:
    """First human turn as the prompt; the first reply's length as the output length (unless given).

    The file is a JSON list in ShareGPT format: ``[{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}, ...]``. Conversations with fewer than two turns, or prompts/replies
    under 4 tokens, or over the length caps, are skipped (a too-short reply says little about decode speed).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ShareGPT dataset {path!r} not found; pass --dataset-path FILE.json.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a ShareGPT-format list.") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}.")
    convs = [
        c.get("conversations") or c.get("conversation")
        for c in data
        if isinstance(c, dict) and len(c.get("conversations") or c.get("conversation") or []) >= 2
    ]
    order = np.random.default_rng(seed).permutation(len(convs))
    out: list[SampleRequest] = []
    for i in order:
        prompt, reply = convs[i][0].get("value", ""), convs[i][1].get("value", "")
        n_in = len(tokenizer.encode(prompt))
        n_out = (
            output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        )
        if (
            n_in < 4
            or (output_len is None and n_out < 4)
            or n_in > max_prompt_len
            or n_in + n_out > max_total_len
        ):
            continue
        out.append(SampleRequest(prompt, n_in, n_out))
        if len(out) == num_prompts:
            break
    if len(out) < num_prompts:
        raise ValueError(
            f"{path} has only {len(out)} usable conversations (two turns, 4..{max_prompt_len} prompt tokens, "
            f"at most {max_total_len} in all); ask for fewer with --num-prompts."
        )
    return out
