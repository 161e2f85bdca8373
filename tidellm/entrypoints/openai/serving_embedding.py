"""``POST /v1/embeddings``: one or several inputs (text or token ids) -> embeddings, as floats or base64."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from tidellm.engine.async_llm import RequestStream
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from tidellm.entrypoints.openai.serving_base import OpenAIServing
from tidellm.outputs import EmbeddingRequestOutput
from tidellm.pooling_params import PoolingParams


def normalize_inputs(value: str | list) -> list[str | list[int]]:
    """OpenAI's four input shapes -> a list of inputs, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise errors.bad_request("input must not be empty.", param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    for i, v in enumerate(value):
        if isinstance(v, list) and not v:
            raise errors.bad_request(f"input[{i}] is an empty list of token ids.", param="input")
    return list(value)


def encode_base64(embedding: list[float]) -> str:
    """Little-endian float32 bytes, base64-encoded: what OpenAI returns for ``encoding_format="base64"``."""
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        request_id = self.new_id("embd")
        self.check_model(req.model)
        self.check_task("embed")
        self.warn_ignored(req, request_id)
        inputs = normalize_inputs(req.input)
        try:
            params = PoolingParams(
                truncate_prompt_tokens=req.truncate_prompt_tokens, dimensions=req.dimensions
            )
        except ValueError as e:
            raise errors.from_exception(e) from None
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(inputs):
                rid = request_id if len(inputs) == 1 else f"{request_id}-{i}"
                streams.append(
                    await self.engine.add_pooling_request(
                        rid, prompt, params, priority=req.priority, add_special_tokens=req.add_special_tokens
                    )
                )
        except Exception as e:
            self.abort_unfinished(streams)
            raise errors.from_exception(e, prompt_param="input") from None
        finals = await self.collect_final(streams, raw)
        return Response(self._response(req, finals).model_dump_json(), media_type="application/json")

    def _response(self, req: EmbeddingRequest, finals: list) -> EmbeddingResponse:
        data, prompt_tokens = [], 0
        for i, out in enumerate(finals):
            assert isinstance(out, EmbeddingRequestOutput)  # an embedding engine yields nothing else
            emb = out.outputs.embedding
            data.append(
                EmbeddingData(
                    index=i, embedding=encode_base64(emb) if req.encoding_format == "base64" else emb
                )
            )
            prompt_tokens += len(out.prompt_token_ids)
        usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        return EmbeddingResponse(data=data, model=self.ctx.served_model_name, usage=usage)
