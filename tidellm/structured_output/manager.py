"""Grammars and matchers of the engine core's requests: compiled off the step, cached, one matcher each.

The scheduler owns one manager. ``add`` starts compiling a request's grammar on a small thread pool (or
finds it cached: the same spec compiles once); the request waits in the queue until ``ready`` says so,
while the rest of the batch runs. Each step the scheduler asks for the bitmask rows of the constrained
requests that sample, and after sampling it advances their matchers (``accept``). xgrammar releases the
GIL while compiling, so a compile costs the step loop no Python time, only a share of the cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidellm.sample.params import StructuredOutputsParams
from tidellm.structured_output.backend import (
    DEFAULT_BACKEND,
    Matcher,
    StructuredOutputBackend,
    allocate_bitmask,
    backend_class,
)
from tidellm.structured_output.spec import GrammarSpec, StructuredOutputError, grammar_spec
from tidellm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (a JSON-schema grammar is tens of kB to a few MB).
MAX_CACHED_GRAMMARS = 256


# Niceness of the compile threads (and of xgrammar's workers, which inherit it): see _yield_to_the_step_loop.
COMPILE_NICENESS = 10


def _yield_to_the_step_loop() -> None:
    """Run compiles at a lower CPU priority. On a machine with few cores a compile competes with the forward
    pass for them: measured on 2 cores, a 0.15 s schema compile at equal priority stretched 8 running
    requests' steps from 21 to 42-63 ms for half a second. Niced, it takes what the step loop leaves idle."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
        except OSError:
            logger.debug("could not lower the compile threads' priority", exc_info=True)


@dataclass
class _Entry:
    spec: GrammarSpec
    future: cf.Future
    matcher: Matcher | None = None


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        backend: str = DEFAULT_BACKEND,
        max_workers: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.backend_name = backend
        workers = max_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._pool = cf.ThreadPoolExecutor(
            workers, thread_name_prefix="grammar-compile", initializer=_yield_to_the_step_loop
        )
        self._backend: StructuredOutputBackend | None = None
        self._backend_lock = threading.Lock()
        self._grammars: OrderedDict[GrammarSpec, cf.Future] = OrderedDict()
        self._requests: dict[str, _Entry] = {}
        # Totals for the log and benchmarks.
        self.num_compiles = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ requests
    def add(self, request_id: str, params: StructuredOutputsParams) -> None:
        """Start compiling (or reuse) the request's grammar. Raises ``StructuredOutputError`` at once only for
        a malformed spec; compile errors surface through ``ready``."""
        spec = grammar_spec(params)
        future = self._grammars.get(spec)
        if future is None or (future.done() and future.exception() is not None):
            future = self._pool.submit(self._compile, spec)
            self._grammars[spec] = future
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(spec)
        self._requests[request_id] = _Entry(spec, future)

    def ready(self, request_id: str) -> bool:
        """True once the grammar is compiled (the matcher is made then); False while compiling. Raises
        ``StructuredOutputError`` if it failed to compile."""
        entry = self._requests[request_id]
        if entry.matcher is not None:
            return True
        if not entry.future.done():
            return False
        try:
            compiled = entry.future.result()  # re-raises the compile error
            entry.matcher = self._get_backend().matcher(compiled)
        except StructuredOutputError:
            raise
        except Exception as e:  # cancelled at shutdown, or a backend bug: still only this request's error
            raise StructuredOutputError(f"Could not prepare the {entry.spec.kind} constraint: {e}") from e
        return True

    def has_pending(self) -> bool:
        return any(e.matcher is None and not e.future.done() for e in self._requests.values())

    def wait_for_pending(self, timeout: float) -> None:
        """Block until some pending grammar finishes compiling or ``timeout`` passes (an idle step)."""
        pending = [e.future for e in self._requests.values() if e.matcher is None and not e.future.done()]
        if pending:
            cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    def free(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    # ------------------------------------------------------------------ per step
    def grammar_bitmask(self, request_ids: list[str]) -> np.ndarray:
        """[len(request_ids), ceil(V / 32)] int32: row i = tokens request i may sample next."""
        bitmask = allocate_bitmask(len(request_ids), self.vocab_size)
        for row, rid in enumerate(request_ids):
            matcher = self._requests[rid].matcher
            if matcher is not None and not matcher.is_terminated():
                matcher.fill_bitmask(bitmask, row)
        return bitmask

    def accept(self, request_id: str, token_ids: list[int]) -> bool:
        """Advance the request's matcher over its new tokens; False if the grammar rejected one."""
        matcher = self._requests[request_id].matcher
        return matcher is not None and matcher.accept_tokens(token_ids)

    def is_terminated(self, request_id: str) -> bool:
        matcher = self._requests[request_id].matcher
        return matcher is not None and matcher.is_terminated()

    # ------------------------------------------------------------------ compiling (pool threads)
    def _get_backend(self) -> StructuredOutputBackend:
        with self._backend_lock:
            if self._backend is None:
                t0 = time.perf_counter()
                self._backend = backend_class(self.backend_name)(self.tokenizer, self.vocab_size)
                logger.info(
                    "Structured outputs: %s backend ready in %.2f s",
                    self.backend_name,
                    time.perf_counter() - t0,
                )
            return self._backend

    def _compile(self, spec: GrammarSpec) -> Any:
        backend = self._get_backend()
        t0 = time.perf_counter()
        try:
            compiled = backend.compile(spec)
        except StructuredOutputError:
            raise
        except Exception as e:  # never let a backend bug escape as anything but a per-request error
            raise StructuredOutputError(f"Could not compile the {spec.kind} constraint: {e}") from e
        dt = time.perf_counter() - t0
        self.num_compiles += 1
        self.compile_seconds += dt
        logger.debug("compiled %s in %.3f s", spec.describe(), dt)
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._requests.clear()
        self._grammars.clear()
