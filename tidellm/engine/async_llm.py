"""The API process's engine front: input processing, the async core client, output processing.

``AsyncLLM`` is what the HTTP handlers talk to. It owns no model: the engine core runs in its own process
(see :mod:`tidellm.engine.core_proc`). Here we tokenize and validate (the same code as the offline
``LLMEngine``), send requests over ZMQ, and run one background task that turns each step's outputs into
per-request ``RequestOutput`` streams (incremental detokenization, stop strings, logprobs) and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tidellm.config import EngineConfig
from tidellm.engine.core_client import AsyncEngineCoreClient, EngineDeadError
from tidellm.engine.input_processor import InputProcessor, PromptType, register_request
from tidellm.engine.output_processor import OutputKind, OutputProcessor
from tidellm.engine.pooling import PoolingOutputProcessor, register_pooling_request
from tidellm.engine.protocol import EngineCoreOutputs
from tidellm.metrics.stats import FinishedRequestStats, IterationStats, StatLogger
from tidellm.model_executor.models.tasks import Task, check_task, model_task
from tidellm.outputs import EmbeddingRequestOutput, RequestOutput
from tidellm.pooling_params import PoolingParams
from tidellm.sample.params import SamplingParams
from tidellm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_STAT_LOG_INTERVAL_S = 10.0


class RequestStream:
    """Async iterator over one request's outputs; the background output task feeds it.

    When the consumer falls behind, queued streaming deltas are merged into one output, so a slow client
    gets fewer, larger chunks instead of an ever-growing backlog.
    """

    def __init__(self, request_id: str, kind: OutputKind) -> None:
        self.request_id = request_id
        self.kind = kind
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException) or self.kind is not OutputKind.DELTA:
                item = nxt
            else:
                item = _merge_deltas(item, nxt)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


def _merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Fold the later delta ``b`` into ``a`` (texts, ids and logprobs concatenated per completion index)."""
    by_index = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        prev.text += c.text
        prev.token_ids = prev.token_ids + c.token_ids
        if prev.logprobs is not None and c.logprobs is not None:
            prev.logprobs = prev.logprobs + c.logprobs
        prev.cumulative_logprob = c.cumulative_logprob
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    b.outputs = sorted(by_index.values(), key=lambda c: c.index)
    return b


@dataclass
class _Tracked:
    stream: RequestStream
    num_prompt_tokens: int
    arrival_time: float
    child_ids: list[str]
    first_token_seen: bool = False
    queue_time_seen: bool = False


class AsyncLLM:
    """Front end of one engine-core process. Build it with :meth:`start`; always :meth:`shutdown` it."""

    def __init__(
        self,
        client: AsyncEngineCoreClient,
        tokenizer: Tokenizer,
        vocab_size: int,
        config: EngineConfig,
        stat_loggers: list[StatLogger] | None = None,
        *,
        architecture: str = "",
        embedding_size: int | None = None,
    ) -> None:
        assert client.ready is not None  # set by the handshake
        self.client = client
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = client.ready.max_model_len
        self.input_processor = InputProcessor(
            tokenizer, self.max_model_len, vocab_size, config.model.max_logprobs
        )
        self.architecture = architecture
        self.task: Task = model_task(architecture)
        self.embedding_size = embedding_size
        self.output_processor: OutputProcessor | PoolingOutputProcessor = (
            PoolingOutputProcessor() if self.task == "embed" else OutputProcessor(tokenizer)
        )
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self._requests: dict[str, _Tracked] = {}
        self._child_to_parent: dict[str, str] = {}  # engine-core id → user request id
        self._dead_callbacks: list[Callable[[str], None]] = []
        self._background: set[asyncio.Future] = set()  # fire-and-forget sends, referenced until done
        self._output_task = asyncio.create_task(self._output_loop(), name="engine-outputs")
        self._log_task = asyncio.create_task(self._log_loop(), name="stat-log")
        client.on_dead(self._on_engine_dead)

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        *,
        stat_loggers: list[StatLogger] | None = None,
        startup_timeout: float = 600.0,
        log_level: str = "INFO",
    ) -> AsyncLLM:
        """Start the engine process (which loads the weights) and, meanwhile, read the tokenizer here.

        Both processes resolve the model; fetches and conversions in the cache are atomic renames, so the
        rare first-run race costs a duplicate download at worst, and every later start overlaps the two.
        """
        from tidellm.model_executor.loader import load_model_source

        client_task = asyncio.create_task(
            AsyncEngineCoreClient.start(config, startup_timeout=startup_timeout, log_level=log_level)
        )
        try:
            source = await asyncio.to_thread(
                load_model_source,
                config.model.model,
                cache_dir=config.load.cache_dir,
                revision=config.model.revision,
            )
        except BaseException:
            client_task.cancel()  # start() kills the engine process when cancelled
            with contextlib.suppress(BaseException):
                await client_task
            raise
        client = await client_task
        return cls(
            client,
            source.tokenizer,
            source.arch.vocab_size,
            config,
            stat_loggers,
            architecture=source.arch.architecture,
            embedding_size=source.arch.hidden_size,
        )

    # ------------------------------------------------------------------ health
    @property
    def is_dead(self) -> bool:
        return self.client.is_dead

    @property
    def dead_reason(self) -> str | None:
        return self.client.dead_reason

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once when the engine process dies unexpectedly."""
        self._dead_callbacks.append(callback)

    def _on_engine_dead(self, reason: str) -> None:
        self._output_task.cancel()
        error = EngineDeadError(reason)
        iteration = IterationStats()
        now = time.time()
        for rid, tracked in list(self._requests.items()):
            tracked.stream.put(error)
            iteration.finished.append(
                FinishedRequestStats("error", tracked.num_prompt_tokens, 0, now - tracked.arrival_time)
            )
            self.output_processor.abort(rid)
        self._requests.clear()
        self._child_to_parent.clear()
        self._record(None, iteration)
        for cb in self._dead_callbacks:
            cb(reason)

    def require_task(self, task: Task) -> None:
        """TaskMismatchError (a ValueError) naming the model and the fix unless it can do ``task``."""
        check_task(self.architecture, task, self.config.model.model)

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        *,
        kind: OutputKind = OutputKind.DELTA,
        priority: int = 0,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
    ) -> RequestStream:
        """Validate and submit a request; errors (``ValueError``, ``EngineDeadError``) raise here, before any
        output, so the HTTP layer can still answer with a proper status code."""
        if self.client.is_dead:
            raise EngineDeadError(self.client.dead_reason or "The engine is not running.")
        self.require_task("generate")
        arrival_time = arrival_time or time.time()
        core_reqs = register_request(
            self.input_processor,
            self.output_processor,
            request_id,
            prompt,
            params,
            kind=kind,
            priority=priority,
            arrival_time=arrival_time,
            strict_length=True,
            add_special_tokens=add_special_tokens,
        )
        stream = RequestStream(request_id, kind)
        tracked = _Tracked(
            stream, len(core_reqs[0].prompt_token_ids), arrival_time, [r.request_id for r in core_reqs]
        )
        self._requests[request_id] = tracked
        for cid in tracked.child_ids:
            self._child_to_parent[cid] = request_id
        try:
            await self.client.add_requests(core_reqs)
        except BaseException:
            self._forget(request_id)
            self.output_processor.abort(request_id)
            raise
        return stream

    async def add_pooling_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: PoolingParams,
        *,
        priority: int = 0,
        add_special_tokens: bool = True,
    ) -> RequestStream:
        """Validate and submit an embedding request; its stream yields one ``EmbeddingRequestOutput``. Errors
        raise here, before anything is sent (as :meth:`add_request`)."""
        if self.client.is_dead:
            raise EngineDeadError(self.client.dead_reason or "The engine is not running.")
        self.require_task("embed")
        assert isinstance(self.output_processor, PoolingOutputProcessor)  # chosen from the same task
        arrival_time = time.time()
        core_req = register_pooling_request(
            self.input_processor,
            self.output_processor,
            request_id,
            prompt,
            params,
            embedding_size=self.embedding_size or 0,
            priority=priority,
            arrival_time=arrival_time,
            add_special_tokens=add_special_tokens,
        )
        stream = RequestStream(request_id, OutputKind.FINAL_ONLY)
        self._requests[request_id] = _Tracked(
            stream, len(core_req.prompt_token_ids), arrival_time, [request_id]
        )
        self._child_to_parent[request_id] = request_id
        try:
            await self.client.add_requests([core_req])
        except BaseException:
            self._forget(request_id)
            self.output_processor.abort(request_id)
            raise
        return stream

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        *,
        kind: OutputKind = OutputKind.DELTA,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving the loop early aborts the request in the engine."""
        stream = await self.add_request(request_id, prompt, params, kind=kind, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request (client gone): its KV blocks are freed in the engine. Unknown ids are ignored."""
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """:meth:`abort` without awaiting: safe in ``finally`` blocks of cancelled tasks (client disconnects),
        where a further ``await`` could be cancelled again before the abort reaches the engine."""
        tracked = self._forget(request_id)
        if tracked is None:
            return
        tracked.stream.finished = True
        parent = self.output_processor.parents.get(request_id)
        child_ids = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        iteration = IterationStats()
        gen = parent.metrics.num_generation_tokens if parent is not None else 0
        iteration.finished.append(
            FinishedRequestStats("abort", tracked.num_prompt_tokens, gen, time.time() - tracked.arrival_time)
        )
        self._record(None, iteration)
        logger.debug("aborted %s", request_id)
        self._send_abort(child_ids)

    def _forget(self, request_id: str) -> _Tracked | None:
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            for cid in tracked.child_ids:
                self._child_to_parent.pop(cid, None)
        return tracked

    def _send_abort(self, child_ids: list[str]) -> None:
        task = asyncio.ensure_future(self._abort_quietly(child_ids))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, child_ids: list[str]) -> None:
        try:
            await self.client.abort_requests(child_ids)
        except Exception as e:  # the engine is gone or closing: nothing left to free
            logger.debug("abort of %s not sent: %s", child_ids, e)

    # ------------------------------------------------------------------ outputs
    async def _output_loop(self) -> None:
        try:
            while True:
                outs = await self.client.get_output()
                self._process(outs)
        except EngineDeadError:
            pass  # _on_engine_dead has failed the requests in flight
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("The output handler failed; killing the engine")
            self.client.kill()

    def _process(self, outs: EngineCoreOutputs) -> None:
        iteration = IterationStats()
        for o in outs.outputs:
            parent_id = self._child_to_parent.get(o.request_id)
            if parent_id is None:
                continue  # aborted while this step ran
            iteration.num_generation_tokens += len(o.new_token_ids)
            if o.error is not None:  # the core could not serve it (e.g. its grammar failed to compile)
                self._fail(parent_id, ValueError(o.error))
                continue
            if self.task == "embed" and o.pooled is None and o.finish_reason is not None:
                self._fail(parent_id, ValueError(str(o.stop_reason or "The engine refused the request.")))
                continue
            if o.scheduled_time is not None:
                tracked = self._requests.get(parent_id)
                if tracked is not None and not tracked.queue_time_seen:
                    tracked.queue_time_seen = True
                    iteration.queue_times.append(max(0.0, o.scheduled_time - tracked.arrival_time))
        results, to_abort = self.output_processor.process_outputs(outs.outputs)
        for ro in results:
            tracked = self._requests.get(ro.request_id)
            if tracked is None:
                continue
            m = ro.metrics
            if not tracked.first_token_seen and m is not None and m.first_token_time is not None:
                tracked.first_token_seen = True
                iteration.num_prompt_tokens += tracked.num_prompt_tokens
                iteration.time_to_first_tokens.append(m.first_token_time - m.arrival_time)
            if ro.finished:
                self._forget(ro.request_id)
                iteration.finished.append(self._finished_stats(ro, tracked))
            tracked.stream.put(ro)
        if to_abort:
            self._send_abort(to_abort)
        self._record(outs.scheduler_stats, iteration)

    def _fail(self, request_id: str, error: Exception) -> None:
        """End a request with ``error`` (the core refused it); its other ``n`` children are aborted."""
        child_ids = self.output_processor.child_ids(request_id)
        tracked = self._forget(request_id)
        self.output_processor.abort(request_id)
        if tracked is not None:
            tracked.stream.put(error)
        if len(child_ids) > 1:
            self._send_abort(child_ids)

    @staticmethod
    def _finished_stats(
        ro: RequestOutput | EmbeddingRequestOutput, tracked: _Tracked
    ) -> FinishedRequestStats:
        m = ro.metrics
        if isinstance(ro, EmbeddingRequestOutput):
            e2e = (m.e2e_latency or 0.0) if m else time.time() - tracked.arrival_time
            return FinishedRequestStats("stop", tracked.num_prompt_tokens, 0, e2e)
        reasons = [c.finish_reason for c in ro.outputs if c.finish_reason]
        reason = "length" if "length" in reasons else (reasons[0] if reasons else "stop")
        return FinishedRequestStats(
            finish_reason=reason,
            num_prompt_tokens=tracked.num_prompt_tokens,
            num_generation_tokens=m.num_generation_tokens if m else 0,
            e2e_latency=(m.e2e_latency or 0.0) if m else time.time() - tracked.arrival_time,
            time_per_output_token=m.time_per_output_token if m else None,
        )

    def _record(self, scheduler_stats, iteration: IterationStats) -> None:
        for sl in self.stat_loggers:
            try:
                sl.record(scheduler_stats, iteration)
            except Exception:
                logger.exception("stat logger %s failed", type(sl).__name__)

    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(_STAT_LOG_INTERVAL_S)
            for sl in self.stat_loggers:
                sl.log()

    # ------------------------------------------------------------------ shutdown
    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the background tasks and the engine process (killed if it does not exit in ``timeout``)."""
        for task in (self._output_task, self._log_task):
            task.cancel()
        for task in (self._output_task, self._log_task):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.shutdown(timeout)
