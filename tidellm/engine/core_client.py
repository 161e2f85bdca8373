"""Clients of the engine-core process: start it, hand-shake, send requests, receive outputs, notice death.

The API server uses :class:`AsyncEngineCoreClient` from its event loop. The engine process is a
``python -m tidellm.engine.core_proc`` child (a fresh interpreter: no fork of a process holding threads and
sockets, nothing pickled); its config arrives as JSON on stdin and all traffic goes over two ``ipc://``
sockets in a private temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from tidellm.config import EngineConfig
from tidellm.engine import serial
from tidellm.engine.protocol import EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited unexpectedly with code {rc}"


class EngineStartupError(RuntimeError):
    """The engine process could not start; the message is the reason to show the user."""


class EngineDeadError(RuntimeError):
    """The engine process is gone; requests in flight fail and new ones are refused (HTTP 503)."""


class AsyncEngineCoreClient:
    """Talks to one engine-core process. Create it with :meth:`start`."""

    def __init__(
        self,
        proc: subprocess.Popen,
        ctx: zmq.asyncio.Context,
        input_sock: zmq.asyncio.Socket,
        output_sock: zmq.asyncio.Socket,
        tmpdir: str,
    ) -> None:
        self.proc = proc
        self._ctx = ctx
        self._input = input_sock
        self._output = output_sock
        self._tmpdir = tmpdir
        self._in_codec = serial.input_codec()
        self._out_codec = serial.output_codec()
        self.ready: serial.EngineReady | None = None
        self.dead_reason: str | None = None
        self._closing = False
        self._closed = False
        self._dead_callbacks: list[Callable[[str], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ start-up
    @classmethod
    async def start(
        cls, config: EngineConfig, *, startup_timeout: float = 600.0, log_level: str = "INFO"
    ) -> AsyncEngineCoreClient:
        """Spawn the engine process and wait for its READY (or its reason for failing)."""
        tmpdir = tempfile.mkdtemp(prefix="tidellm-")
        in_addr, out_addr = f"ipc://{tmpdir}/input", f"ipc://{tmpdir}/output"
        ctx = zmq.asyncio.Context()
        input_sock = ctx.socket(zmq.PUSH)
        input_sock.bind(in_addr)
        output_sock = ctx.socket(zmq.PULL)
        output_sock.bind(out_addr)
        cmd = [
            sys.executable,
            "-m",
            "tidellm.engine.core_proc",
            f"--input={in_addr}",
            f"--output={out_addr}",
            f"--parent-pid={os.getpid()}",
            f"--log-level={log_level}",
        ]
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only ask for it from the main thread.
        if threading.current_thread() is threading.main_thread():
            cmd.append("--pdeathsig")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        client = cls(proc, ctx, input_sock, output_sock, tmpdir)
        try:
            assert proc.stdin is not None
            proc.stdin.write(serial.encode_config(config))
            proc.stdin.close()
            client.ready = await client._handshake(startup_timeout)
        except BaseException:
            client.kill()
            raise
        client._loop = asyncio.get_running_loop()
        threading.Thread(target=client._watch_process, name="engine-watch", daemon=True).start()
        return client

    async def _handshake(self, timeout: float) -> serial.EngineReady:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._output.poll(100):
                kind, payload = self._out_codec.decode(await self._output.recv_multipart())
                if kind == serial.READY:
                    return payload
                if kind == serial.ERROR:
                    raise EngineStartupError(payload.message)
                continue
            rc = self.proc.poll()
            if rc is not None:
                raise EngineStartupError(
                    f"The engine process {_describe_exit(rc)} during start-up; see its log above."
                )
        raise EngineStartupError(
            f"The engine process did not report ready within {timeout:.0f} s; raise --engine-startup-timeout "
            "if loading this model takes longer."
        )

    # ------------------------------------------------------------------ death
    def on_dead(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs once in the event loop when the engine dies unexpectedly."""
        self._dead_callbacks.append(callback)

    def _watch_process(self) -> None:
        rc = self.proc.wait()
        if self._closing or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._mark_dead, f"The engine process {_describe_exit(rc)}.")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None or self._closing:
            return
        self.dead_reason = reason
        logger.error("%s", reason)
        for cb in self._dead_callbacks:
            try:
                cb(reason)
            except Exception:
                logger.exception("engine-dead callback failed")

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._closing:
            raise EngineDeadError("The engine is shutting down.")

    # ------------------------------------------------------------------ traffic
    async def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._check_alive()
        await self._input.send_multipart(self._in_codec.encode(serial.ADD, requests))

    async def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self.is_dead and not self._closing:
            await self._input.send_multipart(self._in_codec.encode(serial.ABORT, request_ids))

    async def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs. Raises :class:`EngineDeadError` if the engine reports a crash."""
        while True:
            kind, payload = self._out_codec.decode(await self._output.recv_multipart())
            if kind == serial.OUTPUTS:
                return payload
            if kind == serial.ERROR:
                self._mark_dead(payload.message)
                raise EngineDeadError(payload.message)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine to exit, wait up to ``timeout`` seconds, then kill it."""
        if self._closed:
            return
        self._closing = True
        if self.proc.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                await asyncio.wait_for(
                    self._input.send_multipart(self._in_codec.encode(serial.SHUTDOWN)), 1.0
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """Synchronous last resort: kill the process if it is still there and release sockets and files."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5.0)
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
