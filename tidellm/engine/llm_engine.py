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
from tidellm.engine.pooling import PoolingOutputProcessor, register_pooling_request
from tidellm.engine.protocol import SchedulerStats
from tidellm.model_executor.loader import load_model_source
from tidellm.model_executor.models.tasks import Task, check_task
from tidellm.outputs import EmbeddingRequestOutput, RequestOutput
from tidellm.pooling_params import PoolingParams
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
        self.architecture = source.arch.architecture
        self.task = self.core.task  # "generate" or "embed", from the architecture
        self.embedding_size = source.arch.hidden_size
        self.output_processor: OutputProcessor | PoolingOutputProcessor = (
            PoolingOutputProcessor() if self.task == "embed" else OutputProcessor(self.tokenizer)
        )
        self.last_stats: SchedulerStats | None = None
        self._ids = itertools.count()

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    def require_task(self, task: Task) -> None:
        """TaskMismatchError (a ValueError) naming the model and the fix unless it can do ``task``."""
        check_task(self.architecture, task, self.config.model.model)

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
        self.require_task("generate")
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

    def add_pooling_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: PoolingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue an embedding request (its output arrives from ``step`` as an ``EmbeddingRequestOutput``)."""
        self.require_task("embed")
        assert isinstance(self.output_processor, PoolingOutputProcessor)  # chosen from the same task
        req = register_pooling_request(
            self.input_processor,
            self.output_processor,
            request_id,
            prompt,
            params,
            embedding_size=self.embedding_size,
            priority=priority,
            arrival_time=arrival_time,
        )
        self.core.add_request(req)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            self.core.abort_requests(self.output_processor.child_ids(rid))
            self.output_processor.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput] | list[EmbeddingRequestOutput]:
        """One engine step. A request the core could not serve (e.g. its grammar failed to compile) raises
        ``ValueError`` with the reason, after its other ``n`` children are aborted."""
        core_out = self.core.step()
        self.last_stats = core_out.scheduler_stats
        failed = [o for o in core_out.outputs if o.error is not None]
        op = self.output_processor
        failed_parents = [p for p in list(op.parents) if any(o.request_id in op.child_ids(p) for o in failed)]
        results, to_abort = op.process_outputs(core_out.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        if failed:
            for parent in failed_parents:
                self.abort_request(parent)
            raise ValueError(failed[0].error)
        return results
