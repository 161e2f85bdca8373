"""Offline tokens/s of a mixture-of-experts model against the dense model of the same active size.

Two random checkpoints, saved by transformers as safetensors folders and served by ``tidellm.LLM``:
- a Mixtral with E experts, top-k, expert intermediate size I (``MixtralForCausalLM``);
- a Llama with intermediate size k * I and otherwise the same shapes (``LlamaForCausalLM``).
Both do the same multiply-adds per token; the MoE model holds E / k times the MLP weights, and a decode batch
reads the weights of every expert its tokens route to (at batch 1 only k of them, at batch 16 nearly all).

    .venv/bin/python benchmarks/bench_moe.py [--batch 1 16] [--repeats 5] [--dtype float32 bfloat16]

Each case runs ``--repeats`` timed ``generate`` calls of ``batch`` prompts (``--prompt-len`` random tokens,
``SamplingParams(max_tokens=64, ignore_eos=True)``) after one warm-up; the report gives the median and the
range of generated tokens/s. Results go to stdout and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tidellm.platforms import simd_flags


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over the whole vocabulary: the benchmark feeds token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "add_bos_token": False}))


def build_folders(root: Path, args: argparse.Namespace) -> dict[str, tuple[Path, int, int]]:
    """name -> (folder, total params, active params per token)."""
    import transformers

    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    configs = {
        "moe": transformers.MixtralConfig(
            **common,
            intermediate_size=args.expert_size,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
        ),
        "dense": transformers.LlamaConfig(**common, intermediate_size=args.top_k * args.expert_size),
    }
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        expert_params = 3 * args.hidden * args.expert_size * args.layers
        active = total - (args.experts - args.top_k) * expert_params if name == "moe" else total
        folder = root / name
        model.save_pretrained(folder)
        write_tokenizer(folder, args.vocab)
        out[name] = folder, total, active
        del model
        gc.collect()
    return out


def run_case(llm, prompts: list[list[int]], repeats: int) -> list[float]:
    from tidellm import SamplingParams

    params = SamplingParams(max_tokens=64, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from tidellm import LLM

    g = torch.Generator().manual_seed(0)
    # The same prompts for both models.
    prompts = {
        b: [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        for b in args.batch
    }
    results = []
    print(f"cpu flags: {simd_flags()}")
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_folders(Path(tmp), args)
        for dtype in args.dtype:
            for name, (folder, total, active) in folders.items():
                llm = LLM(
                    str(folder), dtype=dtype, max_model_len=512, kv_cache_memory_gb=0.5, log_level="WARNING"
                )
                for batch in args.batch:
                    rates = run_case(llm, prompts[batch], args.repeats)
                    row = dict(
                        model=name, dtype=dtype, batch=batch, total_params_m=round(total / 1e6, 1),
                        active_params_m=round(active / 1e6, 1), median_tok_s=round(statistics.median(rates), 1),
                        min_tok_s=round(min(rates), 1), max_tok_s=round(max(rates), 1),
                    )  # fmt: skip
                    results.append(row)
                    print(
                        f"{dtype:8s} {name:5s} batch {batch:3d}  params {row['total_params_m']:6.1f}M total / "
                        f"{row['active_params_m']:6.1f}M active  {row['median_tok_s']:8.1f} tok/s "
                        f"(min {row['min_tok_s']:.1f}, max {row['max_tok_s']:.1f})",
                        flush=True,
                    )
                del llm
                gc.collect()
    for dtype in args.dtype:
        for batch in args.batch:
            by = {
                r["model"]: r["median_tok_s"] for r in results if r["batch"] == batch and r["dtype"] == dtype
            }
            print(f"{dtype:8s} batch {batch:3d}: moe / dense = {by['moe'] / by['dense']:.2f}")
    if args.json:
        meta = dict(cpu_flags=simd_flags(), machine=platform.machine(), threads=torch.get_num_threads())
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "meta": meta, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
