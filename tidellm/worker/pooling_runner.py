"""The runner of an embedding model: whole prompts in, one pooled vector per request out.

There is no KV cache and no per-request state between steps: each scheduled request is complete in the step
it runs. The batch is packed ([T] rows) and the attention layers see where each request starts through an
``EncoderMetadata`` built once per step; the pooling the checkpoint declares reduces each request's rows.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tidellm.config import EngineConfig
from tidellm.core.sched.pooling import PoolingRunnerOutput, PoolingSchedulerOutput
from tidellm.model_executor.layers.attention.encoder import EncoderMetadata
from tidellm.model_executor.layers.pooler import Pooler
from tidellm.model_executor.loader import ModelSource
from tidellm.model_executor.loader.pooling_config import read_pooling_config
from tidellm.model_executor.models.bert import max_input_positions
from tidellm.platforms import attention_backends
from tidellm.worker.kv_cache import KVCachePlan
from tidellm.worker.model_runner import LoadReport, load_model

logger = logging.getLogger(__name__)


def pooling_max_model_len(config: EngineConfig, max_positions: int) -> int:
    """``max_model_len`` for an encoder: the model's position table bounds it (there is no KV cache)."""
    asked = config.model.max_model_len
    if asked is not None and asked > max_positions:
        raise ValueError(
            f"max_model_len={asked} exceeds the model's maximum input length ({max_positions} positions); "
            "lower max_model_len."
        )
    return asked or max_positions


class PoolingModelRunner:
    def __init__(
        self, config: EngineConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.config = config
        self.source = source
        self.device = device
        self.dtype = dtype
        self.arch = source.arch
        t0 = time.perf_counter()
        self.max_model_len = pooling_max_model_len(config, max_input_positions(self.arch))
        self.pooling = read_pooling_config(source.path)
        self.model, weight_bytes = load_model(config, source, device, dtype)
        self.pooler = Pooler(self.pooling)
        # An empty plan: nothing is cached, but start-up reports and the READY handshake read one.
        self.kv_plan = KVCachePlan(
            self.arch, 0, config.cache.block_size, 0, self.max_model_len, dtype, device
        )
        self.load_report = LoadReport(time.perf_counter() - t0, weight_bytes, self.kv_plan)

    @property
    def embedding_size(self) -> int:
        return self.arch.hidden_size

    @torch.inference_mode()
    def execute_model(self, sched: PoolingSchedulerOutput) -> PoolingRunnerOutput:
        if sched.is_empty:
            return PoolingRunnerOutput([], [])
        lens = [len(p) for p in sched.prompt_token_ids]
        input_ids = torch.from_numpy(
            np.concatenate([np.asarray(p, dtype=np.int64) for p in sched.prompt_token_ids])
        )
        positions = torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lens]))
        meta = EncoderMetadata.build(lens, self.device)
        with attention_backends(self.device):
            hidden = self.model(input_ids.to(self.device), positions.to(self.device), meta)  # [T, H]
        pooled = self.pooler(hidden, meta)  # [B, H] fp32
        return PoolingRunnerOutput(list(sched.req_ids), pooled.cpu().tolist())

    def check_health(self) -> None:
        """Raises if the runner cannot serve (nothing to check in-process yet)."""

    def shutdown(self) -> None:
        pass
