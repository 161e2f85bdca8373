"""``POST /tokenize`` and ``POST /detokenize``: the server's own tokenizer and chat template, for clients that
count tokens or build prompts themselves."""

from __future__ import annotations

from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from tidellm.entrypoints.openai.serving_chat import OpenAIServingChat


class OpenAIServingTokenize(OpenAIServingChat):
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise errors.bad_request("Pass exactly one of 'prompt' or 'messages'.", param="prompt")
        tok = self.engine.tokenizer
        if req.messages is not None:
            if not req.messages:
                raise errors.bad_request("messages must not be empty.", param="messages")
            # The template already carries bos, so special tokens are not added unless asked for.
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            text = self.render_text(req.messages, req.add_generation_prompt, tools=tools)
            ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = tok.encode(req.prompt or "", add_special_tokens=add)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(
            tokens=ids, count=len(ids), max_model_len=self.engine.max_model_len, token_strs=strs
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        vocab = self.engine.input_processor.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise errors.bad_request(f"Token id {t} is out of range [0, {vocab}).", param=f"tokens[{i}]")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(req.tokens, skip_special_tokens=False))
