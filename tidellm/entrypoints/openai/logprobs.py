"""Logprobs in the two OpenAI formats: the legacy completions one (parallel lists) and the chat one."""

from __future__ import annotations

from collections.abc import Sequence

from tidellm.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatLogprob,
    ChatLogprobContent,
    CompletionLogprobs,
)
from tidellm.outputs import Logprob
from tidellm.tokenizer.tokenizer import Tokenizer


def _token_str(lp: Logprob, token_id: int, tokenizer: Tokenizer) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` best alternatives by rank (1 = most likely)."""
    ranked = [(tid, lp) for tid, lp in entries.items() if lp.rank is not None and 1 <= lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank or 0)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob] | None],
    num_top: int,
    tokenizer: Tokenizer,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """Legacy format. ``top_logprobs`` holds the ``num_top`` best tokens plus the chosen one (as vLLM does);
    a ``None`` entry (the first prompt token under echo) has no logprob."""
    out = CompletionLogprobs()
    offset = text_offset
    for tid, entries in zip(token_ids, logprobs, strict=False):
        if entries is None or tid not in entries:
            tok = tokenizer.decode([tid], skip_special_tokens=False)
            out.tokens.append(tok)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = entries[tid]
            tok = _token_str(chosen, tid, tokenizer)
            out.tokens.append(tok)
            out.token_logprobs.append(max(chosen.logprob, -9999.0))
            top = {_token_str(lp, t, tokenizer): max(lp.logprob, -9999.0) for t, lp in _top(entries, num_top)}
            top.setdefault(tok, max(chosen.logprob, -9999.0))
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def chat_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob]],
    num_top: int,
    tokenizer: Tokenizer,
) -> ChatChoiceLogprobs:
    """Chat format: one entry per token with its bytes and its ``num_top`` best alternatives."""
    content = []
    for tid, entries in zip(token_ids, logprobs, strict=False):
        chosen = entries.get(tid)
        if chosen is None:
            continue
        tok = _token_str(chosen, tid, tokenizer)
        content.append(
            ChatLogprobContent(
                token=tok,
                logprob=max(chosen.logprob, -9999.0),
                bytes=list(tok.encode("utf-8", errors="replace")),
                top_logprobs=[
                    ChatLogprob(
                        token=(s := _token_str(lp, t, tokenizer)),
                        logprob=max(lp.logprob, -9999.0),
                        bytes=list(s.encode("utf-8", errors="replace")),
                    )
                    for t, lp in _top(entries, num_top)
                ],
            )
        )
    return ChatChoiceLogprobs(content=content)
