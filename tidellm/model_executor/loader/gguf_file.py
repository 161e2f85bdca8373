"""A small GGUF reader: header, metadata and tensor table, with the file checked for truncation.

Why not ``gguf.GGUFReader``: it builds a numpy view for every field part, which takes seconds on large
vocabularies (262k tokens for Gemma 3), and on a truncated file it maps past the end or fails with
unrelated errors. Here metadata is parsed with ``struct`` in one pass, every read is bounds-checked, and
the tensor table is validated against the file size before any data is touched. Tensor data stays in a
read-only memory map; dequantization lives in ``gguf_weights``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tidellm.model_executor.loader.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format (scalars) and numpy dtype (arrays), little-endian.
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")),
    1: ("<b", np.dtype("<i1")),
    2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")),
    5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")),
    7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")),
    12: ("<d", np.dtype("<f8")),
}
_STRING, _ARRAY = 8, 9
# Sanity bounds so that a corrupt count fails fast instead of looping or allocating for ever.
_MAX_COUNT = 1 << 31
_MAX_DIMS = 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows first), i.e. GGUF's dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _truncated(self.path, f"metadata runs past the end of the file at byte {self.pos}")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > _MAX_COUNT:
                raise _corrupt(self.path, f"array of {count} elements")
            if etype == _STRING:
                return self._strings(count)
            if etype in _SCALARS:
                dtype = _SCALARS[etype][1]
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            return [self.value(etype) for _ in range(count)]
        raise _corrupt(self.path, f"unknown metadata value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        # The hot loop for vocabularies: plain slicing and int.from_bytes, no per-item struct calls.
        buf, pos, end = self.buf, self.pos, len(self.buf)
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise _truncated(self.path, "string array runs past the end of the file")
            n = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
            if pos + n > end:
                raise _truncated(self.path, "string array runs past the end of the file")
            append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def _truncated(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"GGUF file {path} is truncated or corrupt ({detail}). The download was probably interrupted: delete "
        "the file and fetch it again."
    )


def _corrupt(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"GGUF file {path} is corrupt ({detail}). Delete it and fetch it again, or check it is really a GGUF file."
    )


class GGUFFile:
    """Metadata and tensor table of one GGUF file; tensor bytes via ``raw(info)`` from a memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 24:
                    raise _truncated(self.path, f"only {size} bytes")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelLoadError(
                f"Cannot read GGUF file {self.path}: {e}. Check the path and its permissions."
            ) from e
        self.file_size = size
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        magic = self._map[:4]
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{self.path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r}). Pass a .gguf "
                "file, or a folder with config.json and safetensors weights."
            )
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise ModelLoadError(
                f"GGUF file {self.path} has version {self.version}{hint}; only versions 2 and 3 are supported. "
                "Re-convert it with a recent llama.cpp convert_hf_to_gguf.py."
            )
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise _corrupt(self.path, f"{n_tensors} tensors, {n_kv} metadata keys")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise _corrupt(self.path, f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise _corrupt(self.path, f"alignment {alignment}")
        data_start = -(-cur.pos // alignment) * alignment
        for name, dims, type_id, rel_offset in raw_infos:
            self.tensors[name] = self._tensor_info(name, dims, type_id, data_start + rel_offset)
        self.data_start = data_start
        end = max((t.offset + t.nbytes for t in self.tensors.values()), default=data_start)
        if end > self.file_size:
            raise _truncated(self.path, f"tensor data needs {end} bytes but the file has {self.file_size}")

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _corrupt(self.path, f"tensor {name!r} has unknown type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise _corrupt(self.path, f"tensor {name!r} row of {dims[0]} is not a multiple of {block}")
        return GGUFTensorInfo(
            name, qtype, tuple(int(d) for d in reversed(dims)), offset, n // block * type_size
        )

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view ``[*shape[:-1], row_bytes]`` into the map."""
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = info.shape[:-1]
        return flat.reshape(*rows, -1) if info.shape else flat

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
