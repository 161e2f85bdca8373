"""The routed experts of a mixture-of-experts MLP: top-k routing and the expert computation grouped by expert.

Tokens are sorted by the expert they were routed to (one argsort over the ``T * k`` choices); each active
expert then runs one gate_up and one down matmul over all its gathered tokens, and the outputs are weighted
and summed back per token. The Python loop is over experts (only those with tokens do any work), never over
tokens, so a prefill of many tokens costs about as many matmuls as a decode step.

Expert weights are stacked, ``gate_up_proj [E, 2I, H]`` (gate rows then up rows) and ``down_proj [E, H, I]``:
the layout transformers v5 keeps in memory, so its tensors load whole and a checkpoint's per-expert tensors
(``experts.{e}.gate_proj.weight`` ...) load into slices. Under block quantization (``use_blocks``) each
expert's two matrices are held as blocks instead and multiplied by the block method, as linear layers are.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.layers.activation import SiluAndMul
from tidellm.model_executor.layers.linear import load_dense, matmul_in_fp32

# Shard ids of one expert's pieces: (expert id, one of these).
EXPERT_SHARDS = ("gate", "up", "down")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then the ``top_k`` largest; ``renormalize`` rescales those to sum to
    one (Mixtral always, Qwen MoE when ``norm_topk_prob``). Returns (weights [T, k] fp32, expert ids [T, k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k] each, most probable first
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor | Sequence[Any],
    down: torch.Tensor | Sequence[Any],
    weights: torch.Tensor,
    ids: torch.Tensor,
    upcast: bool = False,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    matmul: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for every token t, with SwiGLU experts.

    x [T, H]; gate_up [E, 2I, H]; down [E, H, I]; weights, ids [T, k]. ``upcast`` multiplies in fp32 (CPUs that
    emulate bf16 matmuls, as ``Linear`` does); ``act`` defaults to SwiGLU on [gate | up]. With ``matmul``
    (x, expert's matrix) -> x W^T, gate_up and down are per-expert matrices of any kind (blocks). Returns
    [T, H] in x's dtype."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)  # [T k], choice c is token c // k
    order = torch.argsort(flat_ids, stable=True)  # [T k]: choices grouped by expert, tokens in order within
    counts = torch.bincount(flat_ids, minlength=len(gate_up)).tolist()  # the one host sync
    compute_dtype = torch.float32 if upcast else x.dtype
    xs = x.index_select(0, order // top_k).to(compute_dtype)  # [T k, H] gathered, sorted by expert
    ys = torch.empty_like(xs)  # [T k, H] each choice's expert output, same order
    act = SiluAndMul() if act is None else act
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        w13, w2 = gate_up[expert], down[expert]
        if matmul is not None:
            h = act(matmul(xs[start:end], w13).to(compute_dtype))
            ys[start:end] = matmul(h, w2)
            start = end
            continue
        if upcast:
            w13, w2 = w13.float(), w2.float()
        h = act(F.linear(xs[start:end], w13))  # [n, 2I] -> [n, I]
        ys[start:end] = F.linear(h, w2)  # [n, H] (F.linear: faster than mm on a transposed bf16 weight)
        start = end
    out = torch.empty_like(ys).index_copy_(0, order, ys)  # back in choice order: row c is token c // k's
    out = out.view(num_tokens, top_k, hidden).mul_(weights.to(out.dtype).unsqueeze(-1))
    return out.sum(dim=1).to(x.dtype)  # [T, H]


class FusedMoE(nn.Module):
    """The ``E`` SwiGLU experts of one sparse MLP, stacked; ``forward`` routes and computes them."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{num_experts} (got {top_k})")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw), requires_grad=False
        )  # [E, 2I, H]
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, **kw), requires_grad=False
        )  # [E, H, I]
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader
        self.upcast = matmul_in_fp32(dtype, torch.device(device))
        self.act_fn = SiluAndMul()
        # Block storage (use_blocks): the method and each expert's [2I, H] and [H, I] matrices.
        self.quant_method: Any = None
        self.qgate_up: list[Any] = []
        self.qdown: list[Any] = []

    def use_blocks(self, method: Any) -> None:
        """Hold every expert's matrices with ``method`` (a ``BlockQuantMethod``) instead of the dense stacks;
        the parameters stay, empty, as names to load into."""
        self.quant_method = method
        self.qgate_up = [
            method.empty(2 * self.intermediate_size, self.hidden_size) for _ in range(self.num_experts)
        ]
        self.qdown = [method.empty(self.hidden_size, self.intermediate_size) for _ in range(self.num_experts)]
        dtype = self.gate_up_proj.dtype
        for name in ("gate_up_proj", "down_proj"):
            param = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            param.weight_loader = self.weight_loader
            setattr(self, name, param)
        self.upcast = False

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The per-expert checkpoint names (Qwen spelling, which GGUF files are read as) of this layer."""
        kinds = ("gate_proj", "up_proj", "down_proj")
        return [f"{prefix}.{e}.{kind}.weight" for e in range(self.num_experts) for kind in kinds]

    def shards(self, param: nn.Parameter) -> list[tuple[int, str]]:
        """The per-expert pieces that fill ``param`` when a checkpoint stores experts one by one."""
        kinds = ("gate", "up") if param is self.gate_up_proj else ("down",)
        return [(e, kind) for e in range(self.num_experts) for kind in kinds]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: Hashable | None = None) -> None:
        """Load the whole stacked tensor (``shard_id`` None) or one expert's gate, up or down matrix
        (``shard_id = (expert, "gate" | "up" | "down")``)."""
        if shard_id is None:
            if self.quant_method is not None:  # a whole stack: expert by expert into blocks
                blocks = self.qdown if param is self.down_proj else self.qgate_up
                if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                    raise ValueError(
                        f"expected [{self.num_experts}, rows, cols] experts, got {tuple(loaded.shape)}"
                    )
                for e, block in enumerate(blocks):
                    self.quant_method.store(block, loaded[e], None)
                return
            load_dense(param, loaded, None)
            return
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (this layer has {self.num_experts} experts)")
        if kind not in EXPERT_SHARDS or (kind == "down") != (param is self.down_proj):
            raise ValueError(f"shard {kind!r} does not belong in this parameter")
        if self.quant_method is not None:
            blocks = self.qdown if kind == "down" else self.qgate_up
            rows = (
                None
                if kind == "down"
                else (0 if kind == "gate" else self.intermediate_size, self.intermediate_size)
            )
            self.quant_method.store(blocks[expert], loaded, rows)
            return
        target = param.data[expert]
        if kind != "down":
            size = self.intermediate_size
            target = target.narrow(0, 0 if kind == "gate" else size, size)
        if not isinstance(loaded, torch.Tensor):
            loaded = loaded.dequantize()
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H]."""
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        if self.quant_method is not None:
            m = self.quant_method.matmul
            return grouped_experts(x, self.qgate_up, self.qdown, weights, ids, act=self.act_fn, matmul=m)
        return grouped_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.upcast, self.act_fn)

    def extra_repr(self) -> str:
        blocks = f", blocks={self.quant_method.fmt}" if self.quant_method is not None else ""
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, renormalize={self.renormalize}{blocks}"
        )
