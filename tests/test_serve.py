"""`tidar-export serve`: real HTTP on a loopback port against the demo model exported with 4 rows.

A uvicorn server on a socket bound to 127.0.0.1:0, in a thread of the test process (one
`tidar-export serve` subprocess is tested too). Every response is checked against the decode
loop run directly on the same artifact.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

for _mod, _why in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus_client"),
                   ("httpx", "httpx")):
    pytest.importorskip(_mod, reason=f"the serve tests need {_why}: pip install 'tidar-export[serve,test]'")

import httpx  # noqa: E402

from tests.serve_fixtures import BATCH, demo_batch_artifact, serving  # noqa: E402
from tidar_runtime import SamplingParams, generate_tidar  # noqa: E402
from tidar_runtime.backends.ort import OrtBackend  # noqa: E402
from tidar_runtime.engine import open_engine  # noqa: E402
from tidar_runtime.server import bind, create_app  # noqa: E402
from tidar_runtime.tokenizer import folder_tokenizer  # noqa: E402

MODEL = "demo-b4"
PROMPT = "def read_config(path):\n"
EOS = 0
MAX_QUEUE = 1


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return demo_batch_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(art):
    """Greedy / seeded decoding of a prompt alone, by the loop on its own backend."""
    backend, tok = OrtBackend(art), folder_tokenizer(art)

    def run(prompt, n, params=SamplingParams()):
        return generate_tidar(backend, tok.encode(prompt).ids, n, params, stop_tokens=[EOS]).tokens

    run.tok = tok
    return run


@pytest.fixture(scope="module")
def server(art):
    engine = open_engine(art, max_queue=MAX_QUEUE)
    with serving(create_app(engine, MODEL)) as url:
        yield url, engine
    engine.close()


def _post(url, body, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def _sse(lines) -> list:
    """The data payloads of an event stream ([DONE] as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _idle(engine):
    _wait(lambda: engine.snapshot().active_rows == 0 and engine.snapshot().queue_depth == 0)


def test_health_models_and_metrics(server):
    url, engine = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]

    def metric(text, name):
        m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    before = httpx.get(f"{url}/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    r = _post(url, {"prompt": PROMPT, "max_tokens": 9, "temperature": 0}).json()
    after = httpx.get(f"{url}/metrics").text
    gen0 = metric(before.text, "tidar_tokens_generated_total") or 0.0
    assert metric(after, "tidar_tokens_generated_total") - gen0 == r["usage"]["completion_tokens"] == 9
    assert metric(after, "tidar_batch_rows") == BATCH
    assert metric(after, "tidar_queue_depth") == 0 and metric(after, "tidar_active_rows") == 0
    assert metric(after, 'tidar_requests_total{finish_reason="length"}') >= 1
    assert metric(after, 'tidar_forwards_total{kind="step"}') >= 1
    assert metric(after, "tidar_tokens_per_forward_count") >= 1 and "tidar_step_seconds_bucket" in after
    assert "tidar_time_to_first_token_seconds_count" in after


def test_completion_equals_the_loop_alone(server, reference):
    url, _ = server
    r = _post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    want = reference(PROMPT, 20)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert choice["token_ids"] == want and choice["text"] == reference.tok.decode(want)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    prompt_len = len(reference.tok.encode(PROMPT).ids)
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 20, "total_tokens": prompt_len + 20}
    ids = _post(url, {"prompt": reference.tok.encode(PROMPT).ids, "max_tokens": 20, "temperature": 0}).json()
    assert ids["choices"][0]["token_ids"] == want  # a prompt of token ids


def test_streaming_equals_non_streaming(server, reference):
    url, _ = server
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24
    assert len(chunks) > 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    want = reference(PROMPT, 24)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference.tok.decode(want)


def test_stop_sequences(server, reference):
    url, _ = server
    full = reference.tok.decode(reference(PROMPT, 30))
    stop = full[14:17]
    cut = full.find(stop)
    assert cut > 0
    r = _post(url, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [stop, "@@never@@"]}).json()
    assert r["choices"][0]["text"] == full[:cut] and r["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": stop, "stream": True}) as s:
        chunks = _sse(s.iter_lines())[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server, reference):
    url, _ = server
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 5}
    a, b = (_post(url, body).json()["choices"][0]["token_ids"] for _ in range(2))
    assert a == b == reference(PROMPT, 16, SamplingParams(0.9, 40, 0.95, seed=5))
    assert _post(url, {**body, "seed": 6}).json()["choices"][0]["token_ids"] != a


def test_openai_client(server, reference):
    openai = pytest.importorskip("openai", reason="the OpenAI client test needs openai: pip install openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    want = reference.tok.decode(reference(PROMPT, 12))
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == 12
    parts = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts if p.choices) == want


@pytest.mark.parametrize("body,status,message", [
    (b'{"prompt": "x", ', 400, "invalid JSON body"),
    (b'[1, 2]', 400, "must be a JSON object"),
    ({"max_tokens": 3}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "prompt must be a non-empty string"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature must lie in [0.0, 2.0]"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature must lie in"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p must lie in (0.0, 1.0]"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p must lie in"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k must be an integer >= -1"),
    ({"prompt": "x", "seed": -1}, 400, "seed must lie in"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 strings"),
    ({"prompt": "x", "stop": [""]}, 400, "stop strings must be non-empty"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "x", "n": 2}, 400, "n is not supported (got 2"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs is not supported (got 3"),
    ({"prompt": list(range(2, 300))}, 400, "does not fit the KV cache of 256 slots"),
    ({"prompt": [5, 99999]}, 400, "token id 99999 is outside the vocabulary (0..4095)"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
], ids=lambda v: None if isinstance(v, (bytes, dict)) else str(v)[:24])
def test_bad_requests(server, body, status, message):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = _post(url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"], err
    assert _post(url, {"prompt": "x", "max_tokens": 2, "temperature": 0}).status_code == 200  # still serving


def test_client_disconnect_aborts_and_frees_the_row(server, reference):
    url, engine = server
    _idle(engine)
    aborted = engine.snapshot().finished["abort"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 150, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["token_ids"]
        assert engine.snapshot().active_rows == 1
    # the stream is closed: the server aborts the request and frees its row
    _wait(lambda: engine.snapshot().finished["abort"] == aborted + 1)
    _idle(engine)
    # a non-streaming request whose client goes away before the answer
    body = json.dumps({"prompt": PROMPT, "max_tokens": 150, "temperature": 0}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        _wait(lambda: engine.snapshot().active_rows == 1)
    _wait(lambda: engine.snapshot().finished["abort"] == aborted + 2)
    _idle(engine)
    assert _post(url, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}).json()["choices"][0]["token_ids"] == \
        reference(PROMPT, 10)


def test_full_queue_answers_503_with_retry_after(server):
    url, engine = server
    _idle(engine)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": PROMPT, "max_tokens": 150, "temperature": 0, "stream": True}).encode()
    socks = []
    try:
        for k in range(BATCH + MAX_QUEUE):  # every row busy, then the queue full
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            socks.append(s)
            if k < BATCH:
                _wait(lambda: engine.snapshot().active_rows == k + 1)
        _wait(lambda: engine.snapshot().queue_depth == MAX_QUEUE)
        r = _post(url, {"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queue is full" in r.json()["error"]["message"]
    finally:
        for s in socks:
            s.close()
    _idle(engine)  # every disconnected client's request aborted, rows freed
    assert _post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).status_code == 200


def test_serve_command(art, reference, tmp_path):
    """`tidar-export serve ARTIFACT --port 0`: prints where it listens, answers, stops cleanly on SIGTERM
    (one line, status 143)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tidar_export", "serve", str(art), "--port", "0", "--mode", "ar",
                             "--max-queue", "3"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        _wait(lambda: _ok(f"{url}/health"), timeout=60)
        r = _post(url, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}).json()
        assert r["choices"][0]["token_ids"] == reference(PROMPT, 10)  # AR mode: the same greedy tokens
        assert r["model"] == art.name
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 128 + signal.SIGTERM and proc.stderr.read().strip().endswith("terminated (SIGTERM)")
    taken = bind("127.0.0.1", 0)
    try:
        out = subprocess.run([sys.executable, "-m", "tidar_export", "serve", str(art), "--port",
                              str(taken.getsockname()[1])], capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert out.returncode == 1 and out.stderr.strip().startswith("error: cannot listen on 127.0.0.1:")
    assert len(out.stderr.strip().splitlines()) == 1


def _ok(url) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
