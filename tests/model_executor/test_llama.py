"""Our paged LlamaForCausalLM against transformers' full-sequence forward, through a simulated engine:
shuffled non-contiguous blocks, chunked prefill, decodes interleaved with prefill chunks, a prefix-cache hit.
Plus the weight-loading and registry errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import transformers

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.forward_context import set_forward_context
from tidellm.model_executor.layers.attention import AttentionMetadata, sdpa_backend
from tidellm.model_executor.models.kv_cache import allocate_kv_caches
from tidellm.model_executor.models.registry import SUPPORTED_ARCHITECTURES, get_model_class


def arch_from_hf(cfg: transformers.LlamaConfig) -> ArchConfig:
    rope = dict(cfg.rope_parameters)
    theta = rope.pop("rope_theta")
    return ArchConfig(
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
    )


def random_hf_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A small llama with weights large enough that attention is far from uniform."""
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)))


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 eval mode, norm weights near one, everything else N(0, 0.15) (biases included)."""
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


@dataclass
class SimRequest:
    tokens: list[int]  # the whole sequence: prompt and the tokens it will "generate"
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0


class EngineSim:
    def __init__(
        self, model, kv_caches: list[torch.Tensor], block_size: int, device: torch.device, seed: int = 0
    ):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        num_blocks = kv_caches[0].shape[1]
        self.free = np.random.default_rng(seed).permutation(num_blocks).tolist()  # shuffled, non-contiguous

    def step(self, schedule: list[tuple[SimRequest, int]]) -> list[torch.Tensor]:
        """Run ``n`` more tokens of each request in one flattened batch; logits [n, V] per request."""
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        for req, n in schedule:
            assert 0 < n <= len(req.tokens) - req.computed
            while len(req.block_ids) * bs < req.computed + n:
                req.block_ids.append(self.free.pop())
            p = np.arange(req.computed, req.computed + n)
            ids += req.tokens[req.computed : req.computed + n]
            pos += p.tolist()
            slots += (np.asarray(req.block_ids)[p // bs] * bs + p % bs).tolist()
            qsl.append(qsl[-1] + n)
            seq_lens.append(req.computed + n)
        table = np.zeros((len(schedule), max(len(r.block_ids) for r, _ in schedule)), dtype=np.int32)
        for i, (req, _) in enumerate(schedule):
            table[i, : len(req.block_ids)] = req.block_ids
        meta = AttentionMetadata.build(
            query_start_loc=np.asarray(qsl, dtype=np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_table=table,
            slot_mapping=np.asarray(slots, dtype=np.int64),
            block_size=bs,
            device=self.device,
        )
        with torch.inference_mode(), set_forward_context(meta, self.kv_caches):
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device))
            logits = self.model.compute_logits(hidden)
        out = []
        for i, (req, n) in enumerate(schedule):
            out.append(logits[qsl[i] : qsl[i + 1]].cpu())
            req.computed += n
        return out


BLOCK_SIZE = 4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short, so the test spans all three frequency bands
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _build(hf, dtype: torch.dtype, device: str, arch: ArchConfig | None = None):
    arch = arch_from_hf(hf.config) if arch is None else arch
    model = get_model_class(arch)(arch, dtype=dtype, device=torch.device(device))
    model.load_weights(hf.state_dict().items())
    kv = allocate_kv_caches(arch, 48, BLOCK_SIZE, dtype, torch.device(device))
    return model.eval(), kv


def _run_engine(
    hf, dtype: torch.dtype, device: str, atol: float, rtol: float = 0.0, arch: ArchConfig | None = None
) -> None:
    """Our model (built from ``arch``, default: derived from the llama config) vs ``hf``'s logits."""
    model, kv = _build(hf, dtype, device, arch)
    sim = EngineSim(model, kv, BLOCK_SIZE, torch.device(device))
    g = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size

    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    a, b, c = SimRequest(toks(16)), SimRequest(toks(11)), SimRequest(toks(12))
    # d's first 8 tokens (two full blocks) are a's: it starts with a's blocks as a prefix-cache hit.
    d = SimRequest(a.tokens[:8] + toks(7))
    e = SimRequest(toks(5))  # a one-token prompt: its prefill is a decode-shaped step (q_len == seq_len == 1)
    reqs = {"a": a, "b": b, "c": c, "d": d, "e": e}
    with torch.no_grad():
        ref = {k: hf(torch.tensor([r.tokens])).logits[0] for k, r in reqs.items()}  # [L, V] fp32

    schedule = [
        [(a, 7), (b, 6)],  # two prefills, a chunked
        [(b, 1), (a, 6), (c, 5)],  # decode first, then a's 2nd chunk (prefix 7), c's 1st chunk
        [(a, 1), (c, 4), (b, 1)],  # decodes interleaved with c's 2nd chunk (prefix 5)
        [(d, 5), (a, 1), (b, 1), (c, 1)],  # prefix-hit prefill, then decodes of different lengths
        [(d, 1), (b, 1), (c, 1)],
        [(a, 1), (d, 1)],
    ]
    for step, batch in enumerate(schedule):
        if step == 3:  # a's first two blocks are full: d hits them
            d.block_ids, d.computed = list(a.block_ids[:2]), 8
        starts = [r.computed for r, _ in batch]
        for (req, n), got, s in zip(batch, sim.step(batch), starts, strict=True):
            name = next(k for k, r in reqs.items() if r is req)
            want = ref[name][s : s + n]
            torch.testing.assert_close(
                got, want, atol=atol, rtol=rtol, msg=lambda m, s=s, name=name: f"{name}@{s}: {m}"
            )
    # Finish every request (e joins now) with all-decode steps: contiguous decode rows, a length mask.
    while any(r.computed < len(r.tokens) for r in reqs.values()):
        batch = [(r, 1) for r in reqs.values() if r.computed < len(r.tokens)]
        starts = [r.computed for r, _ in batch]
        for (req, _), got, s in zip(batch, sim.step(batch), starts, strict=True):
            name = next(k for k, r in reqs.items() if r is req)
            torch.testing.assert_close(got, ref[name][s : s + 1], atol=atol, rtol=rtol)


CONFIGS = {
    "untied": {},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope_bias": {"rope_scaling": LLAMA3_ROPE, "attention_bias": True, "mlp_bias": True},
    "linear_rope_head_dim": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "head_dim": 32},
    "mha": {"num_key_value_heads": 4, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(name: str, device: str) -> None:
    _run_engine(random_hf_llama(**CONFIGS[name]), torch.float32, device, atol=1e-4)


def test_parity_decode_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU decode path attends a few requests at a time (cache-sized chunks): force one per chunk."""
    monkeypatch.setattr(sdpa_backend, "CPU_DECODE_CHUNK_BYTES", 1)
    _run_engine(random_hf_llama(), torch.float32, "cpu", atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_runs_close(device: str) -> None:
    _run_engine(random_hf_llama(**CONFIGS["llama3_rope_bias"]), torch.bfloat16, device, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------- loading and registry errors
def _fresh(hf):
    arch = arch_from_hf(hf.config)
    return get_model_class(arch)(arch, dtype=torch.float32, device=torch.device("cpu"))


def test_load_weights_missing() -> None:
    hf = random_hf_llama()
    weights = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(
        ValueError, match=r"missing weights: \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"
    ):
        _fresh(hf).load_weights(weights.items())


def test_load_weights_unexpected_and_ignored() -> None:
    hf = random_hf_llama()
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored
    _fresh(hf).load_weights(weights.items())
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.ones(2, 2)
    with pytest.raises(
        ValueError, match=r"unexpected weights: \['model\.layers\.0\.mlp\.extra_proj\.weight'\]"
    ):
        _fresh(hf).load_weights(weights.items())


def test_load_weights_bad_shape_and_untied_lm_head_missing() -> None:
    hf = random_hf_llama()
    weights = dict(hf.state_dict())
    weights["model.layers.0.mlp.up_proj.weight"] = torch.ones(3, 64)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\(3, 64\) != expected \(128, 64\).*shard 1"):
        _fresh(hf).load_weights(weights.items())
    weights = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing weights: \['lm_head\.weight'\]"):
        _fresh(hf).load_weights(weights.items())


def test_tied_head_shares_embedding_and_bf16_cast() -> None:
    hf = random_hf_llama(tie_word_embeddings=True)
    arch = arch_from_hf(hf.config)
    model = get_model_class(arch)(arch, dtype=torch.bfloat16, device=torch.device("cpu"))
    model.load_weights((k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight")
    assert model.lm_head.source is model.model.embed_tokens
    assert not list(model.lm_head.parameters())  # counted once, in the embedding
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(
        model.model.embed_tokens.weight.float(), hf.model.embed_tokens.weight, rtol=1e-2, atol=0
    )


def test_registry() -> None:
    assert {"LlamaForCausalLM", "MistralForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)
    assert get_model_class("MistralForCausalLM").__name__ == "LlamaForCausalLM"
    with pytest.raises(
        ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM, MistralForCausalLM"
    ):
        get_model_class("GPT2LMHeadModel")


def test_unsupported_family_features_raise() -> None:
    arch = arch_from_hf(random_hf_llama().config)
    arch.rope_scaling = {"rope_type": "proportional", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling type 'proportional' is not supported"):
        get_model_class(arch)(arch)
    arch.rope_scaling = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(ValueError, match="lacks the key 'low_freq_factor'"):
        get_model_class(arch)(arch)
    arch.rope_scaling, arch.sliding_window = None, 16
    with pytest.raises(ValueError, match="sliding-window"):
        get_model_class(arch)(arch)


def test_forward_outside_context_raises() -> None:
    model = _fresh(random_hf_llama())
    with pytest.raises(RuntimeError, match="set_forward_context"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]))
