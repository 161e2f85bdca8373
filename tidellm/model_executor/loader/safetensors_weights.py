"""Weights of a Hugging Face folder: one ``model.safetensors`` or shards listed in its index.

Headers are read and checked up front (so a truncated download fails at start-up with a clear message,
not half-way through loading), parameter counts come from header shapes, and tensors are streamed one at
a time through ``safe_open`` in the checkpoint's own dtype.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from tidellm.model_executor.loader.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


def _corrupt(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"Safetensors file {path} is truncated or corrupt ({detail}). Delete it and download the model again."
    )


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file, validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise _corrupt(path, f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"Cannot read {path}: {e}. Check the path and its permissions.") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            entry["shape"] = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"bad entry for tensor {name!r}") from e
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise _corrupt(path, f"tensor data needs {8 + n + end} bytes but the file has {size}")
    return header


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in index order; ModelLoadError naming the fix if none."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is corrupt ({e}); download the model again.") from e
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"{folder} is missing weight shards {', '.join(missing)} listed in {INDEX_FILE}; the download "
                "is incomplete. Download the model again."
            )
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [folder / name for name in others]
    hint = " (found PyTorch .bin weights: only safetensors are read)" if any(folder.glob("*.bin")) else ""
    raise ModelLoadError(
        f"{folder} has no safetensors weights{hint}. Save the model with safetensors "
        "(transformers: model.save_pretrained(dir), the default) or pass a GGUF file."
    )


class SafetensorsWeights:
    """Streams the tensors of one or more safetensors files as (name, tensor)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.headers = {f: read_header(f) for f in files}

    def names(self) -> list[str]:
        return [name for header in self.headers.values() for name in header]

    def num_params(self) -> int:
        return sum(math.prod(e["shape"]) for h in self.headers.values() for e in h.values())

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        yield name, f.get_tensor(name)
            except Exception as e:
                if isinstance(e, ModelLoadError):
                    raise
                raise _corrupt(path, str(e)) from e
