"""`tidar-export triton`: the model repository, and a real tritonserver serving it on CPU.

The server tests need the Triton environment that .ci/run makes and names in
TIDAR_TRITON_ENV: a venv with nvidia-pytriton==0.7.0 (tritonserver 2.51 with the Python
backend and its stubs), numpy<2 (the stub's numpy), onnxruntime and tokenizers. Without it
they skip with the reason. The repository tests below need no server.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tidar_export.bench.demo import demo_model_path
from tidar_export.cli import main
from tidar_export.export.artifact import export_artifact
from tidar_export.serving.triton import MARKER, write_repository

pytestmark = pytest.mark.slow  # one export of the demo model and one server start, ~1 min in all

ENV_VAR = "TIDAR_TRITON_ENV"
CLIENT = Path(__file__).with_name("triton_client.py")
MAX_BATCH = 3
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n",
           "    for i in range(10):\n", "def read_config(path):\n"]
MAX_TOKENS = 20


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The demo model exported with a batch of 3 rows (more prompts than rows: some wait)."""
    return export_artifact(demo_model_path(), tmp_path_factory.mktemp("triton") / "art", block_size=4,
                           max_seq_len=96, max_batch=MAX_BATCH)


def _generate(art, prompt, *extra) -> dict:
    rc, out, err = _cli(["generate", art, "--prompt", prompt, "--max-new-tokens", MAX_TOKENS, "--json", *extra])
    assert rc == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------ the repository


def test_repository_layout_config_and_refusals(artifact, tmp_path):
    repo = tmp_path / "my repo"  # a space: the printed command quotes the path
    rc, out, err = _cli(["triton", artifact, "-o", repo, "--name", "td", "--instances", "2", "--threads", "1"])
    assert rc == 0, err
    version = repo / "td" / "1"
    assert (version / "model.py").is_file() and (version / "tidar_runtime" / "engine.py").is_file()
    for f in ("manifest.json", "tokenizer.json", "step.onnx", "weights.bin"):
        assert (version / "artifact" / f).stat().st_size == (artifact / f).stat().st_size, f
        # copies, not hard links: the onnx package refuses external data with a second link
        assert (artifact / f).stat().st_nlink == 1 and (version / "artifact" / f).stat().st_nlink == 1, f
    config = (repo / "td" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and 'backend: "python"' in config
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
    for name in ("text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "random_seed",
                 "stop_words", "text_output", "output_ids"):
        assert f'name: "{name}"' in config, name
    readme = (repo / "README.md").read_text()
    assert f"tritonserver --model-repository '{repo.resolve()}'" in out and "tritonserver --model-repository" in readme
    assert shlex.split(out.splitlines()[-1])[2] == str(repo.resolve())

    # GPU backends get GPU instances; a rerun replaces a repository written here
    rc, _, err = _cli(["triton", artifact, "-o", repo, "--backend", "ort-cuda"])
    assert rc == 0, err
    assert not (repo / "td").exists()
    assert "kind: KIND_GPU" in (repo / "tidar" / "config.pbtxt").read_text()

    # refusals: one line each, nothing written
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    cases = [(["-o", other], "is not empty and not a model repository"),
             (["-o", tmp_path / "t", "--backend", "trt"], "no TensorRT engine for prefill, step"),
             (["-o", tmp_path / "n", "--name", "a/b"], "--name"),
             (["-o", tmp_path / "i", "--instances", "0"], "--instances must be at least 1")]
    for extra, message in cases:
        rc, _, err = _cli(["triton", artifact, *extra])
        assert rc == 1 and message in err and err.count("\n") == 1, (extra, err)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert not any((tmp_path / n).exists() for n in ("t", "n", "i"))
    rc, _, err = _cli(["triton", tmp_path / "missing", "-o", tmp_path / "m"])
    assert rc == 1 and "artifact directory not found" in err
    assert json.loads((repo / MARKER).read_text())["backend"] == "ort-cuda"


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def triton_env():
    """(python, tritonserver dir, environment variables for the server) or a skip."""
    root = os.environ.get(ENV_VAR)
    if not root:
        pytest.skip(f"{ENV_VAR} is not set: .ci/run makes the Triton environment (a venv with "
                    "nvidia-pytriton==0.7.0 and numpy<2) and sets it")
    python = Path(root) / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{ENV_VAR}={root} has no bin/python")
    probe = subprocess.run(
        [python, "-c", "import json, sys, sysconfig, numpy, tritonclient.grpc, pytriton, onnxruntime, tokenizers; "
                       "from pathlib import Path; print(json.dumps([sys.version_info[:2], sysconfig.get_config_var("
                       "'LIBDIR'), numpy.__version__, str(Path(pytriton.__file__).parent)]))"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"{ENV_VAR}={root} is incomplete (pip install nvidia-pytriton==0.7.0 'numpy<2' onnxruntime "
                    f"tokenizers): {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else '?'}")
    (major, minor), libdir, numpy_version, pytriton_dir = json.loads(probe.stdout)
    if int(numpy_version.split(".")[0]) >= 2:
        pytest.skip(f"{ENV_VAR} has numpy {numpy_version}: the Python backend stub of tritonserver 2.51 needs numpy<2")
    server = Path(pytriton_dir) / "tritonserver"
    stub = server / "python_backend_stubs" / f"{major}.{minor}" / "triton_python_backend_stub"
    if not (server / "bin" / "tritonserver").is_file() or not stub.is_file():
        pytest.skip(f"no tritonserver or Python {major}.{minor} stub in {server}")
    env = dict(os.environ)
    env["PATH"] = f"{Path(root) / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # the stub's Python: the venv's
    # the stub links libpython (LIBDIR: a pyenv build keeps it there) and the wheel's bundled libraries
    libs = [libdir, str(Path(pytriton_dir).parent / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env.pop("PYTHONPATH", None)
    return python, server, stub, env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def server(triton_env, artifact, tmp_path_factory):
    """tritonserver on free loopback ports over a repository written by `tidar-export triton`;
    stopped by its pid at the end. Yields (http base, grpc address, log path)."""
    python, server_dir, stub, env = triton_env
    root = tmp_path_factory.mktemp("triton-server")
    repo = write_repository(artifact, root / "repo", threads=1)
    backends = root / "backends" / "python"  # the wheel's Python backend with the stub beside it
    backends.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server_dir / "backends" / "python" / f, backends / f)
    shutil.copy2(stub, backends / "triton_python_backend_stub")
    http_port, grpc_port, metrics_port = _free_ports(3)
    log = root / "server.log"
    cmd = [server_dir / "bin" / "tritonserver", "--model-repository", repo, "--backend-directory", backends.parent,
           "--http-address", "127.0.0.1", "--http-port", http_port, "--grpc-address", "127.0.0.1",
           "--grpc-port", grpc_port, "--metrics-address", "127.0.0.1", "--metrics-port", metrics_port,
           "--exit-on-error", "false", "--exit-timeout-secs", "10"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v2/models/tidar/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}", log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sse_events(url: str, body: dict) -> list[dict]:
    """The `data:` events of Triton's generate_stream endpoint, read as they arrive."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    events = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
    conn.close()
    return events


def _ids(value) -> list[int]:
    return value if isinstance(value, list) else [value]


def _grpc(triton_env, address: str, requests: list[dict]) -> list[dict]:
    python, _, _, env = triton_env
    run = subprocess.run([python, CLIENT, address, "tidar", "120"], input=json.dumps(requests),
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _metric(metrics_url: str, name: str, label: str = "") -> float:
    """The sum of a metric's series on Triton's /metrics (those whose labels contain `label`)."""
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = [float(m.group(2)) for m in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M) if label in m.group(1)]
    assert found, f"{name} not in /metrics"
    return sum(found)


def test_http_generate_stream_equals_tidar_export_generate(server, artifact):
    """Streamed text over HTTP generate_stream == `tidar-export generate` (greedy), in several
    pieces; the non-streaming generate endpoint gives the same in one response; stop_words
    cut the text before the stop string."""
    base, _, _, _ = server
    ref = _generate(artifact, PROMPTS[0])
    events = _sse_events(f"{base}/v2/models/tidar/generate_stream",
                         {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "stream": True})
    assert len(events) > 2 and all("error" not in e for e in events), events
    assert "".join(e["text_output"] for e in events) == ref["text"]
    assert [i for e in events for i in _ids(e["output_ids"])] == ref["token_ids"]
    assert events[-1]["finish_reason"] == ref["finish_reason"]
    assert all("finish_reason" not in e for e in events[:-1])

    status, body = _post(f"{base}/v2/models/tidar/generate", {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert status == 200, body
    whole = json.loads(body)
    assert whole["text_output"] == ref["text"] and _ids(whole["output_ids"]) == ref["token_ids"]

    text = ref["text"]  # a stop string from the middle of the output: its first 3 characters that are not all blank
    stop = next((text[i:i + 3] for i in range(len(text) // 2, len(text) - 2) if text[i:i + 3].strip()), "")
    assert stop.strip(), ref["text"]
    status, body = _post(f"{base}/v2/models/tidar/generate",
                         {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "stop_words": [stop]})
    cut = json.loads(body)
    assert status == 200 and cut["finish_reason"] == "stop", body
    assert cut["text_output"] == ref["text"][: ref["text"].find(stop)]


def test_grpc_concurrent_streams_equal_their_solo_runs_and_share_steps(server, artifact, triton_env):
    """More concurrent gRPC streams than batch rows, greedy and seeded sampling mixed: each
    equals `tidar-export generate` of its prompt alone; the engine decoded several rows per
    batched pass (Triton's /metrics, the model's own counters)."""
    _, grpc_address, metrics_url, _ = server
    steps0, rows0 = _metric(metrics_url, "tidar_steps_total"), _metric(metrics_url, "tidar_row_steps_total")
    greedy = [{"text_input": p, "max_tokens": MAX_TOKENS, "stream": True} for p in PROMPTS]
    seeded = {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0.8,
              "random_seed": 7}
    aborts0 = _metric(metrics_url, "tidar_requests_finished_total", 'reason="abort"')
    cancelled = {"text_input": PROMPTS[3], "max_tokens": 60, "stream": True, "cancel_after": 2}
    results = _grpc(triton_env, grpc_address, greedy + [seeded, seeded, cancelled])
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    assert results[-1]["finish_reason"] == "cancelled" and len(results[-1]["ids"]) < 60
    results.pop()
    for prompt, r in zip(PROMPTS, results):
        ref = _generate(artifact, prompt)
        assert "".join(r["pieces"]) == ref["text"] and r["ids"] == ref["token_ids"], prompt
        assert r["finish_reason"] == ref["finish_reason"] and len(r["pieces"]) > 1
    sample = _generate(artifact, PROMPTS[1], "--temperature", "0.8", "--seed", "7")
    for r in results[-2:]:
        assert "".join(r["pieces"]) == sample["text"] and r["ids"] == sample["token_ids"]
    steps, rows = _metric(metrics_url, "tidar_steps_total") - steps0, _metric(metrics_url, "tidar_row_steps_total") - rows0
    assert steps > 0 and rows / steps > 1.5, (steps, rows)  # 8 requests on 3 rows: most passes were shared
    # the cancelled stream was aborted (not decoded to its 60 tokens) and every row is free again
    deadline = time.monotonic() + 30
    while _metric(metrics_url, "tidar_active_rows") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(metrics_url, "tidar_active_rows") == 0
    assert _metric(metrics_url, "tidar_requests_finished_total", 'reason="abort"') == aborts0 + 1


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(server, artifact, triton_env):
    base, grpc_address, _, log = server
    bad = [({"text_input": "x", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
           ({"text_input": "x", "temperature": -1.0}, "temperature must be 0 (greedy) or in"),
           ({"text_input": "x", "sampling_parameters": "{not json"}, "sampling_parameters is not valid JSON"),
           ({"text_input": "x", "sampling_parameters": json.dumps({"beam_width": 4})}, "unsupported key(s) beam_width"),
           ({"text_input": ""}, "text_input must be a non-empty string"),
           ({"text_input": "x " * 200}, "does not fit the KV cache")]
    for body, message in bad:
        status, text = _post(f"{base}/v2/models/tidar/generate", body)
        assert status == 400 and message in json.loads(text)["error"], (body, status, text)
    r = _grpc(triton_env, grpc_address, [{"text_input": "x", "max_tokens": 0, "stream": True}])[0]
    assert r["error"] is not None and "max_tokens must be an integer >= 1" in r["error"]
    ref = _generate(artifact, PROMPTS[2])
    status, text = _post(f"{base}/v2/models/tidar/generate", {"text_input": PROMPTS[2], "max_tokens": MAX_TOKENS})
    assert status == 200 and json.loads(text)["text_output"] == ref["text"]
    assert "Traceback" not in log.read_text()
