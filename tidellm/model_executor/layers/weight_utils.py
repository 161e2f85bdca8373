"""The loader every parameter without a special layout uses, and the pieces every model's ``load_weights``
shares: load one checkpoint tensor into a parameter (or one shard of it), and report what did not match."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy (and cast to the parameter's dtype/device) a whole tensor after checking its shape."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def load_into(param: nn.Parameter, name: str, tensor: torch.Tensor, shard: Hashable | None = None) -> None:
    """``tensor`` (checkpoint name ``name``) into ``param`` through its own loader, or one shard of it."""
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
    except ValueError as e:
        raise ValueError(f"Cannot load weight {name!r}: {e}") from None


def check_all_loaded(architecture: str, missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """ValueError naming every checkpoint weight the model still lacks and every one it has no place for."""
    missing, unexpected = sorted(set(missing)), sorted(unexpected)
    if missing or unexpected:
        parts = [f"missing weights: {missing}"] if missing else []
        parts += [f"unexpected weights: {unexpected}"] if unexpected else []
        raise ValueError(f"{architecture} checkpoint does not match the model: " + "; ".join(parts))


def load_named_weights(
    architecture: str,
    params: dict[str, nn.Parameter],
    expected: dict[tuple[str, Hashable], str],
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: Sequence[tuple[str, str, Hashable]],
    rename: Callable[[str], str | None] = lambda name: name,
) -> set[str]:
    """Stream checkpoint tensors into ``params``: ``rename`` maps a checkpoint name to ours (None: skip it),
    ``stacked`` entries (our fragment, checkpoint fragment, shard id) route a tensor to one shard of a merged
    parameter, and ``expected`` ((parameter, shard) -> checkpoint name) is what must arrive. Raises ValueError
    naming every missing or unexpected weight; returns the parameter names."""
    pending = dict(expected)
    unexpected: list[str] = []
    for name, tensor in weights:
        renamed = rename(name)
        if renamed is None:
            continue
        target, shard = renamed, None
        for ours, theirs, shard_id in stacked:
            if theirs in renamed:
                target, shard = renamed.replace(theirs, ours), shard_id
                break
        param = params.get(target)
        if param is None:
            unexpected.append(renamed)
            continue
        load_into(param, renamed, tensor, shard)
        pending.pop((target, shard), None)
    check_all_loaded(architecture, pending.values(), unexpected)
    return set(params)
