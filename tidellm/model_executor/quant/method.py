"""Which weights to hold as blocks, and the layer methods that store and multiply them.

``--quantization`` (``ModelConfig.quantization``):
- ``auto`` (default): on CPU, keep GGUF tensors that are Q4_0, Q4_1 or Q8_0 as blocks. No weight changes
  value, so outputs match the dense fp32 model up to summation order; everything else stays dense.
- ``none``: dense weights in the model dtype everywhere (the reference path).
- ``q8_0`` / ``q4_1``: every linear and the embedding as blocks, re-quantizing what is not already in that
  format (round to nearest): smaller and faster, with a quality cost measured in docs/performance.md.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.config.engine import ACTIVATION_QUANTIZATION_CHOICES, QUANTIZATION_CHOICES
from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.layers.embedding import LMHead, VocabEmbedding
from tidellm.model_executor.layers.fused_moe import FusedMoE
from tidellm.model_executor.layers.linear import Linear, LinearMethod
from tidellm.model_executor.quant.blocks import BLOCK, EXACT_GGUF_FORMATS, FORMATS, QuantizedTensor
from tidellm.platforms import cpu_has_native_bf16

logger = logging.getLogger(__name__)

# Batches up to this many rows run through the block kernel; larger ones widen the weight into a shared
# scratch buffer and use the BLAS GEMM, which wins once the matmul is compute-bound. Crossovers measured on
# the model's own layers on a 2-core AVX2 machine: ~56 rows for Q4_1 (whose widening costs more), above 128
# for the Q8_0 LM head. Widened to bf16 on a CPU with native bf16 GEMMs (4x its fp32 GEMM on a 2-core AVX-512
# BF16 machine), the GEMM wins from about 12 rows for both formats.
MAX_KERNEL_ROWS = {"q4_1": 48, "q8_0": 128}
MAX_KERNEL_ROWS_BF16 = {"q4_1": 12, "q8_0": 12}
# bf16 activations where the kernels have AVX-512 BF16: from MIN_DOT_ROWS to MAX_DOT_ROWS rows the weights are
# rounded to bf16 block by block and multiplied with vdpbf16ps (no widened copy). Two cores, a SmolLM2 layer's
# four linears in Q4_1 (vdpbf16ps / fp32 kernel / widen + bf16 GEMM): 4 rows 0.15 / 0.19 / 0.38 ms, 16 rows
# 0.37 / 0.82 / 0.56, 32 rows 0.68 / 1.61 / 0.83, 64 rows 1.27 / 3.18 / 1.37; 1-3 rows stay on the fp32 kernel
# (faster at one row, and it keeps the weights exact).
MIN_DOT_ROWS = 4
MAX_DOT_ROWS = 64
# Largest widened slice (fp32 elements): 8 MiB, so it is still in the last-level cache when the GEMM reads it.
SCRATCH_FLOATS = 2 * 2**20


class DenseScratch:
    """One buffer per dtype shared by every block layer of a model for its widened weight (layers run one
    after another, so one is enough)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < rows * cols:
            buf = self._bufs[dtype] = torch.empty(rows * cols, dtype=dtype)
        return buf[: rows * cols].view(rows, cols)


class BlockQuantMethod:
    """Stores and multiplies one block format."""

    def __init__(self, fmt: str, scratch: DenseScratch, int8: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown block format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.scratch = scratch
        self.int8 = int8  # activations quantized to int8 per block, int8 dot products (see int8_activations)

    def empty(self, rows: int, cols: int) -> QuantizedTensor:
        return QuantizedTensor.empty(self.fmt, rows, cols)

    def store(self, target: QuantizedTensor, loaded, rows: tuple[int, int] | None) -> None:
        """Write checkpoint tensor ``loaded`` (dense, or blocks from a GGUF file) into ``target``'s rows."""
        offset, size = (0, target.shape[0]) if rows is None else rows
        if isinstance(loaded, QuantizedTensor) and loaded.fmt != self.fmt:
            loaded = loaded.dequantize()
        if isinstance(loaded, torch.Tensor):
            if loaded.dim() != 2:
                raise ValueError(f"expected a 2-D weight, got shape {tuple(loaded.shape)}")
            loaded = QuantizedTensor.quantize(loaded, self.fmt)
        if loaded.shape != (size, target.shape[1]):
            raise ValueError(f"checkpoint shape {loaded.shape} != expected {(size, target.shape[1])}")
        target.copy_rows_(offset, loaded)

    def matmul(self, x: torch.Tensor, w: QuantizedTensor, fp32_out: bool = False) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N]. With int8 activations: the VNNI kernel for every batch size. Else small
        batches: the block kernel (fp32 math), the result in x's dtype
        (fp32 or bf16, rounded once), or fp32 with ``fp32_out``; bf16 batches of MIN_DOT_ROWS..MAX_DOT_ROWS
        rows on AVX-512 BF16 CPUs: vdpbf16ps on bf16-rounded weights (the result likewise in bf16 or, with
        ``fp32_out``, fp32). Larger ones: the GEMM on weights widened to fp32, or to bf16 when x is bf16 and
        the CPU multiplies bf16 natively (about 4x the fp32 GEMM on AVX-512 BF16 machines)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.int8 and x2.dtype in (torch.float32, torch.bfloat16):
            out_dtype = torch.float32 if fp32_out else x2.dtype
            return cpu_kernels.matmul_i8(x2.contiguous(), w, out_dtype).view(*lead, w.shape[0])
        bf16 = x2.dtype == torch.bfloat16 and cpu_has_native_bf16()
        if bf16 and MIN_DOT_ROWS <= x2.shape[0] <= MAX_DOT_ROWS and cpu_kernels.has_bf16_dot():
            out_dtype = torch.float32 if fp32_out else torch.bfloat16
            y = cpu_kernels.matmul_bf16_dot(x2.contiguous(), w.q, w.d, w.m, out_dtype)
            return y.view(*lead, w.shape[0])
        if x2.shape[0] <= (MAX_KERNEL_ROWS_BF16 if bf16 else MAX_KERNEL_ROWS)[w.fmt]:
            if fp32_out or x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            return cpu_kernels.matmul(x2.contiguous(), w.q, w.d, w.m).view(*lead, w.shape[0])
        dtype = torch.bfloat16 if bf16 else torch.float32
        x2 = x2.to(dtype)
        rows, cols = w.shape
        chunk = max(1, SCRATCH_FLOATS // cols)
        if chunk >= rows:
            y = F.linear(x2, cpu_kernels.dequantize(w.q, w.d, w.m, self.scratch.get(rows, cols, dtype)))
            return y.view(*lead, rows)
        y = torch.empty(x2.shape[0], rows, dtype=dtype)
        for s in range(0, rows, chunk):  # the LM head: widen a cache-sized slice of rows at a time
            e = min(rows, s + chunk)
            part = w.q[s:e], w.d[s:e], None if w.m is None else w.m[s:e]
            y[:, s:e] = F.linear(x2, cpu_kernels.dequantize(*part, self.scratch.get(e - s, cols, dtype)))
        return y.view(*lead, rows)


class BlockQuantLinearMethod(LinearMethod):
    """A linear layer's weight as blocks (``layer.qweight``); ``layer.weight`` stays as an empty parameter
    so checkpoint names keep pointing at it."""

    def __init__(self, block: BlockQuantMethod) -> None:
        self.block = block

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        layer.qweight = self.block.empty(output_size, input_size)
        layer.register_parameter("weight", nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))

    def load(self, layer: nn.Module, param: nn.Parameter, loaded, rows: tuple[int, int] | None) -> None:
        self.block.store(layer.qweight, loaded, rows)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return self.block.matmul(x, layer.qweight).to(x.dtype)
        y = self.block.matmul(x, layer.qweight, fp32_out=True)  # the bias is added before rounding
        y += bias
        return y.to(x.dtype)


def plan_quantization(method: str, source, device: torch.device) -> tuple[dict[str, str], str | None]:
    """(checkpoint weight name -> block format, format for every other eligible weight or None).

    Empty when the method is ``none``, the device is not a CPU, or the kernels cannot be built here."""
    if method not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} (got {method!r}).")
    if method == "none" or device.type != "cpu":
        if method not in ("none", "auto"):
            raise ValueError(
                f"quantization={method!r} runs on CPU only; use quantization='none' on {device}."
            )
        return {}, None
    if not cpu_kernels.available():
        if method != "auto":
            raise ValueError(
                f"quantization={method!r} needs the CPU block kernels, which cannot be built here (see the "
                "warning above); install a C++ compiler or use quantization='none'."
            )
        return {}, None
    if method == "auto":
        types = source.weights.gguf_types() if source.format == "gguf" else {}
        return {name: EXACT_GGUF_FORMATS[t] for name, t in types.items() if t in EXACT_GGUF_FORMATS}, None
    return {}, method


def int8_activations(setting: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether block matmuls quantize their activations to int8 (``--activation-quantization``).

    ``auto``: where the CPU has AVX-512 VNNI and the model runs in bf16 (already the reduced-precision mode;
    fp32 stays exact). ``int8``: also in fp32; an error without the kernel. ``none``: never."""
    if setting not in ACTIVATION_QUANTIZATION_CHOICES:
        raise ValueError(
            f"activation_quantization must be one of {', '.join(ACTIVATION_QUANTIZATION_CHOICES)} "
            f"(got {setting!r})."
        )
    if setting == "none" or device.type != "cpu":
        return False
    has = cpu_kernels.available() and cpu_kernels.has_vnni()
    if setting == "int8" and not has:
        raise ValueError(
            "activation_quantization='int8' needs the CPU kernels built for a CPU with AVX-512 VNNI, which "
            "this machine lacks; use activation_quantization='none' (or 'auto')."
        )
    return has and (setting == "int8" or dtype == torch.bfloat16)


def apply_quantization(
    model: nn.Module, plan: dict[str, str], default: str | None, int8: bool = False
) -> set[str]:
    """Swap the layers whose checkpoint weights the plan covers to block storage (before loading); with
    ``int8``, their matmuls take int8 activations.

    A merged layer (qkv, gate_up) is converted only when all its shards agree on a format. Returns the
    checkpoint names that should be streamed as blocks when the file has them."""
    scratch = DenseScratch()
    methods: dict[str, BlockQuantMethod] = {}
    stacked = getattr(model, "stacked_params", [])
    kept: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Linear):
            names = _checkpoint_names(prefix, module, stacked)
        elif isinstance(module, VocabEmbedding) or (isinstance(module, LMHead) and not module.tied):
            names = [f"{prefix}.weight"]
        elif isinstance(module, FusedMoE):
            names = module.checkpoint_names(prefix)
        else:
            continue
        fmts = {plan.get(n, default) for n in names}
        if len(fmts) != 1 or None in fmts or any(size % BLOCK for size in module_input_sizes(module)):
            continue
        fmt = fmts.pop()
        block = methods.setdefault(fmt, BlockQuantMethod(fmt, scratch, int8))
        if isinstance(module, Linear):
            module.set_linear_method(BlockQuantLinearMethod(block), torch.device("cpu"))
        else:
            module.use_blocks(block)
        kept.update(names)
    if kept:
        logger.info(
            "Weights held as blocks: %d checkpoint tensors (%s)%s", len(kept), ", ".join(sorted(methods)),
            "; activations in int8 (VNNI)" if int8 else "",
        )  # fmt: skip
    return kept


def build_int8_panels(model: nn.Module) -> int:
    """Repack every block weight whose matmuls take int8 activations into the int8 kernel's panels (at load:
    they would otherwise be built in the first request); their bytes. MoE experts build theirs on first use."""
    total = 0
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        block = (
            method.block
            if isinstance(method, BlockQuantLinearMethod)
            else getattr(module, "quant_method", None)
        )
        w = getattr(module, "qweight", None)
        if isinstance(block, BlockQuantMethod) and block.int8 and isinstance(w, QuantizedTensor):
            total += w.panels().nbytes
    return total


def module_input_sizes(module: nn.Module) -> tuple[int, ...]:
    """The row lengths of the module's matrices (each must be whole blocks)."""
    if isinstance(module, Linear):
        return (module.input_size,)
    if isinstance(module, FusedMoE):
        return (module.hidden_size, module.intermediate_size)
    return (module.hidden_size,)


def _checkpoint_names(prefix: str, layer: Linear, stacked: list) -> list[str]:
    """The checkpoint tensors that load into ``layer`` (one per shard of a merged projection)."""
    own = f"{prefix}.weight"
    if not layer.shard_offsets:
        return [own]
    names = []
    for shard in layer.shard_offsets:
        for ours, theirs, shard_id in stacked:
            if shard_id == shard and ours in f"{prefix}.":
                names.append(own.replace(ours, theirs))
                break
    return names
