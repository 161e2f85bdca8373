"""The batched sampler: logits [N, V] + SamplingMetadata -> one token per row (+ logprobs).

Order (vLLM v1): a grammar's bitmask first (structured outputs: disallowed tokens at -inf, so greedy,
sampling and logprobs all see the constrained distribution); logprobs from those logits; then logit_bias ->
min_tokens mask -> penalties; greedy rows take the argmax of those logits, random rows go on through
temperature -> top-k -> top-p -> min-p -> sample.
On CPU the last stage (greedy argmax, temperature, top-k/top-p/min-p, the draw) is one compiled call over the
batch (``kernels/cpu.sample``): a row is drawn by inverse CDF from one uniform number that is a pure function
of its key (a seeded row's: its generator's seed, which the model runner derives from the request's seed and
output position), so its token never depends on the rest of the batch. torch takes ~7 ms for 16 rows of a
49k vocabulary there, as long as the model's step. Elsewhere (GPUs, or without the kernels) it is torch,
vectorised over rows: the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``, a seeded row drawing its ``q``
from its own generator; the only per-row Python is drawing noise for seeded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.sample.bitmask import apply_grammar_mask
from tidellm.sample.metadata import SamplingMetadata

# (token ids, logprobs, rank of the first id): the sampled/target token first, then the top-N by logprob.
LogprobEntry = tuple[list[int], list[float], int]


@dataclass
class LogprobsLists:
    """Per-row logprobs as plain lists (one ``.tolist()`` per tensor for the whole batch)."""

    token_ids: list[list[int]]  # [N][1 + K]: the sampled token, then the top-K ids (descending logprob)
    logprobs: list[list[float]]  # [N][1 + K]
    ranks: list[int]  # [N] rank of the sampled token (1 = most likely)

    def row(self, i: int, num_top: int | None = None) -> LogprobEntry:
        """Row ``i`` as a ``LogprobEntry``, keeping only its own ``num_top`` top entries."""
        end = None if num_top is None else 1 + num_top
        return self.token_ids[i][:end], self.logprobs[i][:end], self.ranks[i]

    def entries(self) -> list[LogprobEntry]:
        return list(zip(self.token_ids, self.logprobs, self.ranks, strict=True))


# The name used in the design notes; the tensors become lists before they leave the sampler.
LogprobsTensors = LogprobsLists


@dataclass
class SamplerOutput:
    sampled_token_ids: list[int]  # [N]
    logprobs: LogprobsLists | None = None  # only when some row asked for logprobs


class Sampler:
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        logits = logits.to(torch.float32)  # [N, V]; never modified in place
        if metadata.grammar_allowed is not None:
            logits = apply_grammar_mask(logits, metadata.grammar_rows, metadata.grammar_allowed)
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
        logits = apply_logits_processors(logits, metadata)
        sampled = sample(logits, metadata)  # [N] int64
        lp = None
        if raw_logprobs is not None:
            lp = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled.tolist(), lp)


def apply_logits_processors(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """logit_bias -> min_tokens mask -> penalties; out of place. logits: [N, V] float32."""
    if m.logit_bias is not None:
        rows, ids, vals = m.logit_bias
        logits = logits.index_put((rows, ids), vals, accumulate=True)
    if m.min_tokens_mask is not None:
        rows, ids = m.min_tokens_mask
        logits = logits.index_put((rows, ids), torch.tensor(float("-inf"), device=logits.device))
    if m.output_token_counts is not None:
        logits = apply_penalties(logits, m)
    return logits


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """Repetition over prompt+output tokens (positive logits divided, negative multiplied); frequency and
    presence over output tokens only: ``logits -= freq * count + pres * (count > 0)``."""
    counts = m.output_token_counts  # [N, V]
    if m.repetition_penalties is not None:
        seen = m.prompt_token_mask | (counts > 0)  # [N, V]
        rep = torch.where(seen, m.repetition_penalties.unsqueeze(1), 1.0)  # [N, V]
        logits = torch.where(logits > 0, logits / rep, logits * rep)
    if m.frequency_penalties is not None:
        logits = logits - m.frequency_penalties.unsqueeze(1) * counts
    if m.presence_penalties is not None:
        logits = logits - m.presence_penalties.unsqueeze(1) * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """One token per row: argmax for greedy rows, the truncated tempered distribution for the rest."""
    if use_kernel(logits):
        return _sample_kernel(logits, m)
    greedy = None if m.all_random else logits.argmax(dim=-1)  # [N]
    if m.all_greedy:
        return greedy
    logits = logits / m.temperature.unsqueeze(1)  # [N, V]; greedy rows have temperature 1
    if m.top_k is not None or m.top_p is not None:
        logits = apply_top_k_top_p(logits, m.top_k, m.top_p)
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    if m.min_p is not None:
        threshold = m.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    random = exponential_race(probs, m.generators)  # [N]
    if greedy is None:
        return random
    return torch.where(m.is_greedy, greedy, random)


def use_kernel(logits: torch.Tensor) -> bool:
    """Whether ``sample`` takes the compiled CPU kernel for these logits."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.available()


def _sample_kernel(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    if m.all_greedy:
        return cpu_kernels.sample(logits, None, None, None, None, None)
    temperature = m.temperature if m.is_greedy is None else m.temperature.masked_fill(m.is_greedy, 0.0)
    # Unseeded rows: keys from the global generator (reproducible under torch.manual_seed); seeded rows: their
    # generator's seed.
    keys = torch.randint(-(2**63), 2**63 - 1, (m.num_rows,), dtype=torch.int64)
    for i, gen in m.generators.items():
        seed = gen.initial_seed()
        keys[i] = seed - 2**64 if seed >= 2**63 else seed
    return cpu_kernels.sample(logits, temperature, m.top_k, m.top_p, m.min_p, keys)


# Top-p first looks among each row's top candidates only: a full-vocabulary sort is slow on CPU, and with
# real LLM logits the top 1024 tokens nearly always hold the mass asked for. Rows where they do not (or with
# top_k above the cap) fall back to a full sort of just those rows.
TOP_P_CANDIDATES = 1024


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (-inf) all but each row's top-k tokens, then all but the smallest set with mass >= top_p
    (renormalised over the top-k survivors). Both become one logit threshold per row, so ties at the
    cut-off are kept and the result does not depend on how a sort orders equal values.

    logits: [N, V]; top_k: [N] int64 (vocab size = disabled); top_p: [N] float32 (1 = disabled).
    """
    v = logits.shape[1]
    c = min(v, TOP_P_CANDIDATES)
    if top_p is None:  # top-k alone needs only the largest k of the batch
        c = min(v, int(top_k.masked_fill(top_k >= v, 1).max()))
    cand = logits.topk(c, dim=-1).values  # [N, C], descending
    thr, ok = _thresholds(cand, logits, top_k, top_p)  # [N], [N]
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(1)  # [R]
        sub = logits[rows]  # [R, V]
        full = sub.sort(dim=-1, descending=True).values  # [R, V]
        k = None if top_k is None else top_k[rows]
        p = None if top_p is None else top_p[rows]
        thr[rows] = _thresholds(full, sub, k, p)[0]
    return logits.masked_fill(logits < thr.unsqueeze(1), float("-inf"))


def _thresholds(
    cand: torch.Tensor, logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logit thresholds from the descending top-C values ``cand`` [R, C] of ``logits`` [R, V], and
    whether those C candidates were enough to decide it ([R] bool)."""
    r, c = cand.shape
    v = logits.shape[1]
    thr = torch.full((r,), float("-inf"), device=logits.device)  # [R]
    need_full = torch.zeros(r, dtype=torch.bool, device=logits.device)  # [R]
    k_on = k_small = None
    if top_k is not None:
        k_on = top_k < v  # [R]
        k_small = k_on & (top_k <= c)  # [R] all top-k survivors are candidates
        kth = cand.gather(1, (top_k.clamp(max=c) - 1).unsqueeze(1)).squeeze(1)  # [R]
        thr = torch.where(k_on, kth, thr)
        need_full |= k_on & ~k_small
    if top_p is not None:
        p_on = top_p < 1.0  # [R]
        alive = cand.masked_fill(cand < thr.unsqueeze(1), float("-inf"))  # [R, C] top-k survivors
        # Normalise over the top-k survivors (all among the candidates) or, without top-k, the whole row.
        lse = logits.logsumexp(dim=-1)  # [R]
        if k_on is not None:
            lse = torch.where(k_on, alive.logsumexp(dim=-1), lse)
        probs = (alive - lse.unsqueeze(1)).exp()  # [R, C]
        cum = probs.cumsum(dim=-1)  # [R, C]
        keep = ((cum - probs) < top_p.unsqueeze(1)) & (alive > float("-inf"))  # [R, C], a prefix
        n_keep = keep.sum(dim=-1).clamp(min=1)  # [R]
        p_thr = cand.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1)  # [R]
        thr = torch.where(p_on, torch.maximum(thr, p_thr), thr)
        # Without top-k, the candidates decide only if the mass before any non-candidate reaches top_p.
        uncovered = p_on & (cum[:, -1] < top_p)
        need_full |= uncovered if k_small is None else uncovered & ~k_small
    if c == v:
        need_full.zero_()
    return thr, ~need_full


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """``argmax(probs / q)`` with ``q ~ Exp(1)`` per entry: a sample from each row of ``probs`` [N, V]
    (unnormalised is fine). Seeded rows draw ``q`` from their own generator; the others share one draw.
    ``q = -log(u)``, ``u ~ U[0, 1)``: several times faster on CPU than ``Tensor.exponential_``."""
    n = probs.shape[0]
    u = torch.empty_like(probs)  # [N, V]
    if len(generators) < n:
        if not generators:
            u.uniform_()
        else:
            free = [i for i in range(n) if i not in generators]
            u[free] = torch.empty(len(free), probs.shape[1], device=probs.device).uniform_()
    for i, gen in generators.items():
        u[i].uniform_(generator=gen)
    q = u.log_().neg_()  # [N, V] ~ Exp(1); u = 0 gives +inf (that token loses)
    # q == 0 would turn a masked 0 probability into 0/0 = NaN, which argmax prefers.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsLists:
    """Logprob and rank of ``token_ids`` [N] in ``logprobs`` [N, V], plus each row's top ``num_top``."""
    token_ids = token_ids.long()
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > token_lp).sum(dim=-1) + 1  # [N]
    k = min(num_top, logprobs.shape[1])
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)  # [N, K], sorted descending
        ids = torch.cat([token_ids.unsqueeze(1), top_ids], dim=1)  # [N, 1 + K]
        lps = torch.cat([token_lp, top_lp], dim=1)  # [N, 1 + K]
    else:
        ids, lps = token_ids.unsqueeze(1), token_lp
    return LogprobsLists(ids.tolist(), lps.tolist(), ranks.tolist())


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
) -> list[LogprobEntry]:
    """Prompt logprobs: ``logits`` [T, V] at positions predicting ``target_ids`` [T]; one entry per position
    (the target's id, logprob and rank, then the top ``num_top``)."""
    if logits.shape[0] == 0:
        return []
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [T, V]
    return gather_logprobs(logprobs, target_ids.to(logits.device), num_top).entries()
