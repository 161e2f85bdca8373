"""Benchmark one engine step of a SmolLM2-135M-shaped llama (random weights) on the paged KV cache:
a decode step of 32 requests x 512 context, and a 512-token prefill (metadata build + forward + logits
of the last token of each request).

    .venv/bin/python benchmarks/bench_llama_step.py [--dtype float32 bfloat16] [--rounds 5]
        [--decode-chunk-mib 8 1024]   # compare CPU decode chunk sizes (1024 = one gather for the batch)

Shared machines are noisy: each round times a few steps of each case, interleaved, and the report gives
the median and the minimum over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.forward_context import set_forward_context
from tidellm.model_executor.layers.attention import AttentionMetadata, sdpa_backend
from tidellm.model_executor.models.kv_cache import allocate_kv_caches
from tidellm.model_executor.models.registry import get_model_class

SMOLLM2 = ArchConfig(
    architecture="LlamaForCausalLM",
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
BLOCK_SIZE = 16


def random_model(dtype: torch.dtype) -> torch.nn.Module:
    model = get_model_class(SMOLLM2)(SMOLLM2, dtype=dtype, device=torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def step_inputs(q_lens: list[int], seq_lens: list[int], num_blocks: int, seed: int = 0) -> dict:
    """Flattened step inputs with every request's blocks drawn from a shuffled pool."""
    pool = np.random.default_rng(seed).permutation(num_blocks)
    max_blocks = -(-max(seq_lens) // BLOCK_SIZE)
    table = np.zeros((len(q_lens), max_blocks), dtype=np.int32)
    used = 0
    positions, slots = [], []
    for i, (q, s) in enumerate(zip(q_lens, seq_lens, strict=True)):
        n = -(-s // BLOCK_SIZE)
        table[i, :n] = pool[used : used + n]
        used += n
        pos = np.arange(s - q, s)
        positions.append(pos)
        slots.append(table[i, pos // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + pos % BLOCK_SIZE)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pos = np.concatenate(positions)
    return dict(
        query_start_loc=qsl,
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_table=table,
        slot_mapping=np.concatenate(slots),
        positions=pos,
        sample_idx=qsl[1:].astype(np.int64) - 1,
    )


@torch.inference_mode()
def time_step(model, kv_caches, inputs: dict, iters: int) -> float:
    """Median ms over ``iters`` steps (after 2 warm-up steps)."""
    positions = torch.from_numpy(inputs["positions"])
    input_ids = torch.randint(0, SMOLLM2.vocab_size, positions.shape)
    sample_idx = torch.from_numpy(inputs["sample_idx"])
    times = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        meta = AttentionMetadata.build(
            query_start_loc=inputs["query_start_loc"],
            seq_lens=inputs["seq_lens"],
            block_table=inputs["block_table"],
            slot_mapping=inputs["slot_mapping"],
            block_size=BLOCK_SIZE,
            device=torch.device("cpu"),
        )
        with set_forward_context(meta, kv_caches):
            hidden = model(input_ids, positions)
        model.compute_logits(hidden[sample_idx])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument(
        "--decode-chunk-mib", type=float, nargs="+", default=[sdpa_backend.CPU_DECODE_CHUNK_BYTES / 2**20]
    )
    args = parser.parse_args()
    num_blocks = args.batch * (-(-args.context // BLOCK_SIZE)) + 64
    decode = step_inputs([1] * args.batch, [args.context] * args.batch, num_blocks)
    prefill = step_inputs([args.prefill], [args.prefill], num_blocks)
    for name in args.dtype:
        dtype = getattr(torch, name)
        model = random_model(dtype)
        kv = allocate_kv_caches(SMOLLM2, num_blocks, BLOCK_SIZE, dtype, torch.device("cpu"))
        times: dict[tuple[str, float], list[float]] = {}
        for _ in range(args.rounds):
            for mib in args.decode_chunk_mib:
                sdpa_backend.CPU_DECODE_CHUNK_BYTES = int(mib * 2**20)
                times.setdefault(("decode", mib), []).append(time_step(model, kv, decode, 3))
            times.setdefault(("prefill", 0), []).append(time_step(model, kv, prefill, 1))
        for (case, mib), ts in times.items():
            what = (
                f"decode b={args.batch} ctx={args.context} chunk={mib:g}MiB"
                if case == "decode"
                else f"prefill {args.prefill}"
            )
            print(
                f"{name:9s} threads={torch.get_num_threads()} {what:36s} median {statistics.median(ts):7.1f} ms"
                f"  min {min(ts):7.1f} ms"
            )


if __name__ == "__main__":
    main()
