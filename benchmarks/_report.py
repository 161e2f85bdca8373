"""Model facts, MFU/MBU, and the Markdown + PNG report of the side-by-side benchmark.

Formulas (also written into every report):

- FLOPs of a run = 2·P_body·(N_in + N_out) + 2·P_head·N_out + 4·L·H·d·(Σ attended positions), where
  P_body = matmul parameters of the transformer blocks (q, k, v, o, gate, up, down; no embedding, no norms),
  P_head = the lm_head (vocab × hidden; computed once per output token), L layers, H query heads of size d.
  A request with n_in prompt and n_out output tokens attends over about n_in²/2 positions in prefill and
  n_out·(n_in + n_out/2) in decode. MFU = FLOPs / duration / peak GEMM FLOP/s of the engine's compute dtype.
- MBU (decode approximation): each decode step reads every weight once and each running sequence's KV cache
  once. Steps/s ≈ output tok/s ÷ concurrency. Bytes/s = W·steps/s + output tok/s·(n_in + n_out/2)·KV_tok,
  W = bytes of the weights read per step (blocks, norms and lm_head in the engine's storage format),
  KV_tok = 2·L·H_kv·d·(KV element bytes). MBU = bytes/s / measured memory bandwidth. Prefill's own weight
  reads are left out, so MBU slightly understates traffic; at high concurrency the weights are shared by many
  tokens per step and MBU falls, as it should.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _peers import DISPLAY, ENGINES

# Metric rows of the main table: (label, summary key, format, higher_is_better)
ROWS = (
    ("output tok/s", "output_throughput", "{:.1f}", True),
    ("TTFT p50 (ms)", "median_ttft_ms", "{:.1f}", False),
    ("TPOT p50 (ms)", "median_tpot_ms", "{:.1f}", False),
    ("ITL p50 (ms)", "median_itl_ms", "{:.1f}", False),
    ("E2E p50 (ms)", "median_e2el_ms", "{:.0f}", False),
    ("requests/s", "request_throughput", "{:.2f}", True),
)
# The bench-serve summary keys kept in the results JSON (everything but per-request lists).
_DROP_KEYS = {"input_lens", "output_lens", "ttfts", "e2els", "itls", "request_errors"}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_facts(gguf_path: Path) -> dict[str, Any]:
    """Parameter counts and byte sizes from the GGUF tensor table (no weights read)."""
    from tidellm.model_executor.loader import load_model_source
    from tidellm.model_executor.loader.gguf_file import GGUFFile

    arch = load_model_source(str(gguf_path)).arch
    g = GGUFFile(gguf_path)
    body = norms = 0
    body_bytes = 0
    for name, t in g.tensors.items():
        if name in ("token_embd.weight", "output.weight"):
            continue
        if len(t.shape) >= 2:
            body += t.num_elements
        else:
            norms += t.num_elements
        body_bytes += t.nbytes
    head = g.tensors.get("output.weight") or g.tensors["token_embd.weight"]
    embd = g.tensors["token_embd.weight"]
    return {
        "gguf": str(gguf_path),
        "num_layers": arch.num_hidden_layers,
        "hidden_size": arch.hidden_size,
        "num_heads": arch.num_attention_heads,
        "num_kv_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "tied_embeddings": "output.weight" not in g.tensors,
        "params_body_matmul": body,
        "params_norms": norms,
        "params_lm_head": head.num_elements,
        "params_embedding": embd.num_elements,
        "params_total_unique": body + norms + embd.num_elements + (0 if head is embd else head.num_elements),
        # What llama.cpp reads per decode step: the quantized blocks, norms and the (Q8_0) lm_head.
        "gguf_bytes_per_step": body_bytes + head.nbytes,
        "gguf_types": sorted({t.qtype.name for t in g.tensors.values()}),
    }


def weight_bytes_per_step(facts: dict[str, Any], storage: str) -> int:
    if storage == "gguf":
        return int(facts["gguf_bytes_per_step"])
    if storage == "blocks":  # tidellm's blocks of 32: Q4_1 16 B codes + 8 B scales, Q8_0 32 + 4 B
        body = facts["params_body_matmul"] * 24 / 32
        return int(body + facts["params_lm_head"] * 36 / 32 + facts["params_norms"] * 4)
    if storage == "panels":  # the int8 kernel's panels: Q4_1 16 B codes + 4 B fp16 scales, Q8_0 32 + 2 + 2 B
        body = facts["params_body_matmul"] * 20 / 32
        return int(body + facts["params_lm_head"] * 36 / 32 + facts["params_norms"] * 4)
    n = facts["params_body_matmul"] + facts["params_norms"] + facts["params_lm_head"]
    return int(n * DTYPE_BYTES[storage])


def kv_bytes_per_token(facts: dict[str, Any], kv_dtype: str) -> int:
    return 2 * facts["num_layers"] * facts["num_kv_heads"] * facts["head_dim"] * DTYPE_BYTES[kv_dtype]


def run_flops(facts: dict[str, Any], s: dict[str, Any]) -> float:
    n = s.get("completed") or 0
    if n == 0:
        return 0.0
    n_in, n_out = s["total_input_tokens"], s["total_output_tokens"]
    a_in, a_out = n_in / n, n_out / n
    attended = n * (a_in * a_in / 2 + a_out * (a_in + a_out / 2))
    attn = 4 * facts["num_layers"] * facts["num_heads"] * facts["head_dim"] * attended
    return 2 * facts["params_body_matmul"] * (n_in + n_out) + 2 * facts["params_lm_head"] * n_out + attn


def utilization(
    facts: dict[str, Any], s: dict[str, Any], concurrency: int, engine: dict[str, Any], limits: dict | None
) -> dict[str, Any]:
    """MFU and MBU of one benchmark level (None where the machine limits were not measured)."""
    out: dict[str, Any] = {}
    duration = s.get("duration") or 0.0
    if duration <= 0 or not s.get("completed"):
        return out
    flops = run_flops(facts, s)
    out["achieved_gflops"] = flops / duration / 1e9
    n = s["completed"]
    ctx = s["total_input_tokens"] / n + s["total_output_tokens"] / n / 2
    steps_per_s = s["output_throughput"] / max(1, min(concurrency, n))
    w = weight_bytes_per_step(facts, engine["weight_storage"])
    kv = kv_bytes_per_token(facts, engine["kv_dtype"])
    bytes_per_s = w * steps_per_s + s["output_throughput"] * ctx * kv
    out["decode_steps_per_s"] = steps_per_s
    out["weight_bytes_per_step"] = w
    out["kv_bytes_per_token"] = kv
    out["achieved_gbytes_per_s"] = bytes_per_s / 1e9
    if limits:
        peak = limits["gemm"][engine["compute_dtype"]]["peak_flops"]
        out["peak_gflops"] = peak / 1e9
        out["mfu"] = flops / duration / peak
        out["mfu_vs_fp32_peak"] = flops / duration / limits["gemm"]["float32"]["peak_flops"]
        bw = limits["memory_bandwidth"]["peak_bytes_per_s"]
        out["peak_gbytes_per_s"] = bw / 1e9
        out["mbu"] = bytes_per_s / bw
    return out


def slim_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _DROP_KEYS}


# ---------------------------------------------------------------------------------------------- Markdown
def _sampling(w: dict[str, Any]) -> str:
    """The requests' sampling, as the workload recorded it (runs before 2026-11-28 evening were all greedy)."""
    t, top_p = w.get("temperature") or 0.0, w.get("top_p")
    if t == 0.0:
        return "greedy"
    return f"temperature {t:g}" + ("" if top_p is None else f", top_p {top_p:g}")


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def _level(res: dict[str, Any], engine: str, c: int) -> dict[str, Any] | None:
    e = res["engines"].get(engine)
    if not e:
        return None
    return (e.get("levels") or {}).get(str(c))


def _value(res: dict[str, Any], engine: str, c: int, key: str) -> Any:
    lvl = _level(res, engine, c)
    if not lvl or "summary" not in lvl:
        return None
    if key in ("mfu", "mbu"):
        v = (lvl.get("utilization") or {}).get(key)
        return None if v is None else 100.0 * v
    return lvl["summary"].get(key)


def markdown(res: dict[str, Any]) -> str:
    engines = [e for e in ENGINES if e in res["engines"]]
    cols = [DISPLAY[e] for e in engines]
    ratio_peers = [e for e in engines if e != "tidellm"] if "tidellm" in engines else []
    header = ["figure", "c", *cols, *[f"tidellm/{DISPLAY[p]}" for p in ratio_peers]]
    lines = [f"# {' vs '.join(cols)}: {res['date']}", ""]
    if res.get("partial"):
        lines += ["**Partial run**: interrupted before every engine was measured.", ""]
    m, w, facts = res["machine"], res["workload"], res["model"]["facts"]
    lines += [
        f"- Machine: {m['cpu_model']}, {m['cpu_count']} logical cores, {m['mem_total_gb']:.0f} GiB RAM, flags "
        f"{' '.join(m['cpu_flags']) or '–'}; kernel {m['kernel']}"
        + (f"; GPU {m['gpu']} (tidellm runs on it)." if m.get("gpu") else "."),
        f"- Model: {res['model']['name']} ({facts['params_body_matmul'] / 1e6:.1f}M block + "
        f"{facts['params_lm_head'] / 1e6:.1f}M lm_head matmul parameters), from `{Path(facts['gguf']).name}` "
        f"({', '.join(facts['gguf_types'])}).",
        f"- Workload: `tidellm bench serve`, {w['dataset']} prompts of {w['input_len']} tokens, {w['output_len']} "
        f"output tokens (ignore_eos, {_sampling(w)}, streamed `/v1/completions`), seed {w['seed']}; prompts and "
        "warm-ups "
        "per concurrency: "
        + ", ".join(
            f"c={c}: {n}+{wu}"
            for c, n, wu in zip(w["concurrency"], w["num_prompts"], w["num_warmups"], strict=True)
        )
        + f"; prefix caching {'on' if w['prefix_caching'] else 'off'} in all engines; max_model_len "
        f"{w['max_model_len']}.",
        "- Versions: "
        + "; ".join(f"{DISPLAY[e]} {res['engines'][e].get('version_line', '?')}" for e in engines)
        + ".",
        "- 1-min load average before each engine started: "
        + ", ".join(
            f"{DISPLAY[e]} {_fmt(res['engines'][e].get('load_avg_before', [None])[0], '{:.2f}')}"
            for e in engines
        )
        + ". One run on a shared machine: read the ratios, not the absolute figures.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "--:"] + ["--:"] * (len(cols) + len(ratio_peers))) + "|",
    ]
    for label, key, fmt, higher in ROWS:
        arrow = "↑" if higher else "↓"
        for c in w["concurrency"]:
            vals = [_value(res, e, c, key) for e in engines]
            marks = []
            for e, v in zip(engines, vals, strict=True):
                lvl = _level(res, e, c) or {}
                failed = (lvl.get("summary") or {}).get("failed")
                marks.append(_fmt(v, fmt) + ("*" if failed else ""))
            t = vals[engines.index("tidellm")] if "tidellm" in engines else None
            ratios = [_ratio(t, vals[engines.index(p)]) for p in ratio_peers]
            lines.append(f"| {label} {arrow} | {c} | " + " | ".join(marks + ratios) + " |")
    for label, key, fmt in (
        ("start-up (s) ↓", "startup_s", "{:.1f}"),
        ("peak RSS (MB) ↓", "peak_rss_mb", "{:.0f}"),
    ):
        vals = [res["engines"][e].get(key) for e in engines]
        t = vals[engines.index("tidellm")] if "tidellm" in engines else None
        ratios = [_ratio(t, vals[engines.index(p)]) for p in ratio_peers]
        lines.append(f"| {label} | – | " + " | ".join([_fmt(v, fmt) for v in vals] + ratios) + " |")
    for label, key in (("MFU (%)", "mfu"), ("MBU decode (%)", "mbu")):
        for c in w["concurrency"]:
            vals = [_value(res, e, c, key) for e in engines]
            t = vals[engines.index("tidellm")] if "tidellm" in engines else None
            ratios = [_ratio(t, vals[engines.index(p)]) for p in ratio_peers]
            lines.append(
                f"| {label} | {c} | " + " | ".join([_fmt(v, "{:.1f}") for v in vals] + ratios) + " |"
            )
    lines += [
        "",
        "↑ higher is better, ↓ lower is better; a ratio above 1 means tidellm's figure is larger. "
        "`*`: some requests failed at that level (see the JSON). Start-up: launch until the first "
        "successful `POST /v1/completions` (max_tokens 1). Peak RSS: sum over the server's process tree, "
        "sampled every 0.2 s from launch to shutdown (vLLM and llama.cpp write their whole KV cache at start; "
        "tidellm's CPU cache is committed as it fills, since 2026-11-28).",
        "",
        "## Engines",
        "",
        "| engine | compute dtype | weights read per step | KV dtype | command |",
        "|---|---|---|---|---|",
    ]
    for e in engines:
        info = res["engines"][e]
        lines.append(
            f"| {DISPLAY[e]} | {info.get('compute_label') or info.get('compute_dtype', '?')} | "
            f"{info.get('weight_label') or info.get('weight_storage', '?')} "
            f"({_fmt(info.get('weight_mb_per_step'), '{:.0f}')} MB) | {info.get('kv_dtype', '?')} | "
            f"`{info.get('command_line', '?')}` |"
        )
    if "vllm_compile_cache_present" in res["engines"].get("vllm", {}):
        warm = res["engines"]["vllm"]["vllm_compile_cache_present"]
        lines += [
            "",
            f"vLLM's torch.compile cache was {'already warm' if warm else 'empty (a cold start)'} when its "
            "start-up was measured.",
        ]
    lim = res.get("machine_limits")
    if lim:
        g, bw = lim["gemm"], lim["memory_bandwidth"]
        lines += [
            "",
            "## Machine limits "
            + (
                f"({lim['device']}: PyTorch, median of CUDA-event timings)"
                if lim.get("device")
                else "(PyTorch, all threads, best of several runs)"
            ),
            "",
            f"- fp32 GEMM: {g['float32']['peak_flops'] / 1e9:.1f} GFLOP/s.",
            f"- bf16 GEMM: {g['bfloat16']['peak_flops'] / 1e9:.1f} GFLOP/s (fastest way: "
            f"`{g['bfloat16']['best_variant']}`; PyTorch's own bf16 matmul "
            f"{g['bfloat16']['variants']['matmul']['peak_flops'] / 1e9:.1f} GFLOP/s"
            + ("" if lim.get("native_bf16") else ", emulated: this CPU has no native bf16")
            + ").",
            f"- Memory bandwidth: {bw['peak_bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f}, "
            f"read {bw['read_bytes_per_s'] / 1e9:.1f}).",
            "- MFU divides by the GEMM peak of the engine's compute dtype. llama.cpp multiplies Q4_1 weights "
            "by Q8-quantized activations with integer dot products, which PyTorch has no peak for; its MFU is "
            "given against the fp32 peak.",
        ]
    lines += ["", "## Formulas", "", _FORMULAS]
    notes = []
    for e in engines:
        info = res["engines"][e]
        if info.get("error"):
            notes.append(f"- {DISPLAY[e]}: {info['error'].splitlines()[0]}")
        for c, lvl in (info.get("levels") or {}).items():
            summary = lvl.get("summary") or {}
            if lvl.get("error"):
                notes.append(f"- {DISPLAY[e]}, c={c}: {lvl['error'].splitlines()[0]}")
            elif summary.get("failed"):
                first = (summary.get("errors") or ["?"])[0]
                notes.append(
                    f"- {DISPLAY[e]}, c={c}: {summary['failed']} of {summary['failed'] + summary['completed']} "
                    f"requests failed (first: `{first}`); the figures cover the completed ones."
                )
    if notes:
        lines += ["", "## Errors and failed requests", "", *notes]
    return "\n".join(lines) + "\n"


_FORMULAS = """\
- TTFT: request sent → first streamed token; TPOT: (E2E − TTFT) / (output tokens − 1) per request; ITL: gap
  between consecutive streamed chunks; E2E: request sent → last byte. p50 = median over requests (ITL: over
  all gaps). Throughputs divide by the wall time of the measured requests (warm-ups excluded).
- FLOPs = 2·P_body·(N_in + N_out) + 2·P_head·N_out + 4·L·H·d·Σ(attended positions), with
  Σ = n·(n_in²/2 + n_out·(n_in + n_out/2)) over n requests of mean lengths n_in, n_out.
  MFU = FLOPs / duration / peak GEMM FLOP/s (engine's compute dtype).
- MBU (decode approximation: every weight read once per step, each sequence's KV read once per step):
  bytes/s = W·(output tok/s ÷ c) + output tok/s·(n_in + n_out/2)·KV_tok, KV_tok = 2·L·H_kv·d·(KV bytes);
  MBU = bytes/s / measured memory bandwidth. W differs by engine: fp32 ≈ 4 B/param, bf16 2 B/param,
  Q4_1 ≈ 0.63 B/param (+ the Q8_0 lm_head)."""


# ---------------------------------------------------------------------------------------------- plot
def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    engines = [e for e in ENGINES if e in res["engines"]]
    levels = res["workload"]["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for e in engines:
        xs, tput, ttft = [], [], []
        for c in levels:
            a, b = _value(res, e, c, "output_throughput"), _value(res, e, c, "median_ttft_ms")
            if a is None:
                continue
            xs.append(c)
            tput.append(a)
            ttft.append(b)
        if xs:
            ax1.plot(xs, tput, marker="o", label=DISPLAY[e])
            ax2.plot(xs, ttft, marker="o", label=DISPLAY[e])
    for ax, title, ylabel in (
        (ax1, "Output throughput", "output tokens/s"),
        (ax2, "Time to first token (p50)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylim(bottom=0)
    ax2.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(plain)
    m = res["machine"]
    fig.suptitle(
        f"{res['model']['name']}, {res['workload']['input_len']} in / {res['workload']['output_len']} out; "
        f"{m['cpu_model']}, {m['cpu_count']} cores; {res['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
