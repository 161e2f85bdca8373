"""Block-quantized weight matrices: the two formats the CPU kernels run, and conversions into them.

``q4_1``: 4-bit codes with a scale and a minimum per 32 weights (5 bits a weight in GGUF, whose scales are
fp16; 6 here, where they are widened to fp32), value = d * q + m. ``q8_0``: int8 codes with a scale per 32
weights, value = d * q. Both are GGUF's layouts with the fp16 scales widened to fp32, so GGUF Q4_0, Q4_1 and
Q8_0 tensors convert without changing a single weight; anything else is re-quantized (round to nearest),
which does, with fp16-exact scales like GGUF's (the int8 kernel's panels keep them in fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType

BLOCK = 32
FORMATS = ("q4_1", "q8_0")
Q = GGMLQuantizationType
# GGUF types that convert exactly, and into which format.
EXACT_GGUF_FORMATS: dict[GGMLQuantizationType, str] = {Q.Q4_0: "q4_1", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0"}


@dataclass
class QuantizedTensor:
    """A [rows, cols] weight matrix in blocks of 32 along cols. ``m`` is None for q8_0."""

    fmt: str
    shape: tuple[int, int]
    q: torch.Tensor  # q4_1: [rows, cols/32, 16] uint8 (low nibbles: elements 0-15, high: 16-31); q8_0: int8 [rows, cols/32, 32]
    d: torch.Tensor  # [rows, cols/32] fp32
    m: torch.Tensor | None  # [rows, cols/32] fp32
    # The same weights repacked for the int8 (VNNI) kernel, built on first use by ``panels()``.
    _panels: Panels | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, fmt: str, rows: int, cols: int, device: torch.device | str = "cpu") -> QuantizedTensor:
        nb = cols // BLOCK
        if fmt == "q4_1":
            q = torch.empty(rows, nb, 16, dtype=torch.uint8, device=device)
            m = torch.empty(rows, nb, dtype=torch.float32, device=device)
        elif fmt == "q8_0":
            q, m = torch.empty(rows, nb, BLOCK, dtype=torch.int8, device=device), None
        else:
            raise ValueError(f"unknown block format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return cls(fmt, (rows, cols), q, torch.empty(rows, nb, dtype=torch.float32, device=device), m)

    @classmethod
    def from_gguf(
        cls, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
    ) -> QuantizedTensor:
        """GGUF Q4_0 / Q4_1 / Q8_0 bytes ``[rows, row_bytes]`` of a ``[rows, cols]`` tensor, unchanged in value."""
        rows, cols = shape
        nb = cols // BLOCK

        def f16(blocks: np.ndarray, at: int) -> torch.Tensor:
            v = np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)
            return torch.from_numpy(v.reshape(rows, nb))

        def codes(blocks: np.ndarray, at: int, size: int, dtype: type) -> torch.Tensor:
            return torch.from_numpy(
                np.ascontiguousarray(blocks[:, at : at + size]).view(dtype).reshape(rows, nb, size)
            )

        if qtype == Q.Q8_0:
            blocks = raw.reshape(-1, 34)
            return cls("q8_0", (rows, cols), codes(blocks, 2, 32, np.int8), f16(blocks, 0), None)
        if qtype == Q.Q4_1:
            blocks = raw.reshape(-1, 20)
            return cls("q4_1", (rows, cols), codes(blocks, 4, 16, np.uint8), f16(blocks, 0), f16(blocks, 2))
        if qtype == Q.Q4_0:  # d * (q - 8) == d * q + (-8 d)
            blocks = raw.reshape(-1, 18)
            d = f16(blocks, 0)
            return cls("q4_1", (rows, cols), codes(blocks, 2, 16, np.uint8), d, d * -8.0)
        raise ValueError(f"GGUF type {qtype.name} has no exact block format here")

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str) -> QuantizedTensor:
        """Round-to-nearest quantization of a dense [rows, cols] matrix (cols % 32 == 0), with scales and
        minimums in fp16 as GGUF stores them (a q4_1 minimum rounded down and its scale up, so that the codes
        still span the block)."""
        rows, cols = w.shape
        b = w.detach().float().cpu().reshape(rows, cols // BLOCK, BLOCK)

        def f16(t: torch.Tensor, toward: float | None = None) -> torch.Tensor:
            h = t.half()
            if toward is not None:  # the next fp16 toward ``toward`` where rounding went the other way
                past = h.float() < t if toward > 0 else h.float() > t
                h = torch.where(past, torch.nextafter(h, torch.full_like(h, toward)), h)
            return h.float()

        if fmt == "q8_0":
            d = f16(b.abs().amax(-1) / 127.0)
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            q = torch.round(b * inv[..., None]).clamp_(-127, 127).to(torch.int8)
            return cls(fmt, (rows, cols), q.contiguous(), d.contiguous(), None)
        if fmt == "q4_1":
            lo, hi = f16(b.amin(-1), -math.inf), b.amax(-1)
            d = f16((hi - lo) / 15.0, math.inf)
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            q = torch.round((b - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
            packed = q[..., :16] | (q[..., 16:] << 4)
            return cls(fmt, (rows, cols), packed.contiguous(), d.contiguous(), lo.contiguous())
        raise ValueError(f"unknown block format {fmt!r}; expected one of {', '.join(FORMATS)}")

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 [rows, cols] matrix (reference path; the kernels never build it for small batches)."""
        rows, cols = self.shape
        if self.fmt == "q8_0":
            return (self.q.float() * self.d[..., None]).reshape(rows, cols)
        q = torch.cat([self.q & 0x0F, self.q >> 4], dim=-1).float()
        return (q * self.d[..., None] + self.m[..., None]).reshape(rows, cols)

    def rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The rows ``index`` (a permutation or a selection), as a new tensor."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return QuantizedTensor(
            self.fmt, (len(index), self.shape[1]), pick(self.q), pick(self.d), pick(self.m)
        )

    def copy_rows_(self, offset: int, src: QuantizedTensor) -> None:
        """Write ``src`` into rows [offset, offset + src rows) (a shard of a merged projection)."""
        if src.fmt != self.fmt or src.shape[1] != self.shape[1]:
            raise ValueError(
                f"cannot copy a {src.fmt} {src.shape} shard into a {self.fmt} {self.shape} weight"
            )
        n = src.shape[0]
        self._panels = None
        self.q[offset : offset + n].copy_(src.q)
        self.d[offset : offset + n].copy_(src.d)
        if self.m is not None:
            self.m[offset : offset + n].copy_(src.m)

    def panels(self) -> Panels:
        """The weights in 16-row panels for the int8 kernel (cached: built once, ~the size of the blocks)."""
        if self._panels is None:
            self._panels = Panels.of(self)
        return self._panels

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


@dataclass
class Panels:
    """A block matrix regrouped for vpdpbusd (layout in ``cpu_kernels.cpp``, at ``gemm_i8``): per panel of 16
    rows and block of 32 columns, the 16 rows' codes interleaved 4 bytes at a time (q4_1: 256 bytes, q8_0:
    512), their scales as [panels, blocks, 16] fp16, and the q4_1 minimums (fp16) or the q8_0 per-block code
    sums (int16) likewise. Rows are padded to a multiple of 16 with zero weights. Scales that are not
    fp16-exact (GGUF's and ``QuantizedTensor.quantize``'s are) would be rounded here."""

    q: torch.Tensor  # uint8 [panels, blocks, 256 | 512]
    d: torch.Tensor  # fp16 [panels, blocks, 16]
    extra: torch.Tensor  # q4_1: fp16 minimums; q8_0: int16 code sums; [panels, blocks, 16]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.extra))

    @classmethod
    def of(cls, w: QuantizedTensor) -> Panels:
        rows, cols = w.shape
        nb, panels = cols // BLOCK, -(-rows // 16)
        pad = panels * 16 - rows

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [rows, nb, ...] -> [panels, 16, nb, ...], zero-padded
            if pad:
                t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
            return t.reshape(panels, 16, *t.shape[1:])

        width = 16 if w.fmt == "q4_1" else 32  # code bytes per row and block
        codes = grouped(w.q.view(torch.uint8)).reshape(panels, 16, nb, width // 4, 4)
        q = codes.permute(0, 2, 3, 1, 4).reshape(panels, nb, 16 * width).contiguous()
        d = grouped(w.d.half()).transpose(1, 2).contiguous()
        if w.fmt == "q4_1":
            extra = grouped(w.m.half()).transpose(1, 2).contiguous()
        else:  # a block's code sum fits int16 (|sum| <= 32 * 127)
            extra = grouped(w.q.sum(-1, dtype=torch.int32).to(torch.int16)).transpose(1, 2).contiguous()
        return cls(q, d, extra)
