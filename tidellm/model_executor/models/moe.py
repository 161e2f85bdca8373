"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE, one class with family flags.

Llama's attention and decoder layer (``models/llama.py``, which also gives Qwen's QKV bias and Qwen3's q/k
norm) with the MLP of sparse layers replaced by ``SparseMoeBlock``: a router, the routed experts
(``layers/fused_moe``) and, for Qwen2-MoE, a shared expert scaled by a sigmoid gate. Qwen MoE models may keep
a dense MLP on some layers (``decoder_sparse_step``, ``mlp_only_layers``); the settings come from
``ArchConfig.moe``.

Checkpoints store experts one by one (Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen
``mlp.experts.{e}.gate_proj/up_proj/down_proj``); transformers v5 holds them stacked in memory like we do
(``mlp.experts.gate_up_proj`` / ``down_proj``). Both load.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.layers.fused_moe import FusedMoE
from tidellm.model_executor.layers.linear import matmul_in_fp32
from tidellm.model_executor.layers.weight_utils import check_all_loaded, load_into
from tidellm.model_executor.models.llama import (
    IGNORED_SUFFIXES,
    STACKED_PARAMS,
    LlamaForCausalLM,
    LlamaMLP,
    _expected_shards,
)

# One expert's matrix in a checkpoint: (layer prefix, expert id, its name there).
_EXPERT_WEIGHT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_KIND = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_CHECKPOINT_NAME = {  # family -> our shard kind -> checkpoint spelling, for error messages
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "default": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}


class GateLinear(nn.Module):
    """A small bias-free projection kept dense (never block-quantized): the router, whose top-k choice is
    discrete so a small error can pick another expert, and Qwen2-MoE's one-row shared-expert gate."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        weight = torch.empty(output_size, input_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.upcast = matmul_in_fp32(dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)  # [T, out]


class SparseMoeBlock(nn.Module):
    """Route each token to its top-k experts and sum their weighted outputs (plus the gated shared expert)."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        moe = arch.moe
        self.gate = GateLinear(arch.hidden_size, moe.num_experts, dtype, device)
        self.experts = FusedMoE(
            moe.num_experts,
            moe.num_experts_per_tok,
            arch.hidden_size,
            moe.intermediate_size,
            moe.renormalize,
            dtype,
            device,
        )
        self.shared_expert: nn.Module | None = None
        if moe.shared_expert_intermediate_size > 0:
            shared = replace(arch, intermediate_size=moe.shared_expert_intermediate_size)
            self.shared_expert = LlamaMLP(shared, dtype, device)
            self.shared_expert_gate = GateLinear(arch.hidden_size, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))  # [T, H]; router logits [T, E]
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, 1] * [T, H]
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: Llama's decoder with sparse MLPs where ``arch.moe`` says so."""

    def __init__(
        self, arch: ArchConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> None:
        if arch.moe is None:
            raise ValueError(
                f"{arch.architecture}: the config has no mixture-of-experts settings (num_experts / "
                "num_local_experts, num_experts_per_tok); load it through the model loader."
            )
        if arch.hidden_act != "silu":
            raise ValueError(f"{arch.architecture} supports hidden_act='silu' only (got {arch.hidden_act!r})")
        device = torch.device("cpu") if device is None else torch.device(device)

        def make_mlp(layer_idx: int) -> nn.Module | None:
            return SparseMoeBlock(arch, dtype, device) if arch.moe.is_sparse(layer_idx) else None

        super().__init__(arch, dtype, device, make_mlp=make_mlp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors, experts one by one or stacked; ValueError naming every missing or
        unexpected weight."""
        params = dict(self.named_parameters())
        pending = self._expected(params)
        stacked = {name for name, shard in pending if isinstance(shard, tuple)}  # (expert, kind) shards
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES) or (self.lm_head.tied and name == "lm_head.weight"):
                continue
            target, shard = _param_and_shard(name.replace(".block_sparse_moe.", ".mlp."))
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            load_into(param, name, tensor, shard)
            if shard is None and target in stacked:  # a whole stacked tensor: every expert's piece at once
                for key in [k for k in pending if k[0] == target]:
                    del pending[key]
            pending.pop((target, shard), None)
        check_all_loaded(self.arch.architecture, pending.values(), unexpected)
        return set(params)

    def _expected(self, params: dict[str, nn.Parameter]) -> dict[tuple[str, Hashable], str]:
        """(parameter name, shard id) -> checkpoint name of every piece to load; experts are expected one
        by one (a stacked tensor covers all of its pieces at once)."""
        experts = {name: m for name, m in self.named_modules() if isinstance(m, FusedMoE)}
        spelling = _CHECKPOINT_NAME.get(self.arch.model_type, _CHECKPOINT_NAME["default"])
        out: dict[tuple[str, Hashable], str] = {}
        for (name, shard), theirs in _expected_shards(self, params).items():
            prefix = name.rpartition(".")[0]
            if prefix in experts:
                for e, kind in experts[prefix].shards(params[name]):
                    out[(name, (e, kind))] = f"{prefix}.{e}.{spelling[kind]}.weight"
            else:
                out[(name, shard)] = theirs
        if self.arch.model_type == "mixtral":  # every Mixtral MLP is sparse and named block_sparse_moe
            out = {k: v.replace(".mlp.", ".block_sparse_moe.") for k, v in out.items()}
        return out


def _param_and_shard(name: str) -> tuple[str, Hashable]:
    """Our parameter name and shard id for a checkpoint name (block_sparse_moe already renamed to mlp)."""
    m = _EXPERT_WEIGHT.match(name)
    if m:
        prefix, expert, kind = m.groups()
        kind = _KIND[kind]
        return f"{prefix}.{'down_proj' if kind == 'down' else 'gate_up_proj'}", (int(expert), kind)
    for ours, theirs, shard_id in STACKED_PARAMS:
        if theirs in name:
            return name.replace(theirs, ours), shard_id
    return name, None


class MixtralForCausalLM(MoeForCausalLM):
    """Every layer sparse, top-k weights always renormalised (``ArchConfig.moe`` from the loader)."""


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Biases on q/k/v but none on o_proj, like Qwen2; a sigmoid-gated shared expert."""

    o_proj_bias = False


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """q/k norm (``ArchConfig.qk_norm``); ``attention_bias`` covers o_proj as in llama."""
