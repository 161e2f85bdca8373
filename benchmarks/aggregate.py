"""Several compare.py runs -> one table of the issue's figures: each engine's median and min-max over the
runs, and tidellm / best peer per run (median and min-max of that ratio).

    python benchmarks/aggregate.py benchmarks/results/RUN1.json RUN2.json ... --out summary.md

A peer measured in fewer runs (vLLM's start-up alone is two minutes) enters the ratios of the runs it
is in; the table says how many runs each figure has.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

DISPLAY = {"tidellm": "tidellm", "vllm": "vLLM", "llamacpp": "llama.cpp"}
# (label, concurrency or None, key in the level summary or in the engine entry, higher is better, target,
#  the peer the ratio is against: None = the best peer of each run)
FIGURES: list[tuple[str, int | None, str, bool, str, str | None]] = [
    ("output tokens/s", 64, "output_throughput", True, "≥ 2.5×", None),
    ("output tokens/s", 16, "output_throughput", True, "≥ 2×", None),
    ("output tokens/s (single stream)", 1, "output_throughput", True, "≥ 1.2×", None),
    ("TTFT p50 (ms)", 16, "p50_ttft_ms", False, "≤ 0.25×", None),
    ("TPOT p50 (ms)", 16, "p50_tpot_ms", False, "≤ 0.5×", None),
    ("start-up (s)", None, "startup_s", False, "≤ 3×", "llamacpp"),
    ("start-up (s)", None, "startup_s", False, "≤ 0.05×", "vllm"),
    ("peak RSS (MB)", None, "peak_rss_mb", False, "≤ 1×", "vllm"),
]


def value(run: dict[str, Any], engine: str, c: int | None, key: str) -> float | None:
    e = run.get("engines", {}).get(engine)
    if e is None:
        return None
    if c is None:
        return e.get(key)
    level = e.get("levels", {}).get(str(c))
    return None if level is None else (level.get("summary") or {}).get(key)


def spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "–"
    med = statistics.median(xs)
    return (
        (fmt.format(med) + f" ({fmt.format(min(xs))}–{fmt.format(max(xs))})")
        if len(xs) > 1
        else fmt.format(med)
    )


def table(runs: list[dict[str, Any]]) -> str:
    engines = [e for e in DISPLAY if any(e in r.get("engines", {}) for r in runs)]
    peers = [e for e in engines if e != "tidellm"]
    head = ["figure", "c", *[f"{DISPLAY[e]} [runs]" for e in engines], "tidellm / peer", "peer", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, c, key, higher, target, versus in FIGURES:
        fmt = "{:.1f}" if "tokens" in label or "(s)" in label else "{:.0f}"
        cells = []
        for e in engines:
            xs = [v for r in runs if (v := value(r, e, c, key)) is not None]
            cells.append(f"{spread(xs, fmt)} [{len(xs)}]")
        ratios, best_names = [], set()
        for r in runs:
            t = value(r, "tidellm", c, key)
            peer_vals = {
                p: v for p in peers if (v := value(r, p, c, key)) is not None and versus in (None, p)
            }
            if t is None or not peer_vals:
                continue
            best = (max if higher else min)(peer_vals, key=peer_vals.get)
            best_names.add(DISPLAY[best])
            ratios.append(t / peer_vals[best])
        cells += [spread(ratios, "{:.2f}×"), "/".join(sorted(best_names)) or "–", target]
        lines.append(f"| {label} | {c if c is not None else '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="compare.py result JSON files")
    ap.add_argument("--out", type=Path, help="write the markdown table here (else print it)")
    args = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    text = (
        f"Median (min–max) over {len(runs)} runs ({', '.join(p.stem for p in args.runs)}); [n] = runs with that "
        "figure. Ratios are taken within each run, against the best peer of that run.\n\n"
        + table(runs)
        + "\n"
    )
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
