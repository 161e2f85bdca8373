"""Mixture-of-experts GGUF files (Mixtral as llama.cpp's ``llama`` with experts, ``qwen2moe``, ``qwen3moe``),
written as llama.cpp would (stacked ``ffn_*_exps`` experts, the shared expert and its vector gate, the expert
keys), through ``tidellm.LLM``: greedy tokens identical to transformers fp32 and logprobs within 1e-3, alone
and batched with chunked prefill and prefix-cache hits; a Q8_0 file stays close."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from parity_utils import check_gguf_file_parity, check_outputs, hf_greedy

from tidellm import LLM, SamplingParams
from tidellm.model_executor.loader.gguf_arch import arch_from_gguf
from tidellm.model_executor.loader.gguf_file import GGUFFile

MAX_NEW = 10
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def _tiny_moe(family: str, vocab: int) -> torch.nn.Module:
    """Each family's routing as llama.cpp hard-codes it: Mixtral and Qwen3-MoE renormalize the top k,
    Qwen2-MoE does not and has a shared expert (and here a dense layer among the sparse ones)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "mixtral":
        cfg = transformers.MixtralConfig(
            **common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2
        )
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=40,
            num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        )  # fmt: skip
    else:
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True,
        )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p)
            )
    return model.eval()


@pytest.fixture
def vocab(tiny_model) -> int:
    return tiny_model("llama").config.vocab_size  # the byte vocabulary the GGUF tokenizer carries


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_gguf_moe_through_llm_matches_transformers(tmp_path, hf_gguf_writer, vocab, family):
    hf = _tiny_moe(family, vocab)
    path = hf_gguf_writer(hf, tmp_path / f"{family}.gguf", GGUF_ARCH[family])
    arch = arch_from_gguf(GGUFFile(path))
    assert arch.model_type == family and arch.moe is not None
    assert arch.moe.renormalize == (family != "qwen2_moe")
    assert arch.moe.mlp_only_layers == ((1,) if family == "qwen2_moe" else ())
    assert arch.moe.shared_expert_intermediate_size == (40 if family == "qwen2_moe" else 0)
    check_gguf_file_parity(hf, path, vocab, (5, 19, 11), MAX_NEW, tmp_path / "cache")


def test_gguf_moe_q8_0_matches_the_dequantized_weights(tmp_path, hf_gguf_writer, vocab):
    """Q8_0 stacked experts are kept in their blocks, expert by expert: the engine matches transformers
    holding the same Q8_0-rounded weights, token for token and within 1e-3 in logprobs."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf = _tiny_moe("qwen3_moe", vocab)
    path = hf_gguf_writer(hf, tmp_path / "q8.gguf", "qwen3moe", q8)
    with torch.no_grad():  # what the file holds: every matrix (experts included) rounded through Q8_0
        for p in hf.parameters():
            if p.dim() >= 2:
                w = p.numpy()
                p.copy_(
                    torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape))
                )
    llm = LLM(str(path), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01, log_level="WARNING",
              cache_dir=str(tmp_path / "cache"))  # fmt: skip
    experts = llm.engine.core.runner.model.model.layers[0].mlp.experts
    assert experts.quant_method.fmt == "q8_0"  # quantization auto: Q8_0 experts kept in their blocks
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 16)]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, ignore_eos=True)
    check_outputs(
        llm.generate(prompts, greedy, use_tqdm=False), hf_greedy(hf, prompts, MAX_NEW, [], stepwise=True)
    )


def _experts(llm: LLM, layer: int = 0):
    return llm.engine.core.runner.model.model.layers[layer].mlp.experts


def test_quantization_q4_1_holds_experts_as_blocks(tmp_path, hf_gguf_writer, vocab):
    """--quantization q4_1 on an fp32 file: experts (and the linears, the shared expert, the embedding and LM
    head) are re-quantized to blocks while the router stays dense; the engine then matches transformers
    holding the same q4_1-rounded weights."""
    from tidellm.model_executor.quant.blocks import QuantizedTensor

    hf = _tiny_moe("qwen2_moe", vocab)
    path = hf_gguf_writer(hf, tmp_path / "f32.gguf", "qwen2moe")
    llm = LLM(str(path), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01, log_level="WARNING",
              quantization="q4_1", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    experts = _experts(llm)
    assert (
        experts.quant_method.fmt == "q4_1"
        and len(experts.qgate_up) == 6
        and experts.gate_up_proj.numel() == 0
    )
    assert llm.engine.core.runner.model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if (
                p.dim() < 2
                or p.shape[-1] % 32
                or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
            ):
                continue  # vectors, the router and rows of partial blocks (the shared expert's down) stay dense
            flat = p.reshape(-1, p.shape[-1])
            p.copy_(QuantizedTensor.quantize(flat, "q4_1").dequantize().reshape(p.shape))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 14)]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, ignore_eos=True)
    check_outputs(
        llm.generate(prompts, greedy, use_tqdm=False), hf_greedy(hf, prompts, MAX_NEW, [], stepwise=True)
    )
