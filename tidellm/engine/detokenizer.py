"""Incremental detokenization with stop strings, one instance per request (API process).

Each step decodes only a short window of ids: a few already-emitted tokens for context (``prefix_offset`` to
``read_offset``) plus the tokens not yet emitted. The new text is the window's text minus the context's text,
so decoder rules that depend on position (SentencePiece's "strip the first leading space", the GPT-2 byte map
across token boundaries) see the same neighbours as a full ``decode`` would. Text is *committed* (appended to
``output_text``) only at points where no later token can change it:

* byte-level BPE: the window text must not end in U+FFFD (a multi-byte character split across tokens);
* SentencePiece byte fallback: the last token must not be a ``<0xNN>`` byte token, because the ``ByteFallback``
  decoder turns a whole run of byte tokens into U+FFFDs when the run is invalid UTF-8 as a whole, even bytes
  that already formed a valid character. Holding the open run keeps our text equal to ``decode()`` (at the cost
  of emitting byte-fallback characters one token later).

Stop strings are searched in committed + pending text (pending text is what ``decode()`` gives for the ids so
far; once a stop string matches, the request ends there, so pending text is then final).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence

from tidellm.tokenizer.tokenizer import Tokenizer

# Visible prompt tokens decoded in front of the first output tokens, for leading-space context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _TextBuffer:
    """Append-mostly text kept as pieces, so per-token appends and tail reads cost O(new text), not O(all)."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._ends: list[int] = []  # cumulative end offset of each piece

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def append(self, text: str) -> None:
        if text:
            self._ends.append(len(self) + len(text))
            self._pieces.append(text)

    def slice_from(self, start: int) -> str:
        """``text[start:]`` (``start`` is expected to be near the end)."""
        i = bisect_right(self._ends, start)
        if i == len(self._pieces):
            return ""
        piece_start = self._ends[i] - len(self._pieces[i])
        return self._pieces[i][start - piece_start :] + "".join(self._pieces[i + 1 :])

    def truncate(self, size: int) -> None:
        while self._ends and self._ends[-1] - len(self._pieces[-1]) >= size:
            self._ends.pop()
            self._pieces.pop()
        if self._ends and self._ends[-1] > size:
            keep = size - (self._ends[-1] - len(self._pieces[-1]))
            self._pieces[-1] = self._pieces[-1][:keep]
            self._ends[-1] = size

    def value(self) -> str:
        if len(self._pieces) > 1:  # collapse so that repeated reads are cheap
            text = "".join(self._pieces)
            self._pieces, self._ends = [text], [len(text)]
        return self._pieces[0] if self._pieces else ""


class IncrementalDetokenizer:
    """Turns one request's generated ids into text as they arrive, and applies its stop strings.

    ``update`` feeds new ids; ``get_next_output_text`` hands out text for the client. The streamed deltas
    concatenate to ``output_text``, which equals ``tokenizer.decode(prompt + output)`` minus the prompt's own
    text (for byte-level BPE that is just ``decode(output)``; for SentencePiece it keeps the first token's
    leading space that ``decode(output)`` alone would strip), until a stop string truncates it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop: list[str] = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_token_ids: list[int] = []

        self._backend = tokenizer.backend
        self._special_ids = tokenizer.all_special_ids
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # While streaming, hold back chars that may turn out to be the start of a stop string.
        self._hold_back = self._max_stop_len - 1 if self.stop and not include_stop_str_in_output else 0
        decoder = self._backend.decoder
        self._byte_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
        # Only without skipping: the raw text of an added token that directly follows another one, without
        # any separator the decoder would put between tokens (WordPiece-style decoders add spaces).
        self._added_tokens: dict[int, str] = {}
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added_tokens = {i: t.content for i, t in self._backend.get_added_tokens_decoder().items()}
        self._prev_added = False

        self._text = _TextBuffer()  # committed text
        self._pending = ""  # text of ids after read_offset: decoded but not final yet
        self._sent = 0  # chars of committed text handed out in delta mode
        self._open_byte_run = False  # last visible token is a <0xNN> byte token (byte fallback only)
        self._finished = False

        # The window ids: a few prompt tokens for context, then every decoded output id.
        start, visible = len(prompt_token_ids), 0
        while start > 0 and (
            visible < _PROMPT_CONTEXT_TOKENS or self._is_byte_token(prompt_token_ids[start])
        ):
            start -= 1
            visible += not self._is_skipped(prompt_token_ids[start])
        self._ids: list[int] = list(prompt_token_ids[start:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    # ---------------------------------------------------------------- public API
    @property
    def output_text(self) -> str:
        """Committed text so far (after stop truncation); excludes a trailing incomplete character."""
        return self._text.value()

    @property
    def finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Append new ids; return the stop string that ended the request, or None.

        ``stop_terminated``: the engine already finished the request on the last id (eos or a stop token id).
        Like a stop string, that token's text is left out unless ``include_stop_str_in_output``. When a stop
        string matches, ids after the one that completed it are dropped from ``output_token_ids``.
        """
        if self._finished or not new_token_ids:
            return None
        n_decode = len(new_token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            n_decode -= 1
        for i in range(n_decode):
            self.output_token_ids.append(new_token_ids[i])
            stop_str = self._step(new_token_ids[i])
            if stop_str is not None:
                self._finished = True
                return stop_str
        self.output_token_ids.extend(new_token_ids[n_decode:])
        if stop_terminated:
            self._finish()
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for the client: the new part (``delta``) or all of it.

        Until ``finished``, the last ``len(longest stop) - 1`` chars stay back, so a stop string that is
        completed by a later token is never partly streamed. ``finished`` also commits pending text (e.g. an
        incomplete character at a length limit, which ``decode()`` shows as U+FFFD). Once a stop string
        matched nothing is held back any more.
        """
        if finished or self._finished:  # the latter: a stop string already ended the request
            self._finish()
        end = len(self._text) - (0 if self._finished else self._hold_back)
        if not delta:
            return self._text.value()[: max(end, 0)]
        if end <= self._sent:
            return ""
        text = self._text.slice_from(self._sent)[: end - self._sent]
        self._sent = end
        return text

    # ---------------------------------------------------------------- internals
    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _is_skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self._special_ids

    def _is_byte_token(self, token_id: int) -> bool:
        if not self._byte_fallback:
            return False
        token = self._backend.id_to_token(token_id)
        return token is not None and len(token) == 6 and _BYTE_TOKEN.fullmatch(token) is not None

    def _step(self, token_id: int) -> str | None:
        """Decode one more id; commit what became final; return a matched stop string."""
        ids = self._ids
        ids.append(token_id)
        if self._byte_fallback and not self._is_skipped(token_id):
            self._open_byte_run = self._is_byte_token(token_id)
        text = self._decode(ids[self._prefix_offset :])
        if not text.startswith(self._prefix_text):
            # The decoder re-read the context (a prompt given as ids that ends inside a character): go on
            # without context rather than emit a garbled diff.
            self._prefix_offset, self._prefix_text = self._read_offset, ""
            text = self._decode(ids[self._read_offset :])
        new_text = text[len(self._prefix_text) :]
        if self._added_tokens:
            is_added = token_id in self._added_tokens
            if is_added and self._prev_added and self._read_offset == len(ids) - 1:
                new_text = self._added_tokens[token_id]
            self._prev_added = is_added
        if new_text != self._pending:  # else nothing visible changed (e.g. a skipped special token)
            self._pending = new_text
            stop_str = self._check_stop()
            if stop_str is not None:
                return stop_str
        if new_text and not new_text.endswith(_REPLACEMENT_CHAR) and not self._open_byte_run:
            self._text.append(new_text)
            self._pending = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        return None

    def _check_stop(self) -> str | None:
        """Find the stop string that completes first in the text that changed since the last check.

        Committed text was searched already, so a new match must end in the pending text: each stop string
        is searched from ``len(committed) - len(stop) + 1``. Among matches, the earliest end wins (ties: the
        earlier start), which is what char-by-char streaming would find, whatever the tokenization.
        """
        if not self.stop:
            return None
        committed = len(self._text)
        base = max(0, committed - self._max_stop_len + 1)
        region = self._text.slice_from(base) + self._pending
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = region.find(s, max(0, committed - len(s) + 1 - base))
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            return None
        end, start, stop_str = best
        self._text.append(self._pending)
        self._pending = ""
        self._text.truncate(base + (end if self.include_stop_str_in_output else start))
        return stop_str

    def _finish(self) -> None:
        """No more ids: pending text is final (it was already searched for stop strings)."""
        if not self._finished:
            self._text.append(self._pending)
            self._pending = ""
            self._finished = True
