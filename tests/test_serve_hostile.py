"""`tidar-export serve` against hostile clients: every client error a 4xx naming the field, limits
enforced before any work, slow clients cut, nothing on the event loop, a drain on SIGTERM.

Real uvicorn on 127.0.0.1:0 (in a thread, with small limits so that the cases stay fast; one
`tidar-export serve` subprocess for the signals), real sockets, the demo model with 4 rows.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_mod, reason=f"the serve tests need {_mod}: pip install 'tidar-export[serve,test]'")

import httpx  # noqa: E402

from tests.serve_fixtures import demo_batch_artifact  # noqa: E402
from tidar_runtime.engine import open_engine  # noqa: E402
from tidar_runtime.request import MAX_STOP_CHARS  # noqa: E402
from tidar_runtime.server import Limits, bind, create_app, make_server  # noqa: E402

PROMPT = "def read_config(path):\n"
LIMITS = Limits(max_body_bytes=64 << 10, header_timeout_s=1.0, body_timeout_s=1.0, drain_timeout_s=1.0)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return demo_batch_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def server(art):
    engine = open_engine(art, max_queue=4)
    threads = set()
    real = engine.tokenizer.encode

    def encode(text, *a, **kw):  # records where prompts are tokenized
        threads.add(threading.current_thread().name)
        return real(text, *a, **kw)

    engine.tokenizer.encode = encode
    app = create_app(engine, "demo", limits=LIMITS)
    sock = bind("127.0.0.1", 0)
    srv = make_server(app, log_level="warning")
    log = Lines()
    logging.getLogger("uvicorn.error.tidar").addHandler(log)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="event-loop", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine, threads, log
    srv.should_exit = True
    thread.join(timeout=15)
    engine.close()
    sock.close()
    logging.getLogger("uvicorn.error.tidar").removeHandler(log)


def _port(url):
    return int(url.rsplit(":", 1)[1])


def _raw(url, data: bytes, read=True) -> bytes:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=20) as s:
        s.sendall(data)
        return _read_all(s) if read else b""


def _read_all(s) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("body,status,param,message", [
    ('{"prompt": "\\ud800 lone"}', 400, "prompt", "lone surrogate"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "no"}}, 400,
     "stream_options.include_usage", "must be true or false"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias", "not supported"),
    ({"prompt": "x", "stop": ["x" * (MAX_STOP_CHARS // 2 + 1)] * 2}, 400, "stop", f"at most {MAX_STOP_CHARS}"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 strings"),
    ({"prompt": "x", "max_tokens": 2 ** 70}, 400, "max_tokens", "at most 256"),
    ({"prompt": "x", "max_tokens": 257}, 400, "max_tokens", "at most 256"),
    ({"prompt": [5, 2 ** 70]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature", "must lie in"),
    ({"prompt": "x", "top_k": "4"}, 400, "top_k", "must be an integer"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "must lie in"),
    ({"prompt": "x " * 300}, 400, "prompt", "does not fit the KV cache"),
    ({"prompt": "x " * 30000}, 400, "prompt", "cannot fit the KV cache"),  # refused before tokenizing
], ids=lambda v: None if isinstance(v, (str, dict)) else str(v)[:24])
def test_client_errors_are_4xx_naming_the_json_field(server, body, status, param, message):
    url, *_ = server
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and "\n" not in err["message"], err
    assert err["message"].startswith(param), err  # named as the client sent it, never a command-line flag


def test_neutral_options_unknown_paths_and_the_body_limit(server):
    url, engine, *_ = server
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "logit_bias": {"5": 0},
                                                   "n": 1, "presence_penalty": 0}, timeout=60)
    assert ok.status_code == 200, ok.text  # neutral values of unimplemented options are accepted
    for method, path, status in (("GET", "/v2/nothing", 404), ("GET", "/v1/completions", 405)):
        r = httpx.request(method, f"{url}{path}", timeout=30)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", r.text
    # a Content-Length over the limit: 413 before a byte of the body is sent (nothing read)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n")
    reply = _raw(url, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"over 65536 bytes" in reply
    # a chunked body without a length: cut at the limit
    big = json.dumps({"prompt": "x" * (LIMITS.max_body_bytes + 10)}).encode()
    r = httpx.post(f"{url}/v1/completions", content=iter([big[:40000], big[40000:]]), timeout=30)
    assert r.status_code == 413
    assert engine.snapshot().queue_depth == 0


def test_slow_headers_and_bodies_are_cut(server):
    url, *_ = server
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\n")  # then nothing: the headers never end
        t0 = time.monotonic()
        assert _read_all(s) == b""  # closed by the server (after header_timeout_s)
        assert time.monotonic() - t0 < 20
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"pro")  # a body that trickles
        reply = b""
        for _ in range(100):
            try:
                s.sendall(b" ")
            except OSError:
                break
            try:
                s.settimeout(0.3)
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            reply += chunk
            if not chunk or b"\r\n\r\n" in reply:
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply


def test_tokenizing_is_off_the_event_loop_and_a_disconnect_is_one_line(server):
    url, engine, threads, log = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    assert threads and all(t.startswith("tidar-parse") for t in threads), threads
    log.lines.clear()
    aborted = engine.snapshot().finished["abort"]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", _port(url))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    _wait(lambda: engine.snapshot().finished["abort"] == aborted + 1)
    _wait(lambda: engine.snapshot().active_rows == 0)
    assert len([line for line in log.lines if "went away" in line]) == 1, log.lines
    assert not [line for line in log.lines if "Traceback" in line or "Exception" in line]


def _sse(lines):
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_sigterm_drains_then_ends_open_streams_with_a_finish_chunk(art):
    """`serve --drain-timeout 0`: SIGTERM with a stream in flight ends it with a finish_reason
    chunk and [DONE]; the command exits 143 with one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tidar_export", "serve", str(art), "--port", "0",
                             "--drain-timeout", "0"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", proc.stderr.readline())
        assert m
        url = f"http://127.0.0.1:{m.group(1)}"
        _wait(lambda: _health(url), timeout=60)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = _sse(lines)
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] in ("abort", "length")
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == "tidar-export serve: terminated (SIGTERM)"
    assert "Traceback" not in err


def _health(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
