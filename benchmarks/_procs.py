"""Server processes for the side-by-side benchmark: launch, readiness probe, memory sampling, clean stop.

A server runs in its own session (process group), so a Ctrl-C in the terminal reaches only this script, which
then stops every server it started (SIGTERM to the server, a grace period, then SIGKILL to the whole tree).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

# Every server this script started and has not stopped yet: stop_all() ends them on any exit path.
_LIVE: list[Server] = []


class ServerError(RuntimeError):
    """A server did not start or died; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (no hard-coded ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


class MemoryMonitor(threading.Thread):
    """Samples the RSS of a process and all its descendants every ``interval`` seconds; keeps the peak.

    RSS counts shared pages (the model file mapped by two processes, pages shared after fork) once per
    process, so the sum can overstate the memory used; PSS splits shared pages between their users and is
    recorded beside it, sampled less often because reading it walks every page table."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 10) -> None:
        super().__init__(daemon=True, name=f"memory-monitor-{pid}")
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self._stop_event = threading.Event()
        self.samples = 0
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_breakdown: dict[str, int] = {}
        self.max_processes = 0
        self.last_rss = 0

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        procs = self._tree()
        with_pss = self.samples % self.pss_every == 0
        rss = pss = 0
        breakdown: dict[str, int] = {}
        for p in procs:
            try:
                if with_pss:
                    info = p.memory_full_info()
                    pss += getattr(info, "pss", 0)
                else:
                    info = p.memory_info()
                rss += info.rss
                key = f"{p.pid}:{p.name()}"
                breakdown[key] = info.rss
            except psutil.Error:  # exited between listing and reading
                continue
        self.samples += 1
        self.last_rss = rss
        self.max_processes = max(self.max_processes, len(procs))
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_breakdown = breakdown
        self.peak_pss = max(self.peak_pss, pss)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "peak_rss_mb": round(self.peak_rss / mb, 1),
            "peak_pss_mb": round(self.peak_pss / mb, 1),
            "peak_rss_by_process_mb": {k: round(v / mb, 1) for k, v in self.peak_breakdown.items()},
            "max_processes": self.max_processes,
            "memory_samples": self.samples,
            "sample_interval_s": self.interval,
        }


class Server:
    """One OpenAI-compatible server process: its command line, log, port and memory monitor."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: Mapping[str, str],
        log_path: Path,
        port: int,
        model_name: str,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = dict(env)
        self.log_path = log_path
        self.port = port
        self.model_name = model_name
        self.cwd = cwd
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.monitor: MemoryMonitor | None = None
        self.t_launch = 0.0
        self.rss_at_ready_mb: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 (owned by the child; closed after it exits)
        log.write(("$ " + " ".join(self.cmd) + "\n").encode())
        log.flush()
        self.t_launch = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        _LIVE.append(self)
        self.monitor = MemoryMonitor(self.proc.pid)
        self.monitor.start()

    def _probe(self) -> bool:
        """One ``POST /v1/completions`` with max_tokens 1; True when it answers 200 with a choice."""
        body = json.dumps(
            {"model": self.model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        ).encode()
        req = urllib.request.Request(
            self.base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from launch to the first successful completion; ServerError if it exits or times out."""
        assert self.proc is not None
        deadline = self.t_launch + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready.\n"
                    f"command: {' '.join(self.cmd)}\nlast lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            if self._probe():
                elapsed = time.perf_counter() - self.t_launch
                if self.monitor is not None:
                    self.monitor.sample()
                    self.rss_at_ready_mb = round(self.monitor.last_rss / (1024 * 1024), 1)
                return elapsed
            if time.perf_counter() > deadline:
                raise ServerError(
                    f"{self.name} did not answer a completion within {timeout_s:.0f} s.\n"
                    f"command: {' '.join(self.cmd)}\nlast lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> dict[str, Any]:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the server and every descendant still alive."""
        info: dict[str, Any] = {}
        if self.proc is None:
            return info
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
                info["stopped_by"] = "SIGTERM"
            except subprocess.TimeoutExpired:
                info["stopped_by"] = "SIGKILL"
            except ProcessLookupError:
                pass
        else:
            info["stopped_by"] = f"had exited ({self.proc.returncode})"
        # Whatever is left of the tree (grandchildren of a killed server, a stuck child) goes now.
        _, alive = psutil.wait_procs(children, timeout=max(0.0, grace_s - (time.perf_counter() - t0)))
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        info["exit_code"] = self.proc.returncode
        info["stop_s"] = round(time.perf_counter() - t0, 2)
        if alive:
            info["killed_leftover_children"] = len(alive)
        if self.monitor is not None:
            self.monitor.stop()
        if self in _LIVE:
            _LIVE.remove(self)
        return info


def stop_all() -> None:
    """Stop every server still running (called on exit, Ctrl-C and SIGTERM)."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):  # best effort on the way out
            server.stop(grace_s=10.0)
