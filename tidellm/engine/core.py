"""The engine core: scheduler + executor, one ``step()`` at a time. Runs in-process or in its own process."""

from __future__ import annotations

import gc
import logging
import time

import torch

from tidellm.config import EngineConfig
from tidellm.core.request import Request, RequestStatus
from tidellm.core.sched.pooling import PoolingRequest, PoolingScheduler
from tidellm.core.sched.scheduler import Scheduler
from tidellm.engine.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from tidellm.model_executor.loader import ModelSource, load_model_source
from tidellm.model_executor.models.tasks import TaskMismatchError, check_task, model_task
from tidellm.platforms import device_summary, resolve_device, resolve_dtype
from tidellm.structured_output.manager import StructuredOutputManager
from tidellm.worker.model_runner import ModelRunner, seed_everything
from tidellm.worker.pooling_runner import PoolingModelRunner

logger = logging.getLogger(__name__)

# A step with nothing to run while grammars compile waits this long for one (instead of spinning a core
# the compile needs); aborts and new requests are picked up between waits.
GRAMMAR_WAIT_S = 0.05


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        t0 = time.perf_counter()
        self.config = config
        device = resolve_device(config.device.device)
        if config.device.num_threads and device.type == "cpu":
            torch.set_num_threads(config.device.num_threads)
        dtype = resolve_dtype(config.model.dtype, device)
        seed_everything(config.model.seed)
        if source is None:
            source = load_model_source(
                config.model.model, cache_dir=config.load.cache_dir, revision=config.model.revision
            )
        self.source = source
        # An embedding model runs whole prompts without a KV cache: its own runner and scheduler.
        self.task = model_task(source.arch.architecture)
        self.runner: ModelRunner | PoolingModelRunner
        self.scheduler: Scheduler | PoolingScheduler
        if self.task == "embed":
            self.runner = PoolingModelRunner(config, source, device, dtype)
            self.scheduler = PoolingScheduler(config.scheduler, self.runner.max_model_len)
        else:
            self.runner = ModelRunner(config, source, device, dtype)
            plan = self.runner.kv_plan
            self.scheduler = Scheduler(
                config.scheduler,
                config.cache,
                plan.num_blocks,
                plan.max_model_len,
                group_windows=self.runner.kv_groups.windows,
            )
        self.structured_output: StructuredOutputManager | None = None
        if isinstance(self.scheduler, Scheduler):
            self.structured_output = StructuredOutputManager(source.tokenizer, self.runner.vocab_size)
            self.scheduler.structured_output = self.structured_output
        plan = self.runner.kv_plan
        self.max_model_len = plan.max_model_len
        # What exists now (model, tokenizer, vocabularies) lives as long as the engine: keep it out of the
        # cyclic collector, whose full passes over it cost a few percent of every step.
        gc.collect()
        gc.freeze()
        self.startup_seconds = time.perf_counter() - t0
        logger.info("Model %s", source.description)
        logger.info(
            "Device %s, dtype %s, weights %.0f MiB loaded in %.1f s",
            device_summary(device),
            str(dtype).removeprefix("torch."),
            self.runner.load_report.weight_bytes / 2**20,
            self.runner.load_report.load_seconds,
        )
        if isinstance(self.runner, PoolingModelRunner):
            logger.info(
                "Embedding model: %s, %d dimensions; max_model_len %d; no KV cache",
                self.runner.pooling.describe(),
                self.runner.embedding_size,
                self.max_model_len,
            )
            return
        logger.info(
            "KV cache: %.2f GiB, %d blocks of %d = %d tokens; max_model_len %d → max concurrency %.1fx; prefix caching %s%s",
            plan.total_bytes / 2**30,
            plan.num_blocks,
            plan.block_size,
            plan.capacity_tokens,
            plan.max_model_len,
            plan.max_concurrency,
            "on" if config.cache.enable_prefix_caching else "off",
            f"; {d}" if (d := self.runner.kv_groups.describe()) else "",
        )

    # ------------------------------------------------------------------ requests
    def add_request(self, req: EngineCoreRequest) -> None:
        arch = self.source.arch.architecture
        if isinstance(self.scheduler, PoolingScheduler):
            if req.pooling_params is None:
                check_task(arch, "generate", self.config.model.model)
            self.scheduler.add_request(
                PoolingRequest(
                    req.request_id, req.prompt_token_ids, req.arrival_time or time.time(), req.priority
                )
            )
            return
        if req.sampling_params is None:  # an embedding request
            check_task(arch, "embed", self.config.model.model)
            raise TaskMismatchError(f"request {req.request_id!r} has no sampling parameters.")
        self.scheduler.add_request(
            Request(
                req.request_id,
                req.prompt_token_ids,
                req.sampling_params,
                eos_token_ids=req.eos_token_ids,
                max_tokens=req.max_tokens,
                arrival_time=req.arrival_time or None,
                priority=req.priority,
                block_size=self.config.cache.block_size,
                cache_salt=req.cache_salt,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ step
    def step(self) -> EngineCoreOutputs:
        outputs: list[EngineCoreOutput] = []
        if self.scheduler.has_unfinished_requests():
            start = time.perf_counter()
            sched_out = self.scheduler.schedule()
            so = self.structured_output
            if sched_out.is_empty and so is not None and so.has_pending():
                so.wait_for_pending(GRAMMAR_WAIT_S)
            runner_out = self.runner.execute_model(sched_out)
            outputs = self.scheduler.update_from_output(sched_out, runner_out)
            if isinstance(self.scheduler, Scheduler):
                self.scheduler.record_step_time(sched_out, time.perf_counter() - start)
        return EngineCoreOutputs(
            outputs=outputs, scheduler_stats=self.scheduler.make_stats(), timestamp=time.time()
        )

    def reset_prefix_cache(self) -> bool:
        if isinstance(self.scheduler, PoolingScheduler):
            return True  # nothing is cached
        return self.scheduler.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        if self.structured_output is not None:
            self.structured_output.shutdown()
        self.runner.shutdown()
