"""The model runner: owns the model, the KV cache tensors and per-request device-side state.

One ``execute_model`` call = build the flattened inputs from the scheduler's plain-data output, run the
forward pass, compute logits only for rows that sample (and for prompt-logprob positions), sample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tidellm.config import EngineConfig
from tidellm.core.kv_cache.groups import KVCacheGroups
from tidellm.core.sched.output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from tidellm.engine.protocol import LogprobEntry
from tidellm.model_executor.forward_context import set_forward_context
from tidellm.model_executor.layers.attention import AttentionMetadata, layer_windows
from tidellm.model_executor.loader import ModelLoadError, ModelSource
from tidellm.model_executor.models.registry import get_model_class
from tidellm.model_executor.quant.method import (
    apply_quantization,
    build_int8_panels,
    int8_activations,
    plan_quantization,
)
from tidellm.platforms import attention_backends, available_memory_bytes
from tidellm.sample.bitmask import unpack_bitmask
from tidellm.sample.metadata import RowState, SamplingMetadata
from tidellm.sample.sampler import Sampler, compute_prompt_logprobs
from tidellm.worker.input_batch import CachedRequestState, build_step_inputs
from tidellm.worker.kv_cache import KVCachePlan, plan_kv_cache

logger = logging.getLogger(__name__)

# Mixed into a request's seed with its output position, so a seeded request draws the same numbers
# whatever else is in the batch and after being preempted and resumed.
_SEED_STRIDE = 1_000_003


@dataclass
class LoadReport:
    load_seconds: float
    weight_bytes: int
    kv_plan: KVCachePlan


class ModelRunner:
    def __init__(
        self, config: EngineConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.config = config
        self.source = source
        self.device = device
        self.dtype = dtype
        self.arch = source.arch
        self.block_size = config.cache.block_size
        self.states: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.vocab_size = self.arch.vocab_size

        t0 = time.perf_counter()
        self.model, weight_bytes = load_model(config, source, device, dtype)
        self.kv_groups = kv_cache_groups(self.model, config.model.max_model_len or self.arch.max_context_len)
        self.kv_plan = plan_kv_cache(config, self.arch, dtype, device, self.kv_groups)
        self.max_model_len = self.kv_plan.max_model_len
        self.kv_caches = self.kv_plan.allocate()
        self._layer_group = self.kv_groups.layer_group()
        self.load_report = LoadReport(time.perf_counter() - t0, weight_bytes, self.kv_plan)

    # ------------------------------------------------------------------ state
    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids | sched.preempted_req_ids:
            self.states.pop(rid, None)
        for new in sched.scheduled_new_reqs:
            self.states[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=[*new.prompt_token_ids, *new.output_token_ids],
                num_prompt_tokens=len(new.prompt_token_ids),
                sampling_params=new.sampling_params,
                block_ids=[list(g) for g in new.block_ids],
                num_computed_tokens=new.num_computed_tokens,
                eos_token_ids=new.eos_token_ids,
            )
        for cached in sched.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            for table, new_ids in zip(state.block_ids, cached.new_block_ids, strict=True):
                table.extend(new_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        req_ids = list(sched.num_scheduled_tokens)
        states = [self.states[r] for r in req_ids]
        counts = [sched.num_scheduled_tokens[r] for r in req_ids]
        step = build_step_inputs(states, counts, self.block_size)

        workspace: dict = {}  # gather buffers, shared by every group's layers
        metas = [
            AttentionMetadata.build(
                query_start_loc=step.query_start_loc,
                seq_lens=step.seq_lens,
                block_table=table,
                slot_mapping=slots,
                block_size=self.block_size,
                device=self.device,
                workspace=workspace,
            )
            for table, slots in zip(step.block_tables, step.slot_mappings, strict=True)
        ]
        layer_meta = [metas[g] for g in self._layer_group] if len(metas) > 1 else None
        input_ids = torch.from_numpy(step.input_ids).to(self.device)
        positions = torch.from_numpy(step.positions).to(self.device)
        with set_forward_context(metas[0], self.kv_caches, layer_meta), attention_backends(self.device):
            hidden = self.model(input_ids, positions)  # [T, H]

        prompt_lp = self._prompt_logprobs(states, step, hidden)

        sampled: list[list[int]] = [[] for _ in req_ids]
        logprobs: dict[str, LogprobEntry] = {}
        if step.sample_rows:
            idx = torch.from_numpy(step.sample_token_idx).to(self.device)
            logits = self.model.compute_logits(hidden[idx])  # [S, V] fp32
            rows = [self._row_state(states[i]) for i in step.sample_rows]
            meta_s = SamplingMetadata.build(rows, self.vocab_size, self.device)
            if sched.grammar is not None:
                self._add_grammar(meta_s, sched.grammar, [req_ids[i] for i in step.sample_rows])
            out = self.sampler(logits, meta_s)
            for j, i in enumerate(step.sample_rows):
                tok = out.sampled_token_ids[j]
                sampled[i] = [tok]
                states[i].token_ids.append(tok)
                if out.logprobs is not None and states[i].sampling_params.logprobs is not None:
                    logprobs[req_ids[i]] = out.logprobs.row(j, states[i].sampling_params.logprobs)
        for i, s in enumerate(states):
            s.num_computed_tokens += counts[i]
        return ModelRunnerOutput(req_ids, sampled, logprobs, prompt_lp)

    def _add_grammar(self, meta: SamplingMetadata, grammar: GrammarBitmask, sample_ids: list[str]) -> None:
        """Hand the step's grammar bitmask to the sampler, each row at its request's place in the batch."""
        row_of = {rid: j for j, rid in enumerate(sample_ids)}
        src = [i for i, rid in enumerate(grammar.req_ids) if rid in row_of]
        if not src:
            return
        bitmask = grammar.bitmask if len(src) == len(grammar.req_ids) else grammar.bitmask[src]
        rows = [row_of[grammar.req_ids[i]] for i in src]
        meta.grammar_rows = torch.tensor(rows, dtype=torch.int64, device=self.device)
        meta.grammar_allowed = unpack_bitmask(bitmask, self.vocab_size, self.device)

    def _row_state(self, s: CachedRequestState) -> RowState:
        p = s.sampling_params
        gen = None
        if p.seed is not None and not p.greedy:
            n_out = len(s.token_ids) - s.num_prompt_tokens
            gen = torch.Generator(device=self.device)
            gen.manual_seed((p.seed * _SEED_STRIDE + n_out) % (2**63))
        # Token histories are only read by penalties; skip copying them otherwise.
        penalties = p.uses_penalties
        return RowState(
            params=p,
            prompt_token_ids=s.token_ids[: s.num_prompt_tokens] if penalties else [],
            output_token_ids=s.output_token_ids if penalties or p.min_tokens else [],
            generator=gen,
            eos_token_ids=list(s.eos_token_ids),
        )

    def _prompt_logprobs(self, states: list[CachedRequestState], step, hidden: torch.Tensor) -> dict:
        """Logprobs of prompt tokens 1.., accumulated over chunks and returned when the prompt is done."""
        done: dict[str, list[LogprobEntry]] = {}
        for i, s in enumerate(states):
            num_top = s.sampling_params.prompt_logprobs
            if num_top is None or s.num_computed_tokens >= s.num_prompt_tokens:
                continue
            a = int(step.query_start_loc[i])
            start = s.num_computed_tokens
            # positions start..end-1 predict tokens start+1..end (targets must be prompt tokens)
            end = min(start + int(step.query_start_loc[i + 1]) - a, s.num_prompt_tokens - 1)
            if end > start:
                logits = self.model.compute_logits(hidden[a : a + end - start])
                targets = torch.tensor(s.token_ids[start + 1 : end + 1], device=self.device)
                s.prompt_logprobs.extend(compute_prompt_logprobs(logits, targets, num_top))
            if start + int(step.query_start_loc[i + 1]) - a >= s.num_prompt_tokens:
                done[s.req_id] = s.prompt_logprobs
        return done

    # ------------------------------------------------------------------ misc
    def check_health(self) -> None:
        """Raises if the runner cannot serve (nothing to check in-process yet)."""

    def shutdown(self) -> None:
        self.kv_caches = []
        self.states.clear()


def kv_cache_groups(model: nn.Module, max_model_len: int) -> KVCacheGroups:
    """The model's KV-cache groups; a window at least ``max_model_len`` long is no window at all."""
    windows = [w if w is not None and w < max_model_len else None for w in layer_windows(model)]
    return KVCacheGroups.from_layer_windows(windows)


def load_model(
    config: EngineConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, int]:
    """Build the registry's class for ``source`` and stream its weights in: (model in eval mode, weight bytes).
    Shared by the generating and the pooling runner."""
    check_weights_fit(source, device, dtype)
    model_cls = get_model_class(source.arch)
    with torch.device(device):
        model = model_cls(source.arch, dtype=dtype, device=device)
    plan, default_fmt = plan_quantization(config.model.quantization, source, device)
    int8 = int8_activations(config.model.activation_quantization, dtype, device)
    keep_blocks = apply_quantization(model, plan, default_fmt, int8)
    model.load_weights(source.iter_weights(frozenset(keep_blocks)))
    model.eval()
    panel_bytes = build_int8_panels(model) if int8 else 0  # now, not in the first request
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = [m.qweight for m in model.modules() if getattr(m, "qweight", None) is not None]
    weight_bytes += sum(b.nbytes for b in blocks) + panel_bytes
    return model, weight_bytes


def check_weights_fit(source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
    need = source.num_params() * torch.empty((), dtype=dtype).element_size()
    avail = available_memory_bytes(device)
    if need > avail * 0.9:
        raise ModelLoadError(
            f"The model needs {need / 2**30:.2f} GiB for its weights in {dtype} but only "
            f"{avail / 2**30:.2f} GiB of {device.type} memory is available. Free memory, pick a smaller "
            "model, or a smaller dtype (e.g. dtype='bfloat16')."
        )


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
