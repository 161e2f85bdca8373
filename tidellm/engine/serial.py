"""The wire format between the API process and the engine-core process: msgspec msgpack, never pickle.

A message is two ZMQ frames: a one-word kind and a msgpack payload whose type the kind fixes, so the
receiver decodes into typed structs (and ``SamplingParams`` re-runs its validation on decode). Pickle is
never used: a peer on the socket could otherwise run code in our process.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tidellm.engine.protocol import EngineCoreOutputs, EngineCoreRequest

# API process → engine core
ADD = b"ADD"  # payload: list[EngineCoreRequest] (the n children of one user request travel together)
ABORT = b"ABORT"  # payload: list[str] of request ids
SHUTDOWN = b"SHUTDOWN"  # payload: empty; finish the current step, exit 0

# engine core → API process
READY = b"READY"  # payload: EngineReady, once after start-up
OUTPUTS = b"OUTPUTS"  # payload: EngineCoreOutputs, one per step
ERROR = b"ERROR"  # payload: EngineError; the engine exits after sending it


class EngineReady(msgspec.Struct):
    """The start-up handshake: what the API process needs to know about the loaded engine."""

    pid: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    kv_cache_bytes: int
    model_description: str
    dtype: str
    device: str
    startup_seconds: float

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


class EngineError(msgspec.Struct):
    """A fatal error in the engine process (start-up failure or a crash in ``step``)."""

    message: str
    during_startup: bool = False


_INPUT_TYPES: dict[bytes, Any] = {ADD: list[EngineCoreRequest], ABORT: list[str], SHUTDOWN: None}
_OUTPUT_TYPES: dict[bytes, Any] = {READY: EngineReady, OUTPUTS: EngineCoreOutputs, ERROR: EngineError}


class MessageCodec:
    """Encodes and decodes the framed messages of one direction (``inputs`` or ``outputs``)."""

    def __init__(self, types: dict[bytes, Any]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {k: msgspec.msgpack.Decoder(t) for k, t in types.items() if t is not None}
        self._kinds = frozenset(types)

    def encode(self, kind: bytes, payload: Any = None) -> list[bytes]:
        if kind not in self._kinds:
            raise ValueError(f"unknown message kind {kind!r}")
        return [kind, b"" if payload is None else self._encoder.encode(payload)]

    def decode(self, frames: list[bytes]) -> tuple[bytes, Any]:
        if len(frames) != 2 or frames[0] not in self._kinds:
            raise ValueError(f"malformed message: {[bytes(f[:16]) for f in frames]!r}")
        kind, payload = bytes(frames[0]), frames[1]
        decoder = self._decoders.get(kind)
        return kind, (decoder.decode(payload) if decoder is not None else None)


def input_codec() -> MessageCodec:
    """Messages the API process sends to the engine core."""
    return MessageCodec(_INPUT_TYPES)


def output_codec() -> MessageCodec:
    """Messages the engine core sends back."""
    return MessageCodec(_OUTPUT_TYPES)


def encode_config(config: Any) -> bytes:
    """An ``EngineConfig`` (nested dataclasses) as JSON, to hand to the engine process on its command line."""
    return msgspec.json.encode(config)


def decode_config(data: bytes | str, config_type: type) -> Any:
    return msgspec.json.decode(data, type=config_type)
