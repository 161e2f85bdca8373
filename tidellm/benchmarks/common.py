"""Helpers shared by the benchmarks: random token prompts, machine facts, summary statistics, JSON output."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

# The ISA flags that decide CPU matmul speed; the rest of /proc/cpuinfo is noise in a results file.
_SPEED_FLAG_PREFIXES = ("avx", "amx", "fma")


def random_prompts(vocab_size: int, special: set[int], n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids drawn uniformly from the non-special vocabulary.

    Token ids, not text, so the length is exact (text would re-tokenize to another count). Distinct seeds
    give prompts that share no prefix block, so they never hit the prefix cache.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    allowed = non_special_ids(vocab_size, special)
    return [rng.choice(allowed, size=length).tolist() for _ in range(n)]


def non_special_ids(vocab_size: int, special: set[int]):
    """The token ids a random prompt may use (numpy array): every id but the special ones."""
    import numpy as np

    return np.setdiff1d(np.arange(vocab_size), np.fromiter(special, dtype=np.int64))


def machine_info() -> dict[str, Any]:
    """What a figure was measured on: CPU and its speed-relevant flags, cores, torch threads and versions."""
    import torch

    from tidellm import __version__
    from tidellm.platforms import cpu_flags

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(_SPEED_FLAG_PREFIXES)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "tidellm_version": __version__,
    }


def engine_dtype(engine: Any) -> str:
    """The dtype the engine actually runs in (``auto`` resolved), e.g. ``float32``."""
    return str(engine.core.runner.dtype).removeprefix("torch.")


def check_fits(engine: Any, input_len: int, output_len: int) -> None:
    """Refuse sizes the engine would silently cap: fewer output tokens than asked would skew every figure."""
    if input_len + output_len > engine.max_model_len:
        raise ValueError(
            f"--input-len {input_len} + --output-len {output_len} exceeds max_model_len "
            f"{engine.max_model_len}; shorten them or raise --max-model-len."
        )


STAT_KEYS = ("mean", "p50", "p90", "p99", "min", "max")


def summarize(values: Sequence[float], ndigits: int = 6) -> dict[str, float]:
    """Mean, percentiles (p50 is the median; linear interpolation between samples), min and max."""
    import numpy as np

    if not values:
        raise ValueError("summarize() needs at least one value.")
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    stats = {"mean": a.mean(), "p50": p50, "p90": p90, "p99": p99, "min": a.min(), "max": a.max()}
    return {k: round(float(v), ndigits) for k, v in stats.items()}


def write_json(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
