"""The offline API: ``LLM(model=...).generate(prompts, params)``, ``.chat(messages, params)`` and, for
embedding models, ``.embed(prompts)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tidellm.engine.llm_engine import LLMEngine
from tidellm.logger import configure_logging
from tidellm.outputs import EmbeddingRequestOutput, RequestOutput
from tidellm.pooling_params import PoolingParams
from tidellm.sample.params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Batch inference on one model.

    Args are the engine settings (see ``tidellm.config``), e.g. ``LLM(model="smollm2-135m", dtype="float32",
    max_num_seqs=64, kv_cache_memory_gb=1)``.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        configure_logging(kwargs.pop("log_level", "INFO"))
        if model is not None:
            kwargs["model"] = model
        # Outputs come back when the whole batch is done, so no one waits on a first token: fill each step's
        # token budget (the fewest steps), not the server's latency-first batching (offline 64 x 128 tokens:
        # ~2% more tokens/s).
        if kwargs.get("prefill_batching", "auto") == "auto":
            kwargs["prefill_batching"] = "budget"
        self.engine = LLMEngine.from_kwargs(**kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions; results come back in the order of ``prompts``."""
        prompt_list = _as_prompt_list(prompts)
        params = _broadcast(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(
                f"priority has {len(priority)} entries but there are {len(prompt_list)} prompts."
            )
        return self._run(prompt_list, params, priority, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the model's chat template."""
        self.engine.require_task("generate")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [
            tok.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools
            )
            for conv in conversations
        ]
        # The template already carries any bos token; encoding must not add a second one.
        token_prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
        params = _broadcast(sampling_params, len(prompts))
        outputs = self._run(token_prompts, params, None, use_tqdm)
        for out, text in zip(outputs, prompts, strict=True):
            out.prompt = text
        return outputs

    def embed(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """Embeddings of texts or token-id lists (embedding models only), in the order of ``prompts``; each
        result's ``outputs.embedding`` is a list of floats. ``truncate_prompt_tokens`` (k, or -1 for
        max_model_len) keeps only the first tokens of longer prompts instead of refusing them."""
        prompt_list = _as_prompt_list(prompts)
        if pooling_params is None:
            params = [PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)] * len(prompt_list)
        else:
            if truncate_prompt_tokens is not None:
                raise ValueError(
                    "Pass truncate_prompt_tokens either directly or inside pooling_params, not both."
                )
            one = isinstance(pooling_params, PoolingParams)
            params = [pooling_params] * len(prompt_list) if one else list(pooling_params)
            if len(params) != len(prompt_list):
                raise ValueError(
                    f"Got {len(params)} PoolingParams for {len(prompt_list)} prompts; pass one, or one per prompt."
                )
        engine = self.engine
        ids = []
        finished: dict[str, EmbeddingRequestOutput] = {}
        bar = tqdm(
            total=len(prompt_list), desc="Embedding", unit="req", disable=not use_tqdm, dynamic_ncols=True
        )
        try:
            for prompt, p in zip(prompt_list, params, strict=True):
                rid = engine.next_request_id()
                engine.add_pooling_request(rid, prompt, p)
                ids.append(rid)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    finished[out.request_id] = out
                    bar.update(1)
        except BaseException:
            engine.abort_request([r for r in ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in ids]

    def _run(self, prompts, params, priority, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
                ids.append(rid)
        except BaseException:  # e.g. a bad schema in the 3rd request: the first two must not linger
            engine.abort_request(ids)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"{out_tokens / elapsed:.1f} out tok/s", refresh=False)
        except BaseException:
            engine.abort_request([r for r in ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in ids]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts)]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return [_one_prompt(p) for p in prompts]


def _one_prompt(p) -> str | list[int]:
    """A string, token ids, or vLLM's prompt dicts: ``{"prompt": str}`` / ``{"prompt_token_ids": [...]}``."""
    if isinstance(p, str):
        return p
    if isinstance(p, dict):
        if set(p) == {"prompt"} and isinstance(p["prompt"], str):
            return p["prompt"]
        if set(p) == {"prompt_token_ids"}:
            return list(p["prompt_token_ids"])
        raise ValueError(
            f"A prompt dict takes exactly one key, 'prompt' (a string) or 'prompt_token_ids' (a list of ints); "
            f"got keys {sorted(p)}."
        )
    return list(p)


def _broadcast(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt.")
    return params
