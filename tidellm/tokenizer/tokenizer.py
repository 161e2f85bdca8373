"""A thin tokenizer over Hugging Face `tokenizers`, with the model's chat template.

We avoid `transformers` at run time: `tokenizers` alone loads in milliseconds, and the two things we need
from the tokenizer config (special tokens, chat template) are plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers


class Tokenizer:
    """Encode/decode text and render chat templates for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        # Every id that ends generation (the tokenizer's eos plus generation_config / arch extras).
        eos = [eos_token_id] if eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos, *extra_eos_token_ids]))
        self.all_special_ids: set[int] = {
            tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special
        }
        for tid in (bos_token_id, eos_token_id):
            if tid is not None:
                self.all_special_ids.add(tid)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Never let the backend add special tokens on its own: we add bos/eos explicitly so that the
        # behaviour is the same whichever post-processor the tokenizer.json carries.
        self.backend.no_truncation()
        self.backend.no_padding()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json, tokenizer_config.json, generation_config.json and
        the chat template (chat_template.jinja or tokenizer_config.json)."""
        from tidellm.tokenizer.hf_tokenizer import tokenizer_kwargs_from_hf_folder

        backend, kwargs = tokenizer_kwargs_from_hf_folder(Path(path))
        return cls(backend, **kwargs)

    @classmethod
    def from_gguf(
        cls, source: str | Path | Mapping[str, Any], *, cache_file: str | Path | None = None
    ) -> Tokenizer:
        """From a GGUF file (or its already-parsed metadata). Converting a SentencePiece vocabulary
        takes seconds, so with ``cache_file`` the converted backend is saved there and reused."""
        from tidellm.tokenizer.gguf_tokenizer import load_gguf_backend, tokenizer_config_from_gguf

        if isinstance(source, (str, Path)):
            from tidellm.model_executor.loader.gguf_file import GGUFFile

            source = GGUFFile(source).metadata
        backend = load_gguf_backend(source, Path(cache_file) if cache_file is not None else None)
        return cls(backend, **tokenizer_config_from_gguf(source))

    # ---------------------------------------------------------------- tokens
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if (
                self.add_bos_token
                and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)
            ):
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the model's template (or ``chat_template`` if given)."""
        from tidellm.tokenizer.chat_template import render_chat_template

        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "This model has no chat template; pass one explicitly (for the server: "
                "--chat-template FILE) or use a completion prompt instead."
            )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=tools,
            **kwargs,
        )
