"""Linear layers whose weights load shard by shard, so q/k/v and gate/up run as one matmul each.

Every parameter carries a ``weight_loader(param, loaded, shard_id)``: the model's ``load_weights`` maps a
checkpoint name to (parameter, shard id) and the layer knows where that shard sits. Tensor parallelism
later slices its rank's part in the same loader.

How a weight is stored, loaded and multiplied is a ``LinearMethod``: the swap point for the weight-only
block-quantized linears (``model_executor/quant``), which keep their own storage behind the same
``weight`` parameter name so checkpoint loading is unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.platforms import cpu_has_native_bf16


def matmul_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """True where bf16/fp16 matmuls are emulated: CPUs without native bf16 (AVX-512 BF16 / AMX), where
    PyTorch's bf16 GEMM is 3-7x slower than fp32. There we upcast weight and input on the fly and round
    the output back; the result is the same (the bf16 GEMM accumulates in fp32 too), the weights stay in
    their small dtype, and the extra conversion costs little next to the GEMM."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return dtype == torch.float16 or not cpu_has_native_bf16()


class LinearMethod:
    """Creates a linear layer's weight parameters and applies them."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def load(self, layer: nn.Module, param: nn.Parameter, loaded, rows: tuple[int, int] | None) -> None:
        """Store checkpoint tensor ``loaded`` (a dense tensor, or a ``QuantizedTensor`` straight from a GGUF
        file) as the weight's rows ``rows = (offset, size)``, or as all of it when ``rows`` is None."""
        load_dense(param, loaded, rows)


def load_dense(param: nn.Parameter, loaded, rows: tuple[int, int] | None) -> None:
    """Copy (and cast) ``loaded`` into ``param`` or its rows ``(offset, size)``, widening blocks first."""
    if not isinstance(loaded, torch.Tensor):
        loaded = loaded.dequantize()
    target = param.data if rows is None else param.data.narrow(0, *rows)
    if tuple(loaded.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(target.shape)}")
    target.copy_(loaded)


class UnquantizedLinearMethod(LinearMethod):
    """A dense ``[output_size, input_size]`` weight in the model dtype (the checkpoint layout)."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        weight = torch.empty(output_size, input_size, dtype=dtype, device=device)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        layer.matmul_in_fp32 = matmul_in_fp32(dtype, device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.matmul_in_fp32:
            bias = None if bias is None else bias.float()
            return F.linear(x.float(), layer.weight.float(), bias).to(x.dtype)
        return F.linear(x, layer.weight, bias)  # [..., output_size]


class Linear(nn.Module):
    """``y = x W^T + b``; the output dimension may be a concatenation of shards (see subclasses)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        # shard id -> (offset, size) along the output dimension; empty for an unmerged layer.
        self.shard_offsets: dict[Hashable, tuple[int, int]] = {}
        self.dtype = dtype
        if bias:
            self.bias = nn.Parameter(
                torch.empty(output_size, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.set_linear_method(linear_method or UnquantizedLinearMethod(), device)

    def set_linear_method(self, method: LinearMethod, device: torch.device) -> None:
        """(Re)create the weight storage for ``method``; done before the weights are loaded."""
        self._parameters.pop("weight", None)
        self.linear_method = method
        method.create_weights(self, self.input_size, self.output_size, self.dtype, device)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: Hashable | None = None) -> None:
        """Copy (and cast) ``loaded`` into ``param``, or into the rows of shard ``shard_id``."""
        rows = None
        if shard_id is not None:
            if shard_id not in self.shard_offsets:
                raise ValueError(f"unknown shard id {shard_id!r} (this layer has {list(self.shard_offsets)})")
            rows = self.shard_offsets[shard_id]
        try:
            if param is self.bias:
                load_dense(param, loaded, rows)
            else:
                self.linear_method.load(self, param, loaded, rows)
        except ValueError as e:
            where = "" if shard_id is None else f" for shard {shard_id!r}"
            raise ValueError(f"{e}{where}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)  # [..., output_size]

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedColumnLinear(Linear):
    """Several projections of the same input stacked along the output: shard ``i`` is ``output_sizes[i]``
    rows (gate_up_proj: shards 0 = gate, 1 = up)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], **kwargs) -> None:
        super().__init__(input_size, sum(output_sizes), **kwargs)
        offset = 0
        for i, size in enumerate(output_sizes):
            self.shard_offsets[i] = (offset, size)
            offset += size


class QKVLinear(Linear):
    """q, k and v projections in one matmul: output ``[q (heads*head_dim) | k | v (kv_heads*head_dim each)]``,
    shard ids ``"q"``, ``"k"``, ``"v"``."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, **kwargs) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, **kwargs)
        self.shard_offsets.update(
            q=(0, self.q_size), k=(self.q_size, self.kv_size), v=(self.q_size + self.kv_size, self.kv_size)
        )
