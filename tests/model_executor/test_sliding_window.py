"""Sliding-window attention (Mistral's configured ``sliding_window``: a query at position p sees keys at
positions > p - window) against transformers in fp32, on a tiny random model saved as a safetensors folder.

Three levels: the window views of the step metadata; our paged model through test_llama's simulated engine
(every chunk and decode within 1e-4 of transformers' full-sequence forward, sequences up to 2.7 windows long,
chunked prefill, a prefix-cache hit, both decode paths) including a run in which every block behind a
request's window is filled with NaN before each step (what the scheduler hands back must never be read);
and the real engine against ``generate`` (greedy tokens identical, logprobs within 1e-3, alone, batched,
chunked, with prefix hits, in a KV pool too small to hold the sequences without releasing blocks, and in one
so small that requests are preempted and resumed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from parity_utils import arch_of, check_outputs, hf_greedy, tiny_llm
from test_families import _write_tokenizer
from test_llama import BLOCK_SIZE, DEVICES, EngineSim, SimRequest, _build, _run_engine, randomize_

from tidellm import LLM, SamplingParams
from tidellm.model_executor.layers.attention import AttentionMetadata, layer_windows, sdpa_backend

VOCAB = 256
EOS = VOCAB - 1
WINDOW = 6
MISTRAL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    sliding_window=WINDOW,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> tuple[transformers.PreTrainedModel, Path]:
    torch.manual_seed(0)
    hf = randomize_(transformers.MistralForCausalLM(transformers.MistralConfig(**MISTRAL)))
    folder = tmp_path_factory.mktemp("mistral")
    hf.save_pretrained(folder)
    _write_tokenizer(folder)
    return hf, folder


# ---------------------------------------------------------------- metadata views
def _meta(seq_lens, q_lens, table, bs=4):
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    slots = [
        int(table[r][p // bs]) * bs + p % bs
        for r in range(len(seq_lens))
        for p in range(seq_lens[r] - q_lens[r], seq_lens[r])
    ]
    return AttentionMetadata.build(
        query_start_loc=qsl, seq_lens=np.array(seq_lens), block_table=np.array(table),
        slot_mapping=np.array(slots), block_size=bs, device=torch.device("cpu"),
    )  # fmt: skip


def test_window_views_cut_keys_to_the_window() -> None:
    table = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]
    # r0: decode at position 16; r1: 5-token chunk after a prefix of 10; r2: 9-token first chunk.
    meta = _meta([17, 15, 9], [1, 5, 9], table)
    assert meta.for_window(None) is meta and meta.for_window(17) is meta  # no context longer than 17
    view = meta.for_window(WINDOW)
    assert view is meta.for_window(WINDOW) and view.window == WINDOW and view.workspace is meta.workspace
    d = view.decode
    # Keys 11..16 of r0: blocks 2..4 gathered, keys 8..10 of block 2 masked.
    assert d.block_ids.tolist() == [[12, 13, 14]] and d.max_len == 9 and d.window == WINDOW
    assert d.mask.view(-1).tolist() == [False] * 3 + [True] * 6
    assert d.block_table.tolist() == [table[0]]  # the kernel indexes by position and skips by itself
    chunk, first = view.prefills
    # r1's first query (position 10) sees keys 5..10: gathered from block 1 (key 4) on.
    assert chunk.key_start == 4 and chunk.block_ids.tolist() == [21, 22, 23] and chunk.num_keys == 11
    q_pos, k_pos = torch.arange(10, 15)[:, None], torch.arange(4, 15)[None, :]
    assert torch.equal(chunk.mask, (k_pos <= q_pos) & (k_pos > q_pos - WINDOW))
    # r2 has no prefix: its own K/V, with a band mask since the chunk is longer than the window.
    assert first.block_ids is None and first.mask.shape == (9, 9)
    assert first.mask[8].tolist() == [False] * 3 + [True] * 6
    assert first.mask[2].tolist()[:4] == [True, True, True, False]
    assert meta.prefills[1].mask is None  # the full-context view keeps is_causal
    with pytest.raises(ValueError, match="sliding window must be >= 1"):
        meta.for_window(0)


# ---------------------------------------------------------------- paged model vs transformers
def test_config_gives_every_layer_the_window(mistral) -> None:
    _, folder = mistral
    arch = arch_of(folder)
    assert (arch.architecture, arch.model_type, arch.sliding_window) == (
        "MistralForCausalLM",
        "mistral",
        WINDOW,
    )
    model, _ = _build(mistral[0], torch.float32, "cpu", arch)
    assert {layer.self_attn.attn.sliding_window for layer in model.model.layers} == {WINDOW}
    assert layer_windows(model) == [WINDOW] * MISTRAL["num_hidden_layers"]


@pytest.mark.parametrize("device", DEVICES)
def test_paged_parity_fp32(mistral, device: str) -> None:
    hf, folder = mistral
    _run_engine(hf, torch.float32, device, atol=1e-4, arch=arch_of(folder))


def test_paged_parity_gather_path(mistral, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDPA decode path (GPUs, or CPUs without the compiled kernel) cuts to the window too."""
    monkeypatch.setattr(sdpa_backend, "_use_cpu_kernel", lambda q, kv_cache: False)
    monkeypatch.setattr(sdpa_backend, "CPU_DECODE_CHUNK_BYTES", 1)  # one request per gather chunk
    hf, folder = mistral
    _run_engine(hf, torch.float32, "cpu", atol=1e-4, arch=arch_of(folder))


@pytest.mark.parametrize("gather", [False, True])
def test_blocks_behind_the_window_are_never_read(mistral, gather: bool, monkeypatch) -> None:
    """Before every step, each block wholly behind the window of the request's next query (the blocks the
    KV-cache manager releases) is filled with NaN in every layer: the logits stay transformers'."""
    if gather:
        monkeypatch.setattr(sdpa_backend, "_use_cpu_kernel", lambda q, kv_cache: False)
    hf, folder = mistral
    model, kv = _build(hf, torch.float32, "cpu", arch_of(folder))
    sim = EngineSim(model, kv, BLOCK_SIZE, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    reqs = [SimRequest(torch.randint(0, VOCAB, (n,), generator=g).tolist()) for n in (30, 19, 24)]
    with torch.no_grad():
        ref = [hf(torch.tensor([r.tokens])).logits[0] for r in reqs]
    plans = [[7, 9, *[1] * 14], [5, *[1] * 14], [12, 4, *[1] * 8]]  # chunks, then decodes
    poisoned = 0
    for step in range(max(map(len, plans))):
        batch = [(r, p[step]) for r, p in zip(reqs, plans, strict=True) if step < len(p)]
        for req, _ in batch:
            dead = max(0, req.computed - WINDOW + 1) // BLOCK_SIZE
            for cache in kv:
                cache[:, req.block_ids[:dead]] = float("nan")
            poisoned += dead
        starts = [r.computed for r, _ in batch]
        for (req, n), got, s in zip(batch, sim.step(batch), starts, strict=True):
            torch.testing.assert_close(got, ref[reqs.index(req)][s : s + n], atol=1e-4, rtol=0)
    assert poisoned > 0 and all(r.computed == len(r.tokens) for r in reqs)


# ---------------------------------------------------------------- the real engine vs generate
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in (3, 13, 30, 7, 21)]
    prompts[4][:12] = prompts[2][:12]  # a shared prefix of three 4-token blocks
    return prompts


def test_llm_parity_fp32(mistral) -> None:
    hf, folder = mistral
    prompts = _prompts()
    reference = hf_greedy(hf, prompts, MAX_NEW, [EOS])
    llm = tiny_llm(folder)  # 8-token steps: every prompt longer than that is prefilled in chunks
    assert llm.engine.core.scheduler.kv.windows == (WINDOW,)
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    hits_before = llm.engine.core.scheduler.kv.stats.hits
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    # Released blocks keep their hashes: the alone runs' prompts are hit, early blocks skipped.
    assert llm.engine.core.scheduler.kv.stats.hits > hits_before
    check_outputs(batched, reference)


def test_llm_small_pool_needs_released_blocks(mistral) -> None:
    """30 blocks of 4 tokens for five sequences needing 51 blocks in all: without handing back the blocks
    behind the window the engine would have to preempt; with it every request keeps running."""
    hf, folder = mistral
    prompts = _prompts()
    num_blocks = 30
    assert sum(-(-(len(p) + MAX_NEW) // 4) for p in prompts) > num_blocks
    per_block = 2 * 4 * MISTRAL["num_key_value_heads"] * 16 * 4 * MISTRAL["num_hidden_layers"]  # bytes
    llm = LLM(
        str(folder),
        dtype="float32",
        max_model_len=64,
        kv_cache_memory_gb=num_blocks * per_block / 2**30,
        block_size=4,
        enable_prefix_caching=False,
        log_level="WARNING",
    )
    assert llm.engine.core.scheduler.kv.num_blocks == num_blocks
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions == 0
    check_outputs(outputs, hf_greedy(hf, prompts, MAX_NEW, [EOS]))


def test_llm_preemption_and_prefix_hits_with_released_blocks(mistral) -> None:
    """Ten requests in 16 blocks: some are preempted and resumed, hits include blocks already released
    (kept hashed in the free list) and skipped ones; the outputs stay transformers'."""
    hf, folder = mistral
    g = torch.Generator().manual_seed(11)
    prompts = _prompts() + [
        torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in (25, 9, 17, 28, 11)
    ]
    prompts[6][:16] = prompts[2][:16]
    per_block = 2 * 4 * MISTRAL["num_key_value_heads"] * 16 * 4 * MISTRAL["num_hidden_layers"]  # bytes
    llm = tiny_llm(folder, kv_cache_memory_gb=16 * per_block / 2**30)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    scheduler = llm.engine.core.scheduler
    assert scheduler.num_preemptions > 0 and scheduler.kv.stats.hits > 0
    check_outputs(outputs, hf_greedy(hf, prompts, MAX_NEW, [EOS]))


# ---------------------------------------------------------------- the other families that slide every layer
OTHERS = {
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**MISTRAL, original_max_position_embeddings=128)
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**MISTRAL, num_local_experts=4, num_experts_per_tok=2)
    ),
}


@pytest.fixture(scope="module", params=sorted(OTHERS))
def other(request, tmp_path_factory) -> tuple[transformers.PreTrainedModel, Path]:
    torch.manual_seed(1)
    hf = randomize_(OTHERS[request.param]().float().eval())
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    _write_tokenizer(folder)
    return hf, folder


def test_phi3_and_mixtral_slide_every_layer(other) -> None:
    """transformers applies their configured window in every layer (Phi-3-mini-4k: 2047 of 4096): so do we,
    in the paged model and through the real engine."""
    hf, folder = other
    arch = arch_of(folder)
    assert arch.sliding_window == WINDOW
    _run_engine(hf, torch.float32, "cpu", atol=1e-4, arch=arch)
    prompts = _prompts()
    reference = hf_greedy(hf, prompts, MAX_NEW, [EOS])
    llm = tiny_llm(folder)
    assert llm.engine.core.scheduler.kv.windows == (WINDOW,)
    check_outputs(llm.generate(prompts, GREEDY, use_tqdm=False), reference)
