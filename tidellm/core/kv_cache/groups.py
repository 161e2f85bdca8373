"""How a model's attention layers share the paged KV cache: groups of layers with one block table each.

A model whose layers all attend the same way (full context, or one sliding window) is one group: a block id
addresses a slot of every layer. A model that mixes sliding-window and full-attention layers (Gemma 3: five
local layers to one global) would waste most of its cache if one block table served both, since the local
layers only ever read their last ``window`` positions. Such a model is split into groups of ``num_slots``
layers of one kind each (padded where a kind's layer count is not a multiple); each group has its own block
table, and the ``num_slots`` cache tensors are shared by the groups: layer ``i`` of every group lives in
tensor ``i``. One pool of block ids serves all groups, so memory goes where the requests need it, and a
sliding group hands back blocks behind its window as the request advances.
"""

from __future__ import annotations

from dataclasses import dataclass


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheGroups:
    """Which layers share a block table (a group) and which cache tensor (a slot) each layer uses."""

    windows: tuple[int | None, ...]  # per group: the sliding window of its layers, None for full attention
    layers: tuple[tuple[int, ...], ...]  # per group: its layer indices, in order
    num_slots: int  # cache tensors; a block id addresses one slot of each

    @classmethod
    def from_layer_windows(cls, layer_windows: list[int | None]) -> KVCacheGroups:
        """Group layers by window. One kind → one group of all layers; several → groups of
        ``min(count per kind)`` layers, so the smallest kind fills one group and none is padded much."""
        if not layer_windows:
            raise ValueError("a model with a KV cache needs at least one attention layer")
        kinds: dict[int | None, list[int]] = {}
        for idx, window in enumerate(layer_windows):
            kinds.setdefault(window, []).append(idx)
        if len(kinds) == 1:
            ((window, layers),) = kinds.items()
            return cls((window,), (tuple(layers),), len(layers))
        size = min(len(v) for v in kinds.values())
        windows: list[int | None] = []
        groups: list[tuple[int, ...]] = []
        # Full-attention groups first, then sliding ones from the widest window down (a stable order).
        for window in sorted(kinds, key=lambda w: (w is not None, -(w or 0))):
            members = kinds[window]
            for start in range(0, len(members), size):
                windows.append(window)
                groups.append(tuple(members[start : start + size]))
        return cls(tuple(windows), tuple(groups), size)

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_layers(self) -> int:
        return sum(len(g) for g in self.layers)

    def layer_group(self) -> list[int]:
        """Group of each layer, by layer index."""
        out = [0] * self.num_layers
        for g, members in enumerate(self.layers):
            for layer in members:
                out[layer] = g
        return out

    def layer_slot(self) -> list[int]:
        """Cache tensor of each layer, by layer index."""
        out = [0] * self.num_layers
        for members in self.layers:
            for slot, layer in enumerate(members):
                out[layer] = slot
        return out

    def blocks_for_tokens(self, num_tokens: int, block_size: int, chunk_tokens: int = 1) -> int:
        """Blocks one sequence of ``num_tokens`` holds at most, computing ``chunk_tokens`` per step: all of
        them in a full group; in a sliding group the window of the step's first query plus the chunk."""
        full = _cdiv(num_tokens, block_size)
        return sum(
            full if w is None else min(full, _cdiv(w - 1 + chunk_tokens, block_size) + 1)
            for w in self.windows
        )

    def describe(self) -> str:
        if self.num_groups == 1:
            w = self.windows[0]
            return "" if w is None else f"sliding window {w} on every layer"
        kinds: dict[int | None, int] = {}
        for w in self.windows:
            kinds[w] = kinds.get(w, 0) + 1
        parts = [f"{n} {'full' if w is None else f'window-{w}'}" for w, n in kinds.items()]
        return f"{self.num_groups} groups of {self.num_slots} layers ({', '.join(parts)})"
