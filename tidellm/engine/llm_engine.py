"""A synchronous engine: front-end processing around an in-process engine core.

The offline ``LLM`` drives this with ``add_request`` + ``step`` until nothing is left. The API server uses
the same input/output processors around an engine core in another process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tidellm.config import EngineConfig
from tidellm.engine.core import EngineCore
from tidellm.engine.input_processor import InputProcessor, PromptType, register_request
from tidellm.engine.output_processor import OutputKind, OutputProcessor
from tidellm.engine.protocol import SchedulerStats
from tidellm.model_executor.loader import load_model_source
from tidellm.outputs import RequestOutput
from tidellm.sample.params import SamplingParams
from tidellm.tokenizer.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = load_model_source(
            config.model.model, cache_dir=config.load.cache_dir, revision=config.model.revision
        )
        self.tokenizer: Tokenizer = source.tokenizer
        self.core = EngineCore(config, source)
        self.max_model_len = self.core.max_model_len
        self.input_processor = InputProcessor(
            self.tokenizer, self.max_model_len, source.arch.vocab_size, config.model.max_logprobs
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.last_stats: SchedulerStats | None = None
        self._ids = itertools.count()

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        *,
        kind: OutputKind = OutputKind.FINAL_ONLY,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        core_reqs = register_request(
            self.input_processor,
            self.output_processor,
            request_id,
            prompt,
            params,
            kind=kind,
            priority=priority,
            arrival_time=arrival_time,
        )
        for req in core_reqs:
            self.core.add_request(req)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            self.core.abort_requests(self.output_processor.child_ids(rid))
            self.output_processor.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        core_out = self.core.step()
        self.last_stats = core_out.scheduler_stats
        results, to_abort = self.output_processor.process_outputs(core_out.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return results
