"""Servers of their own: engine death, SIGTERM with requests in flight, `tidellm serve` with no arguments,
and start-up errors that must be one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_utils import ENGINE_ARGS, MODEL, REPO_ROOT, RemoteServer, children_of, free_port, pid_alive

ONE_LINE_ENV = {"TIDELLM_API_KEY": ""}


def _sse_events(resp: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_engine_death_503_and_nonzero_exit(tmp_path):
    template = tmp_path / "tpl.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    # The API key comes from the environment this time (the flag defaults to $TIDELLM_API_KEY).
    srv = RemoteServer(
        [MODEL, *ENGINE_ARGS, "--chat-template", str(template)], env={"TIDELLM_API_KEY": "env-key"}
    )
    auth = {"Authorization": "Bearer env-key"}
    try:
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "Hi"}).status_code == 401
        # --chat-template replaces the model's template.
        tok = httpx.post(
            srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=auth
        )
        detok = httpx.post(
            srv.url + "/detokenize", json={"tokens": tok.json()["tokens"]}, headers=auth
        ).json()
        assert detok["prompt"] == "<<Hi>>"

        engine_pid = srv.engine_pid
        events: list = []
        started = threading.Event()

        def long_stream() -> None:
            body = {"model": MODEL, "prompt": "Once", "max_tokens": 1900, "stream": True, "ignore_eos": True}
            with httpx.stream(
                "POST", srv.url + "/v1/completions", json=body, headers=auth, timeout=60
            ) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        started.set()
                        events.append(line[6:])

        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(60)
        os.kill(engine_pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        # The stream in flight ends with an error event, then [DONE].
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "engine_unavailable" and "engine" in err["message"].lower()

        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["message"]
        body = {"model": MODEL, "prompt": "Hi"}
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=auth, timeout=5)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"].lower()

        code = srv.proc.wait(30)
        assert code != 0, srv.log
        assert not pid_alive(engine_pid)
        assert "Traceback" not in srv.log
    finally:
        srv.stop(signal.SIGKILL)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_default_serve_and_graceful_sigterm():
    """`tidellm serve` with no arguments: default model on 127.0.0.1:8000. SIGTERM lets the request in
    flight finish, then the server exits 0 and leaves no process behind."""
    if not _port_free(8000):
        pytest.skip("port 8000 is busy")
    srv = RemoteServer([], port=8000, env=ONE_LINE_ENV)
    try:
        reported = srv.reported_startup_seconds()
        print(
            f"\n`tidellm serve` (no arguments) ready in {srv.startup_seconds:.1f} s (server says {reported} s)"
        )
        assert reported is not None and "smollm2-135m" in srv.log
        models = httpx.get(srv.url + "/v1/models").json()
        assert models["data"][0]["id"] == MODEL
        engine_pid = srv.engine_pid

        body = {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 48,
            "stream": True,
            "ignore_eos": True,
        }
        result: dict = {}
        first = threading.Event()

        def run() -> None:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as resp:
                events = []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        first.set()
                        events.append(line[6:])
                result["events"] = events

        t = threading.Thread(target=run)
        t.start()
        assert first.wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(srv.url + "/health", timeout=2)
        t.join(120)
        events = result["events"]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0, srv.log
        assert not pid_alive(engine_pid) and not children_of(srv.proc.pid)
    finally:
        srv.stop(signal.SIGKILL)


def _serve(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tidellm.entrypoints.cli.main", "serve", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ONE_LINE_ENV},
    )


def test_port_in_use_is_one_line():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        t0 = time.monotonic()
        res = _serve([MODEL, "--port", str(port)])
    assert res.returncode == 1
    assert "already in use" in res.stderr and str(port) in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30  # fails before loading the model


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["--dtype", "float64"], "invalid choice", 2),
        (["--max-num-seqs", "0"], "max_num_seqs", 1),
        (["--chat-template", "/no/such/file.jinja"], "chat-template", 1),
        (["--port", "70000"], "port", 1),
    ],
)
def test_bad_flags_are_one_line(args, needle, code):
    res = _serve(args)
    assert res.returncode == code
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_engine_startup_error_is_one_line():
    res = _serve([MODEL, "--dtype", "float32", "--max-model-len", "100000", "--port", str(free_port())])
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert any("max_model_len" in line for line in errors), res.stderr


def test_engine_dies_with_a_killed_server():
    """SIGKILL gives the server no chance to clean up; the engine process must still not outlive it."""
    srv = RemoteServer([MODEL, *ENGINE_ARGS], env=ONE_LINE_ENV)
    engine_pid = srv.engine_pid
    cmdline = Path(f"/proc/{engine_pid}/cmdline").read_bytes().decode().split("\0")
    socket_dir = Path(
        next(a for a in cmdline if a.startswith("--input=ipc://"))[len("--input=ipc://") :]
    ).parent
    assert socket_dir.is_dir()
    srv.proc.kill()
    srv.proc.wait(10)
    deadline = time.monotonic() + 10
    while (pid_alive(engine_pid) or socket_dir.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine_pid)
    assert not socket_dir.exists()  # the engine removed the ipc sockets its dead parent left behind
