"""A step's decoder layers in one compiled call, for Llama-style models with block weights on CPU.

A small model's step spends much of its time outside the matmuls: some forty tensor ops and ten kernel calls
per layer, each a few microseconds of fixed cost (SmolLM2-135M: ~3 ms of a ~10 ms one-token step on one core,
and ~3 ms of a 100-token prefill). When every layer is the plain Llama layer with block-quantized projections,
the whole stack runs instead as one call into ``kernels/cpu_kernels.cpp`` (``run_layers``), which chains the
same kernels the layer-by-layer path calls, with the same roundings: the two paths give identical numbers
(``tests/model_executor/test_fused_layers.py``). Decode rows and prefill chunks alike: the attention kernel
takes every row as one query with its own causal length (``AttentionMetadata.query_rows``), as the layer path's
attention does. Anything else (batches large enough for the BLAS GEMM, biases, q/k norms, MoE, other norms or
activations, per-group KV metadata) takes the layer-by-layer path.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from tidellm.model_executor.forward_context import get_forward_context
from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.layers.activation import SiluAndMul
from tidellm.model_executor.layers.attention.sdpa_backend import paged_sdpa_attention
from tidellm.model_executor.layers.norm import RMSNorm
from tidellm.model_executor.quant import method as quant_method
from tidellm.platforms import cpu_has_native_bf16

logger = logging.getLogger(__name__)


def _blocks(linear: nn.Module) -> cpu_kernels.Blocks | None:
    """The layer's weight as kernel blocks, or None unless it is block-quantized without a bias."""
    method = getattr(linear, "linear_method", None)
    if not isinstance(method, quant_method.BlockQuantLinearMethod):
        return None
    if linear.bias is not None:
        return None
    return cpu_kernels.Blocks.of(linear.qweight, panels=method.block.int8)


class FusedLayers:
    """The eligible model's layers as kernel structs; ``run`` takes a step when the step allows it."""

    def __init__(
        self, model: nn.Module, layers: list[tuple[cpu_kernels.Layer, int]], fmts: set[str], int8: bool
    ) -> None:
        self._layers = layers  # (struct without its KV cache pointer, layer index)
        self._array: ctypes.Array | None = None
        self._kv_ptrs: tuple[int, ...] = ()
        first = model.layers[0]
        attn = first.self_attn
        self.hidden = first.input_layernorm.hidden_size
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.inter = first.mlp.down_proj.input_size
        self.eps = first.input_layernorm.eps
        self.scale = attn.attn.scale
        self.rotary_dim = model.rotary_emb.rotary_dim
        self.dtype = first.input_layernorm.weight.dtype
        # Batches above the block kernels' row limit go through the BLAS GEMM, which this path does not call.
        # bf16 on AVX-512 BF16 CPUs: the same vdpbf16ps rows as BlockQuantMethod.matmul (identical numbers).
        native = self.dtype == torch.bfloat16 and cpu_has_native_bf16()
        limits = quant_method.MAX_KERNEL_ROWS_BF16 if native else quant_method.MAX_KERNEL_ROWS
        self.max_rows = min(limits[f] for f in fmts)
        self.dot_min_rows = 0
        if native and cpu_kernels.has_bf16_dot():
            self.dot_min_rows = quant_method.MIN_DOT_ROWS
            self.max_rows = max(self.max_rows, quant_method.MAX_DOT_ROWS)
        # int8 activations: every matmul is the int8 kernel, whatever the batch (as BlockQuantMethod.matmul).
        self.int8 = int8
        if int8:
            self.max_rows = 1 << 30

    @classmethod
    def build(cls, model: nn.Module) -> FusedLayers | None:
        """For a LlamaModel whose every layer is eligible; None otherwise (the layer-by-layer path)."""
        from tidellm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

        if next(model.parameters()).device.type != "cpu" or not cpu_kernels.available():
            return None  # (on a GPU, without building the CPU kernels)
        layers: list[tuple[cpu_kernels.Layer, int]] = []
        fmts: set[str] = set()
        int8s: set[bool] = set()
        for idx, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (
                type(layer) is not LlamaDecoderLayer
                or type(attn) is not LlamaAttention
                or type(mlp) is not LlamaMLP
                or type(mlp.act_fn) is not SiluAndMul
                or any(type(n) is not RMSNorm for n in norms)
                or attn.q_norm is not None
                or attn.attn.backend is not paged_sdpa_attention
                or attn.attn.layer_idx != idx
                or norms[0].weight.device.type != "cpu"
                or norms[0].weight.dtype not in (torch.float32, torch.bfloat16)
            ):
                return None
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            blocks = [_blocks(lin) for lin in linears]
            if any(b is None for b in blocks):
                return None
            fmts.update(lin.qweight.fmt for lin in linears)
            int8s.update(lin.linear_method.block.int8 for lin in linears)
            window = attn.attn.sliding_window or 0
            struct = cpu_kernels.Layer(
                norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), *blocks, None, window
            )
            layers.append((struct, idx))
        if not layers or len(int8s) != 1:
            return None
        return cls(model, layers, fmts, int8s.pop())

    def _layer_array(self, kv_caches) -> ctypes.Array:
        """The layer structs with their KV caches (rebuilt only if the cache tensors change)."""
        ptrs = tuple(kv_caches[idx].data_ptr() for _, idx in self._layers)
        if self._array is None or ptrs != self._kv_ptrs:
            array = (cpu_kernels.Layer * len(self._layers))()
            for i, ((struct, _), ptr) in enumerate(zip(self._layers, ptrs, strict=True)):
                array[i] = struct
                array[i].kv = ptr
            self._array, self._kv_ptrs = array, ptrs
        return self._array

    def run(
        self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(layers' output, residual) for the step's rows, or None when the step is not one this path
        takes. ``hidden`` (the embedding output, owned) receives the output."""
        rows = hidden.shape[0]
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        d = meta.query_rows() if meta.prefills else meta.decode
        if (
            ctx.layer_metadata is not None
            or d is None
            or d.rows.shape[0] != rows  # a decode-only step's rows are then 0..rows-1
            or rows > self.max_rows
            or hidden.dtype != self.dtype
            or not hidden.is_contiguous()
        ):
            return None
        cos, sin = cos_sin
        if cos.dtype != self.dtype or sin.data_ptr() != cos.data_ptr() + cos.shape[-1] * cos.element_size():
            return None
        kv0 = ctx.kv_caches[self._layers[0][1]]
        if kv0.dtype != self.dtype or not kv0.is_contiguous():
            return None
        _, num_blocks, block_size, _, _ = kv0.shape
        residual = torch.empty_like(hidden)
        new = hidden.new_empty
        nqkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        scratch = (
            new(rows, self.hidden),
            new(rows, nqkv),
            new(rows, self.heads * self.head_dim),
            new(rows, 2 * self.inter),
            new(rows, self.inter),
        )
        table, seq_lens = d.block_table, d.seq_lens
        step = cpu_kernels.Step(
            rows, self.hidden, self.heads, self.kv_heads, self.head_dim, self.rotary_dim, self.inter, num_blocks,
            block_size, table.shape[1], self.dot_min_rows, int(self.int8), self.eps, self.scale, cos.data_ptr(), meta.slot_mapping.data_ptr(),
            table.data_ptr(), seq_lens.data_ptr(), d.rows.data_ptr(), *(t.data_ptr() for t in scratch),
        )  # fmt: skip
        cpu_kernels.run_layers(self._layer_array(ctx.kv_caches), step, hidden, residual, has_residual=False)
        return hidden, residual
