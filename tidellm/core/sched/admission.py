"""How many waiting prompts a step starts: the number that gets them their first tokens soonest.

Starting more prompts in one step spreads the step's fixed cost (the weights streamed once, the Python around
the model, the LM head, and any prefill chunk already in the step) over more of them, but each of them then
waits for all of them. Say W prompts of L tokens wait, and a step that starts k of them costs S + k·L
prefill-token equivalents. The j-th step's prompts get their first token at j·(S + k·L), and the W first-token
times add up to W/2 · (S·W/k + S + L·W + k·L), which is smallest at k = sqrt(S·W / L). ``prompts_to_start``
takes the floor of that (at least one): in a server more prompts keep arriving, and a smaller step also holds
the running decodes back for less time. Filling the token budget instead, as vLLM does, is right only when S
is large against a prompt (a GPU); on a CPU a 100-token prompt costs five times a step's fixed part, and
bursts of 16 prompts started five at a time wait two to three times as long, in the median, as ones started
one or two at a time (docs/performance.md, runs 27-29).

S comes from ``StepCost``, a least-squares fit of the engine's measured step times, so it follows the model and
the machine it runs on. The step's decode rows are not part of S (``Scheduler._prompts_to_start``): their own
cost recurs in every step, whatever the step starts, so it is not a cost that batching prompts spreads. The
running requests do pay for the extra steps' fixed part: at 16 streams their time per output token rose by
about 1 ms (of ~13) for a TTFT ~150 ms shorter.
"""

from __future__ import annotations

import math

import numpy as np

# Prior step cost in seconds: fixed, per prefill token, per decode row (SmolLM2-135M on two Zen 5 cores). It
# only decides what the engine's own steps leave open (all steps so far of one shape, say); a cost ten times
# off it weighs about as much as one step's time missed by its own length.
PRIOR = (4e-3, 0.2e-3, 0.45e-3)
_PRIOR_WEIGHT = 0.01
FORGET = 0.98  # per step: the fit follows the last ~50 steps


class StepCost:
    """seconds ≈ fixed + per_token · prefill tokens + per_decode · decode rows, fitted online by least squares
    on relative errors (step times jitter by a share of their length), forgetting old steps, on top of a light
    prior (``PRIOR``)."""

    def __init__(self, prior: tuple[float, float, float] = PRIOR) -> None:
        # A ridge toward the prior, on each cost relative to its prior value.
        inv = 1.0 / np.asarray(prior, dtype=np.float64)
        self._prior_a = _PRIOR_WEIGHT * np.diag(inv**2)
        self._prior_r = _PRIOR_WEIGHT * inv
        self._a = np.zeros((3, 3))
        self._r = np.zeros(3)
        self._theta = prior
        self._stale = False

    def observe(self, prefill_tokens: int, decode_rows: int, seconds: float) -> None:
        """One step's measured time (the fit is solved when next read, not every step)."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        x = np.array([1.0, float(prefill_tokens), float(decode_rows)]) / seconds
        self._a = FORGET * self._a + np.outer(x, x)
        self._r = FORGET * self._r + x
        self._stale = True

    def _fit(self) -> tuple[float, float, float]:
        if self._stale:
            self._stale = False
            theta = np.linalg.solve(self._a + self._prior_a, self._r + self._prior_r)
            if theta[1] > 0:  # a fit without a positive cost per token says nothing usable; keep the last one
                fixed, per_token, per_decode = (float(max(t, 0.0)) for t in theta)
                self._theta = (fixed, per_token, per_decode)
        return self._theta

    @property
    def fixed(self) -> float:
        return self._fit()[0]

    @property
    def per_token(self) -> float:
        return self._fit()[1]

    @property
    def per_decode(self) -> float:
        return self._fit()[2]

    @property
    def fixed_tokens(self) -> float:
        """A step's fixed cost in prefill-token equivalents."""
        fixed, per_token, _ = self._fit()
        return fixed / per_token


def prompts_to_start(step_tokens: float, num_waiting: int, prompt_tokens: float) -> int:
    """How many of ``num_waiting`` prompts of ``prompt_tokens`` (mean, still to compute) to start in a step
    whose shared cost is ``step_tokens`` prefill-token equivalents."""
    if num_waiting <= 0:
        return 0
    k = math.floor(math.sqrt(step_tokens * num_waiting / max(prompt_tokens, 1.0)))
    return max(1, min(k, num_waiting))
