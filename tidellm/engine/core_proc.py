"""The engine core in its own process: a busy loop between two ZMQ sockets.

Why a separate process: the model's forward pass holds the GIL for long stretches; in the API process it
would stall HTTP handling, tokenization and SSE writes. Here, three threads share the work:

* the input thread receives messages and decodes them onto a queue;
* the main thread drains that queue (add / abort), then runs ``EngineCore.step()`` while anything is
  unfinished, or blocks on the queue when idle;
* the output thread encodes each step's batched outputs and sends them.

Start-up: the process connects, builds the ``EngineCore`` (loads weights, sizes the KV cache), then sends
READY with the numbers the API process needs, or ERROR with a one-line reason. It dies with its parent
(``PR_SET_PDEATHSIG`` where available, plus a watchdog on the parent pid), ignores Ctrl-C (the parent
decides when to stop) and exits cleanly on SHUTDOWN or SIGTERM.

Run as ``python -m tidellm.engine.core_proc`` by :mod:`tidellm.engine.core_client`.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from typing import Any

import zmq

from tidellm.engine import serial
from tidellm.engine.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 0.5
_IDLE_WAIT_S = 1.0
_STOP = object()  # sentinel on the output queue


def _die_with_parent(parent_pid: int, use_prctl: bool, socket_dir: str | None) -> None:
    """Make sure this process never outlives the API process, even if that one is SIGKILLed.

    The kernel sends SIGTERM when the parent dies (``PR_SET_PDEATHSIG``); the watchdog thread notices the
    new parent pid within half a second either way, removes the socket folder the dead parent can no
    longer clean up, and exits at once, even if the main thread is inside a long step.
    """

    def leave() -> None:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        os._exit(1)

    if use_prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except OSError:
            logger.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        leave()

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                logger.error("The API process (pid %d) is gone; the engine process exits.", parent_pid)
                leave()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _socket_dir(address: str) -> str | None:
    """The private folder of an ``ipc://`` address made by the core client (never anything else)."""
    if not address.startswith("ipc://"):
        return None
    folder = os.path.dirname(address.removeprefix("ipc://"))
    return folder if os.path.basename(folder).startswith("tidellm-") else None


class EngineCoreProc:
    """Owns the sockets and threads around one ``EngineCore``."""

    def __init__(self, input_addr: str, output_addr: str) -> None:
        self.ctx = zmq.Context()
        self.output_sock = self.ctx.socket(zmq.PUSH)
        self.output_sock.connect(output_addr)
        self.input_sock = self.ctx.socket(zmq.PULL)
        self.input_sock.connect(input_addr)
        self.in_q: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self.out_q: queue.Queue[Any] = queue.Queue()
        self.in_codec = serial.input_codec()
        self.out_codec = serial.output_codec()
        self.core: Any = None
        self._stop = False
        self._stats_dirty = False

    # ------------------------------------------------------------------ start-up
    def start_engine(self, config: Any) -> bool:
        """Build the engine core and send READY, or ERROR if it cannot start (bad model, no memory...)."""
        from tidellm.engine.core import EngineCore

        try:
            self.core = EngineCore(config)
        except Exception as e:
            # User-fixable errors (ValueError family) carry their own message; anything else gets a traceback.
            if not isinstance(e, (ValueError, OSError)):
                logger.exception("Engine start-up failed")
            self.output_sock.send_multipart(
                self.out_codec.encode(serial.ERROR, serial.EngineError(str(e) or type(e).__name__, True))
            )
            return False
        plan = self.core.runner.kv_plan
        ready = serial.EngineReady(
            pid=os.getpid(),
            max_model_len=self.core.max_model_len,
            num_kv_blocks=plan.num_blocks,
            block_size=plan.block_size,
            kv_cache_bytes=plan.total_bytes,
            model_description=self.core.source.description,
            dtype=str(plan.dtype).removeprefix("torch."),
            device=str(plan.device),
            startup_seconds=self.core.startup_seconds,
        )
        self.output_sock.send_multipart(self.out_codec.encode(serial.READY, ready))
        return True

    # ------------------------------------------------------------------ threads
    def _input_loop(self) -> None:
        while True:
            try:
                frames = self.input_sock.recv_multipart(copy=True)
            except zmq.ZMQError:
                return  # context terminated
            try:
                self.in_q.put(self.in_codec.decode(frames))
            except Exception as e:  # a bad message must not kill the engine
                logger.error("Dropping an undecodable message: %s", e)

    def _output_loop(self) -> None:
        while True:
            item = self.out_q.get()
            if item is _STOP:
                return
            kind, payload = item
            self.output_sock.send_multipart(self.out_codec.encode(kind, payload), copy=False)

    # ------------------------------------------------------------------ main loop
    def request_shutdown(self) -> None:
        """Safe from a signal handler: only sets a flag the loop checks at least once a second."""
        self._stop = True

    def _handle(self, kind: bytes, payload: Any) -> None:
        if kind == serial.ADD:
            self._add(payload)
        elif kind == serial.ABORT:
            self.core.abort_requests(payload)
            self._stats_dirty = True
        elif kind == serial.SHUTDOWN:
            self._stop = True

    def _add(self, requests: list[EngineCoreRequest]) -> None:
        failed = []
        for req in requests:
            try:
                self.core.add_request(req)
            except Exception as e:  # never leave the client waiting for a request the core refused
                logger.error("Request %s refused by the engine core: %s", req.request_id, e)
                failed.append(
                    EngineCoreOutput(
                        req.request_id, [], finish_reason="abort", stop_reason=str(e), error=str(e)
                    )
                )
        if failed:
            self.out_q.put((serial.OUTPUTS, EngineCoreOutputs(outputs=failed, timestamp=time.time())))

    def _drain_inputs(self) -> None:
        busy = self.core.has_unfinished_requests()
        while not self._stop:
            try:
                if busy:
                    kind, payload = self.in_q.get_nowait()
                else:
                    kind, payload = self.in_q.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                if busy or self._stats_dirty:
                    return
                continue
            self._handle(kind, payload)
            busy = True  # got something: drain the rest without blocking, then step

    def run_busy_loop(self) -> None:
        while not self._stop:
            self._drain_inputs()
            if self._stop:
                break
            if self.core.has_unfinished_requests() or self._stats_dirty:
                # An idle step returns no outputs but fresh stats (e.g. KV usage back to 0 after an abort).
                self._stats_dirty = False
                self.out_q.put((serial.OUTPUTS, self.core.step()))

    def run(self) -> int:
        threading.Thread(target=self._input_loop, name="engine-input", daemon=True).start()
        out_thread = threading.Thread(target=self._output_loop, name="engine-output", daemon=True)
        out_thread.start()
        code = 0
        try:
            self.run_busy_loop()
            logger.debug("Engine core shutting down")
        except Exception as e:
            logger.exception("Engine core crashed")
            self.out_q.put(
                (serial.ERROR, serial.EngineError(f"The engine core crashed: {type(e).__name__}: {e}"))
            )
            code = 1
        self.out_q.put(_STOP)
        out_thread.join(timeout=5.0)
        try:
            self.core.shutdown()
        except Exception:
            logger.debug("core shutdown failed", exc_info=True)
        return code

    def close(self) -> None:
        self.output_sock.close(linger=1000)
        self.input_sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="tidellm engine-core process (started by the API server).")
    p.add_argument("--input", required=True, help="ZMQ address to receive requests on.")
    p.add_argument("--output", required=True, help="ZMQ address to send outputs to.")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--pdeathsig", action="store_true", help="Ask the kernel to kill us when the parent dies.")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    config_json = sys.stdin.buffer.read()

    from tidellm.config import EngineConfig
    from tidellm.logger import configure_logging

    _die_with_parent(args.parent_pid, args.pdeathsig, _socket_dir(args.input))
    configure_logging(args.log_level)
    config = serial.decode_config(config_json, EngineConfig)

    proc = EngineCoreProc(args.input, args.output)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent shuts us down
    signal.signal(signal.SIGTERM, lambda *_: proc.request_shutdown())
    code = 1
    try:
        if proc.start_engine(config):
            code = proc.run()
    finally:
        proc.close()
        if os.getppid() != args.parent_pid and (folder := _socket_dir(args.input)):
            shutil.rmtree(folder, ignore_errors=True)  # nobody else is left to remove it
        logging.shutdown()
    # Daemon threads may sit in blocking ZMQ calls; skip interpreter teardown (nothing left to flush).
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
