"""Chained block hashes for prefix caching.

A block's hash covers its parent's hash, its tokens and any extra keys (cache salt, later LoRA id), so
equal hashes mean equal prefixes. We hash bytes with SHA-256 rather than Python's ``hash()`` so that the
value is the same in every process (a data-parallel router can route by prefix).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block_tokens(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[object, ...] | None = None
) -> BlockHash:
    h = hashlib.sha256(parent or b"\0")
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()[:16]
