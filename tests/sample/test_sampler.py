"""Batched sampler: greedy, truncation support, exact penalties, bias, min_tokens, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from tidellm.sample import sampler as sampler_mod
from tidellm.sample.metadata import RowState, SamplingMetadata, token_counts
from tidellm.sample.params import SamplingParams
from tidellm.sample.sampler import (
    Sampler,
    apply_logits_processors,
    apply_top_k_top_p,
    compute_prompt_logprobs,
)

V = 12
SEED_STRIDE = 1_000_003  # as the model runner mixes a request's seed with its output position
sampler = Sampler()


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def sampling_path(request, monkeypatch) -> str:
    """Every test on both sampling paths: the compiled CPU kernel and torch (the GPU path)."""
    if request.param == "torch":
        monkeypatch.setattr(sampler_mod, "use_kernel", lambda logits: False)
    elif not sampler_mod.use_kernel(torch.zeros(1, 1)):
        pytest.skip("the CPU kernels cannot be built here")
    return request.param


def rows_for(params, prompts=None, outputs=None, eos=None, gens=None):
    n = len(params)
    prompts, outputs, gens, eos = (
        prompts or [[]] * n,
        outputs or [[]] * n,
        gens or [None] * n,
        eos or [[]] * n,
    )
    return [RowState(p, prompts[i], outputs[i], gens[i], eos[i]) for i, p in enumerate(params)]


def run(logits, params, vocab=None, **kw):
    meta = SamplingMetadata.build(rows_for(params, **kw), vocab or logits.shape[1], "cpu")
    return sampler(logits, meta)


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` unseeded samples of one distribution, as one batch of identical rows."""
    torch.manual_seed(seed)
    out = run(logits_row.expand(n, -1).clone(), [params] * n)
    return torch.tensor(out.sampled_token_ids)


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ---------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = run(logits, [SamplingParams(temperature=0)] * 5)
    assert out.sampled_token_ids == logits.float().argmax(-1).tolist() and out.logprobs is None


def test_all_greedy_fast_path_builds_nothing():
    meta = SamplingMetadata.build(rows_for([SamplingParams(temperature=0)] * 3), V, "cpu")
    assert meta.all_greedy and not meta.all_random and meta.max_num_logprobs is None
    assert meta.temperature is None and meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.output_token_counts is None and meta.min_tokens_mask is None and meta.logit_bias is None


def test_mixed_batch_greedy_rows_get_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=4)] * 3
    for seed in range(5):
        torch.manual_seed(seed)
        out = run(logits, params).sampled_token_ids
        assert out[0::2] == logits[0::2].argmax(-1).tolist()


def test_input_logits_not_modified():
    logits = torch.randn(3, V)
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.3, logit_bias={1: 5.0}, top_k=3, top_p=0.8, min_p=0.1),
        SamplingParams(min_tokens=2, temperature=0),
        SamplingParams(frequency_penalty=1.0, logprobs=2),
    ]
    run(logits, params, prompts=[[1, 2]] * 3, outputs=[[3]] * 3, eos=[[0]] * 3)
    assert torch.equal(logits, before)


# -------------------------------------------------------------------------------- truncation support
LOGITS4 = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=1, temperature=5.0), {0}),
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(top_p=0.3), {0}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),
        (SamplingParams(min_p=0.7), {0}),
        # top-p over the renormalised top-3 (0.53, 0.32, 0.16): mass before token 2 is 0.84, not 0.8
        (SamplingParams(top_k=3, top_p=0.83), {0, 1}),
        (SamplingParams(), {0, 1, 2, 3}),
    ],
)
def test_truncation_samples_only_allowed_tokens(params, allowed):
    got = set(draws(LOGITS4, params, 4000).tolist())
    assert got == allowed


def test_top_k_never_yields_third_token_with_seeds():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    top2 = set(logits.topk(2).indices.tolist())
    seen = set()
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        p = SamplingParams(top_k=2, temperature=3.0, seed=seed)
        seen |= set(run(logits[None], [p], gens=[gen]).sampled_token_ids)
    assert seen == top2


def ref_top_k_top_p(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Naive one-row reference: full sort, keep the top-k values, then the smallest prefix with mass >= p."""
    thr = row.sort(descending=True).values[k - 1] if k < row.numel() else float("-inf")
    alive = row[row >= thr].sort(descending=True).values
    if p < 1.0:
        probs = torch.softmax(alive.double(), -1)
        n_keep = max(1, int(((probs.cumsum(-1) - probs) < p).sum()))
        thr = max(float(thr), float(alive[n_keep - 1]))
    return row.masked_fill(row < thr, float("-inf"))


@pytest.mark.parametrize("cap", [1024, 64])
def test_top_k_top_p_matches_full_sort_reference(monkeypatch, cap):
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", cap)
    g = torch.Generator().manual_seed(4)
    v = 3000
    scales = [8.0, 0.3, 3.0, 1.0, 8.0, 0.3, 2.0, 5.0]  # peaked rows: candidates suffice; flat rows: fallback
    logits = torch.stack([torch.randn(v, generator=g) * s for s in scales])  # [8, V]
    logits[7, :10] = logits[7].max() + 1  # ties at the top
    ks = [v, v, 50, 2000, 5, v, 100, 3]
    ps = [0.9, 0.95, 0.8, 0.5, 1.0, 1.0, 0.99, 0.7]
    got = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for i in range(len(ks)):
        want = ref_top_k_top_p(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        assert torch.equal(got[i][~torch.isinf(got[i])], logits[i][~torch.isinf(want)])
    # top-k alone and top-p alone
    got_k = apply_top_k_top_p(logits, torch.tensor(ks), None)
    got_p = apply_top_k_top_p(logits, None, torch.tensor(ps))
    for i in range(len(ks)):
        assert torch.equal(got_k[i], ref_top_k_top_p(logits[i], ks[i], 1.0))
        assert torch.equal(got_p[i], ref_top_k_top_p(logits[i], v, ps[i]))


# ------------------------------------------------------------------------------------- distributions
def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    t = 0.7
    samples = draws(logits, SamplingParams(temperature=t), 60_000, seed=123)
    probs = torch.softmax(logits / t, -1)
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5; fixed seed, so the test is deterministic.
    assert chi_square(samples, probs) < 30
    # The untempered distribution must be rejected by the same test.
    assert chi_square(samples, torch.softmax(logits, -1)) > 300


def test_truncated_distribution_is_renormalised():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    samples = draws(logits, SamplingParams(temperature=1.3, top_k=4, min_p=0.3), 40_000, seed=7)
    p = torch.softmax(logits / 1.3, -1)
    p[4:] = 0
    p[p < 0.3 * p.max()] = 0
    assert chi_square(samples, p / p.sum()) < 30


def test_seeded_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    samples = []
    for s in range(4000):
        p = SamplingParams(seed=s)
        samples += run(logits[None], [p], gens=[torch.Generator().manual_seed(s)]).sampled_token_ids
    assert chi_square(torch.tensor(samples), torch.softmax(logits, -1)) < 25


# ---------------------------------------------------------------------------------- logits processors
def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0], [1.0, 1.0, 1.0, -1.0, -1.0, 0.0]])
    prompt = [[0, 1], [0, 0, 5]]
    output = [[2, 2, 3], [3, 4, 4, 4]]
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=-0.5),  # no repetition penalty: prompt tokens untouched
    ]
    meta = SamplingMetadata.build(rows_for(params, prompts=prompt, outputs=output), 6, "cpu")
    got = apply_logits_processors(logits, meta)
    want = logits.clone()
    # row 0: repetition over prompt {0, 1} and output {2, 3}; then frequency * count + presence
    want[0] = torch.tensor([2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 * 2 - 0.25, -0.5 * 2 - 0.5 * 1 - 0.25, 1.0, 3.0])
    # row 1: frequency only, over output tokens {3: 1, 4: 3}
    want[1] = torch.tensor([1.0, 1.0, 1.0, -1.0 + 0.5, -1.0 + 1.5, 0.0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    assert run(logits, [SamplingParams(temperature=0)], prompts=[[0]]).sampled_token_ids == [0]
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert run(logits, [p], prompts=[[0]]).sampled_token_ids == [1]  # 3 / 2 < 2


def test_logit_bias_forces_token():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5))
    worst = logits.argmin(-1).tolist()
    params = [
        SamplingParams(temperature=t, logit_bias={w: 100.0}) for t, w in zip([0, 1, 0, 2], worst, strict=True)
    ]
    assert run(logits, params).sampled_token_ids == worst
    banned = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={b: -100.0}) for b in banned]
    assert all(a != b for a, b in zip(run(logits, params).sampled_token_ids, banned, strict=True))


def test_logit_bias_out_of_vocab_raises():
    with pytest.raises(ValueError, match="logit_bias token id"):
        SamplingMetadata.build(rows_for([SamplingParams(logit_bias={V: 1.0})]), V, "cpu")


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 0] = 10.0  # EOS
    logits[0, 7] = 9.0  # stop token id
    logits[0, 3] = 8.0
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    for n_out, want in [(0, 3), (2, 3), (3, 0), (5, 0)]:
        assert run(logits, [p], outputs=[[4] * n_out], eos=[[0]]).sampled_token_ids == [want]
    # ignore_eos: EOS is not a stop token, so only the stop ids are masked
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)
    assert run(logits, [p], outputs=[[]], eos=[[0]]).sampled_token_ids == [0]
    logits[0, 0] = -10.0
    assert run(logits, [p], outputs=[[]], eos=[[0]]).sampled_token_ids == [3]
    # random rows are masked too
    p = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[7])
    logits[0, 0] = 10.0
    torch.manual_seed(0)
    out = run(logits.expand(500, -1), [p] * 500, outputs=[[]] * 500, eos=[[0]] * 500).sampled_token_ids
    assert not ({0, 7} & set(out)) and 3 in out


def test_token_counts_scatter():
    counts = token_counts([[1, 1, 3], [], [0, 99, -1, 2]], [0, 1, 3], 4, 4, "cpu")
    want = torch.tensor([[0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.float32)
    assert torch.equal(counts, want)


# ------------------------------------------------------------------------------------------------ seeds
def _seeded_run(logits_steps, batches, target_pos, seed):
    """Sample the seeded target row over several steps, at ``target_pos`` inside ``batches[step]``."""
    out = []
    for step, (logits, others) in enumerate(zip(logits_steps, batches, strict=True)):
        params = list(others)
        params.insert(target_pos, SamplingParams(temperature=0.9, top_p=0.95, seed=seed))
        gens = [torch.Generator().manual_seed(s) if (s := p.seed) is not None else None for p in params]
        gens[target_pos].manual_seed(seed * SEED_STRIDE + step)  # fresh per step, as the runner does
        batch_logits = torch.randn(len(params), V)
        batch_logits[target_pos] = logits
        out.append(run(batch_logits, params, gens=gens).sampled_token_ids[target_pos])
    return out


def test_seeded_row_is_independent_of_batch():
    g = torch.Generator().manual_seed(11)
    steps = [torch.randn(V, generator=g) * 0.5 for _ in range(8)]
    alone = _seeded_run(steps, [[]] * 8, 0, seed=42)
    others = [
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=3, seed=5),
        SamplingParams(min_p=0.1),
    ]
    for pos in (0, 2, 4):
        torch.manual_seed(pos + 100)  # different global RNG state for the unseeded neighbours
        assert _seeded_run(steps, [others] * 8, pos, seed=42) == alone
    assert _seeded_run(steps, [others[:1]] * 8, 1, seed=42) == alone
    assert _seeded_run(steps, [[]] * 8, 0, seed=43) != alone


def test_unseeded_rows_reproducible_with_global_seed():
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=1.0)] * 4
    torch.manual_seed(0)
    a = run(logits, params).sampled_token_ids
    torch.manual_seed(0)
    assert run(logits, params).sampled_token_ids == a


# --------------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(9)) * 3
    params = [
        SamplingParams(
            temperature=0, logprobs=3, logit_bias={2: 50.0}
        ),  # bias changes the token, not logprobs
        SamplingParams(temperature=0.5, logprobs=0, repetition_penalty=1.8, top_k=2),
        SamplingParams(temperature=2.0),  # asks for none
        SamplingParams(temperature=0, logprobs=5, presence_penalty=2.0),
    ]
    torch.manual_seed(0)
    out = run(logits, params, prompts=[[1, 2]] * 4, outputs=[[0, 5]] * 4)
    ref = torch.log_softmax(logits, -1)
    lp = out.logprobs
    assert out.sampled_token_ids[0] == 2
    for i, p in enumerate(params):
        tok = out.sampled_token_ids[i]
        ids, lps, rank = lp.row(i, p.logprobs or 0)
        assert ids[0] == tok and abs(lps[0] - ref[i, tok].item()) < 1e-6
        assert rank == int((ref[i] > ref[i, tok]).sum()) + 1
        k = p.logprobs or 0
        assert len(ids) == len(lps) == 1 + k
        assert ids[1:] == ref[i].argsort(descending=True)[:k].tolist()
        assert lps[1:] == sorted(lps[1:], reverse=True)
        torch.testing.assert_close(torch.tensor(lps[1:]), ref[i, ids[1:]], rtol=0, atol=1e-6)
    assert len(lp.token_ids[0]) == 6  # batch gathers the max top-N; row() trims to the row's own


def test_bf16_logits_logprobs_in_float32():
    logits = torch.randn(2, V).to(torch.bfloat16)
    out = run(logits, [SamplingParams(temperature=0, logprobs=2)] * 2)
    ref = torch.log_softmax(logits.float(), -1)
    for i in range(2):
        ids, lps, rank = out.logprobs.row(i, 2)
        assert rank == 1 and abs(lps[0] - ref[i, ids[0]].item()) < 1e-6


def test_compute_prompt_logprobs():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([3, 0, 11, 7, 7])
    entries = compute_prompt_logprobs(logits, targets, 2)
    ref = torch.log_softmax(logits, -1)
    assert len(entries) == 5
    for t, (ids, lps, rank) in enumerate(entries):
        tgt = int(targets[t])
        assert ids[0] == tgt and abs(lps[0] - ref[t, tgt].item()) < 1e-6
        assert rank == int((ref[t] > ref[t, tgt]).sum()) + 1
        assert ids[1:] == ref[t].topk(2).indices.tolist() and lps[1] >= lps[2]
    assert [e[0] for e in compute_prompt_logprobs(logits, targets, 0)] == [[t] for t in targets.tolist()]
    assert compute_prompt_logprobs(logits[:0], targets[:0], 2) == []


# ------------------------------------------------------------------------ the kernel against torch's cuts
def _torch_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution torch's path samples one row from: temperature, top-k/top-p, min-p, softmax."""
    meta = SamplingMetadata.build(rows_for([p]), logits.shape[0], "cpu")
    x = logits.unsqueeze(0) / meta.temperature.unsqueeze(1)
    if meta.top_k is not None or meta.top_p is not None:
        x = apply_top_k_top_p(x, meta.top_k, meta.top_p)
    probs = torch.softmax(x, dim=-1)
    if meta.min_p is not None:
        probs = probs.masked_fill(probs < meta.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return (probs / probs.sum()).squeeze(0)


CUTS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.6),
    SamplingParams(temperature=0.5, top_p=0.95),
    SamplingParams(min_p=0.05),
    SamplingParams(temperature=1.5, top_k=20, top_p=0.7, min_p=0.02),
]


@pytest.mark.parametrize("params", CUTS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
@pytest.mark.parametrize("scale", [0.3, 3.0])  # flat rows (every token a candidate) and spread ones
def test_draws_follow_torchs_truncated_distribution(sampling_path, params, scale):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(7)) * scale
    probs = _torch_distribution(logits, params)
    samples = draws(logits, params, 6000, seed=1)
    dof = int((probs > 0).sum()) - 1
    assert chi_square(samples, probs) < dof + 6 * (2 * dof) ** 0.5 + 10  # and nothing outside the support


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_p=0.9), SamplingParams(top_k=40), SamplingParams(min_p=0.05, top_p=0.99)],
    ids=["top_p", "top_k", "min_p"],
)
def test_large_vocabulary_draws_stay_in_torchs_support(sampling_path, params):
    """A 49k vocabulary shaped like a model's logits (a few strong tokens over a broad tail): every draw is a
    token torch's cuts keep, and the strongest tokens come up about as often as torch gives them."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(49152, generator=g) * 2.0
    logits[torch.randperm(49152, generator=g)[:8]] += torch.linspace(6.0, 11.0, 8)
    probs = _torch_distribution(logits, params)
    samples = draws(logits, params, 512, seed=2)
    assert bool((probs[samples] > 0).all())
    top = int(probs.argmax())
    assert abs(float((samples == top).float().mean()) - float(probs[top])) < 0.08


def test_equal_logits_keep_every_tied_token(sampling_path):
    """top-p's cut is a logit threshold, so ties at it are all kept: on a flat row nothing is cut."""
    logits = torch.zeros(V)
    got = set(draws(logits, SamplingParams(top_p=0.3, top_k=3), 3000).tolist())
    assert got == set(range(V))


def test_greedy_takes_the_first_of_tied_maxima(sampling_path):
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [float("-inf"), -1.0, -1.0, float("-inf")]])
    assert run(logits, [SamplingParams(temperature=0)] * 2).sampled_token_ids == [1, 1]
