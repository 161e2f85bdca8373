"""Where a decode step's time goes: the engine's wall time per step against the device's time in kernels.

For each batch size: start that many requests (random prompts of --input-len tokens, ignore_eos), step until
every one has its first token, then time --steps decode steps twice: plainly (wall time per step), and under
``torch.profiler`` (device time per step, the sum over its kernels and copies, and launches per step). The
bytes a step must read (the weights once, each sequence's KV once) over its wall time, against the measured
memory bandwidth (``machine_limits.py``), give the step's MBU. The gap between wall and kernel time is the
host's: Python, input preparation and kernel launches the GPU waits on. A GPU's figures: ``--device cpu``
only tries the script (no device time, and no MBU: the weights a CPU step reads depend on its kernels, see
``compare.py``).

    python benchmarks/step_profile.py --device cuda --batch-sizes 1,16,64 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from machine_limits import measure_cuda


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=30, help="Decode steps timed per batch size (each way)")
    p.add_argument("--json", default=None, help="Also write the figures here")
    return p.parse_args(argv)


def _decode_steps(engine, n: int) -> list[float]:
    """Wall seconds of ``n`` engine steps (every request is decoding, none finishes)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def _profiled_steps(engine, n: int, device: str) -> dict[str, float]:
    """Device time and kernel launches per step, from ``torch.profiler`` over ``n`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        _decode_steps(engine, n)
        if device == "cuda":
            torch.cuda.synchronize()
    device_us = launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            device_us += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            launches += 1
    return {"device_ms_per_step": device_us / 1e3 / n, "kernels_per_step": launches / n}


def profile_batch(args: argparse.Namespace, batch: int, bandwidth: float) -> dict[str, Any]:
    from tidellm import LLM, SamplingParams
    from tidellm.benchmarks.common import random_prompts

    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.input_len + 3 * args.steps + 16,
        log_level="WARNING",
    )
    engine = llm.engine
    runner = engine.core.runner
    tok = engine.tokenizer
    prompts = random_prompts(tok.vocab_size, tok.all_special_ids, batch, args.input_len, seed=batch)
    params = SamplingParams(max_tokens=3 * args.steps + 8, ignore_eos=True, temperature=0.0)
    for p in prompts:
        engine.add_request(engine.next_request_id(), p, params)
    while len(engine.core.scheduler.waiting) or any(  # until every request has its first token
        s.num_computed_tokens < s.num_prompt_tokens for s in runner.states.values()
    ):
        engine.step()
    _decode_steps(engine, 3)  # warm-up
    wall = _decode_steps(engine, args.steps)
    prof = _profiled_steps(engine, args.steps, args.device)
    for rid in list(engine.output_processor.parents):
        engine.abort_request(rid)
    step_s = statistics.median(wall)
    kv_per_token = runner.kv_plan.bytes_per_block / runner.kv_plan.block_size
    # The weights once (the embedding table is read only row by row, unless it is also the LM head), and
    # each sequence's KV at its mean length over the timed steps.
    weight_bytes = runner.load_report.weight_bytes
    if not runner.source.arch.tie_word_embeddings:
        weight_bytes -= sum(p.nbytes for n, p in runner.model.named_parameters() if "embed_tokens" in n)
    ctx = args.input_len + 3 + 1.5 * args.steps
    step_bytes = weight_bytes + batch * ctx * kv_per_token if args.device == "cuda" else None
    out = {
        "batch": batch,
        "step_ms_median": step_s * 1e3,
        "step_ms_min": min(wall) * 1e3,
        "tokens_per_s": batch / step_s,
        **prof,
        "device_busy": prof["device_ms_per_step"] / 1e3 / step_s,
        "bytes_per_step": step_bytes,
    }
    if step_bytes is not None:
        out["gbytes_per_s"] = step_bytes / step_s / 1e9
        out["mbu"] = step_bytes / step_s / bandwidth
        out["mbu_of_device_time"] = step_bytes / (prof["device_ms_per_step"] / 1e3) / bandwidth
    del llm, engine
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = measure_cuda(quick=True) if args.device == "cuda" else None
    bandwidth = limits["memory_bandwidth"]["peak_bytes_per_s"] if limits else 0.0
    if limits:
        print(f"memory bandwidth {bandwidth / 1e9:.0f} GB/s ({limits['device']})", flush=True)
    rows = []
    for b in args.batch_sizes:
        r = profile_batch(args, b, bandwidth)
        rows.append(r)
        line = f"batch {b:3d}: step {r['step_ms_median']:.2f} ms (min {r['step_ms_min']:.2f}), "
        line += f"{r['tokens_per_s']:.0f} tok/s"
        if r["bytes_per_step"] is not None:
            line += (
                f"; device {r['device_ms_per_step']:.2f} ms/step ({100 * r['device_busy']:.0f}% busy), "
                f"{r['kernels_per_step']:.0f} kernels/step; {r['bytes_per_step'] / 1e6:.0f} MB/step -> "
                f"{r['gbytes_per_s']:.0f} GB/s, MBU {100 * r['mbu']:.1f}% "
                f"({100 * r['mbu_of_device_time']:.0f}% of the device time)"
            )
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"limits": limits, "args": vars(args), "rows": rows}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
