"""Load on a Triton model repository written by `tidar-export triton` (docs/TRITON.md).

Run with the Python of the Triton environment (it has tritonclient; see .ci/run), against a
tritonserver already serving MODEL_REPO on loopback:

    $TIDAR_TRITON_ENV/bin/python benchmarks/triton_load.py --repo MODEL_REPO --grpc 127.0.0.1:8001 \
        --metrics http://127.0.0.1:8002 --concurrency 1,2,3,6 --requests 12 --max-tokens 32 [--direct]

For each concurrency C, C client threads take the same R greedy streaming requests (Python
prompts, round robin) off one queue, each over its own gRPC stream, and the script reports
tokens/s over the wall time, time to first response (TTFT) and the gap between two responses
of one request (p50/p99), tokens per response, and from the model's metrics the rows decoded
per batched pass. --direct runs the same load on the serving engine in-process (the runtime
and artifact inside MODEL_REPO, with the intra-op threads of its config.pbtxt), without
Triton, to show what the server adds. Bounded: R requests per level, then it stops. Nothing
here is a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n",
           "    for i in range(10):\n", "def read_config(path):\n", "    if not os.path.isdir(path):\n"]


def grpc_request(url: str, model: str, prompt: str, max_tokens: int) -> list[tuple[float, int]]:
    """(seconds since the request was sent, tokens) of every response of one streaming request."""
    import tritonclient.grpc as grpcclient

    arrays = {"text_input": (np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              "max_tokens": (np.array([max_tokens], dtype=np.int32), "INT32"),
              "stream": (np.array([True]), "BOOL")}
    inputs = []
    for name, (arr, kind) in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), kind)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    got: queue.Queue = queue.Queue()
    out = []
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))
        t0 = time.perf_counter()
        client.async_stream_infer(model, inputs)
        while True:
            t, result, error = got.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            out.append((t - t0, int(result.as_numpy("output_ids").size)))
            if result.as_numpy("finish_reason") is not None:
                break
        client.stop_stream()
    return out


def direct_runner(repo: Path, model: str):
    """A request function over the engine in-process (the repository's own runtime and artifact)."""
    version = repo / model / "1"
    sys.path.insert(0, str(version))
    from tidar_runtime.engine import open_engine

    config = (repo / model / "config.pbtxt").read_text()
    param = lambda k: re.search(rf'key: "{k}" value {{ string_value: "([^"]*)" }}', config).group(1)  # noqa: E731
    kwargs = {"intra_op_threads": int(param("intra_op_threads"))} if param("backend") == "ort" else {}
    engine = open_engine(version / param("artifact"), backend=param("backend"), mode=param("mode"),
                         max_queue=1024, **kwargs)

    def run(prompt: str, max_tokens: int) -> list[tuple[float, int]]:
        t0, out = time.perf_counter(), []
        for ev in engine.submit(prompt, max_tokens=max_tokens):
            out.append((time.perf_counter() - t0, len(ev.tokens)))
        return out

    return run, engine


def metric(url: str | None, name: str) -> float | None:
    if url is None:
        return None
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def level(run, concurrency: int, requests: int, max_tokens: int) -> dict:
    work: queue.Queue = queue.Queue()
    for i in range(requests):
        work.put(PROMPTS[i % len(PROMPTS)])
    traces, errors = [], []

    def client():
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            try:
                traces.append(run(prompt, max_tokens))
            except Exception as e:  # noqa: BLE001 (counted and printed)
                errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(n for tr in traces for _, n in tr)
    ttft = [tr[0][0] for tr in traces if tr]
    gaps = [b[0] - a[0] for tr in traces for a, b in zip(tr, tr[1:])]
    responses = sum(len(tr) for tr in traces)
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(traces), "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "gap_ms_p50": pct(gaps, 50), "gap_ms_p99": pct(gaps, 99),
            "tokens_per_response": round(tokens / max(1, responses), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help="the model repository tritonserver serves")
    p.add_argument("--model", default="tidar")
    p.add_argument("--grpc", default="127.0.0.1:8001")
    p.add_argument("--metrics", help="Triton's metrics URL, e.g. http://127.0.0.1:8002 (rows per pass)")
    p.add_argument("--concurrency", default="1,2,3,6")
    p.add_argument("--requests", type=int, default=12, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--direct", action="store_true", help="also run the load on the engine in-process")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    grpc = lambda prompt, n: grpc_request(args.grpc, args.model, prompt, n)  # noqa: E731
    grpc(PROMPTS[0], 4)  # warm-up
    rows = []
    for c in levels:
        s0, r0 = metric(args.metrics, "tidar_steps_total"), metric(args.metrics, "tidar_row_steps_total")
        row = {"path": "triton-grpc", **level(grpc, c, args.requests, args.max_tokens)}
        if s0 is not None:
            steps = metric(args.metrics, "tidar_steps_total") - s0
            row["rows_per_pass"] = round((metric(args.metrics, "tidar_row_steps_total") - r0) / max(1, steps), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.direct:
        run, engine = direct_runner(args.repo, args.model)
        run(PROMPTS[0], 4)
        for c in levels:
            s = engine.snapshot()
            row = {"path": "engine-in-process", **level(run, c, args.requests, args.max_tokens)}
            e = engine.snapshot()
            row["rows_per_pass"] = round((e.row_steps - s.row_steps) / max(1, e.steps - s.steps), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.close()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| path | concurrency | tokens/s | TTFT p50 / p99 ms | response gap p50 / p99 ms | tokens/response | rows/pass |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['concurrency']} | {r['tokens_per_s']} | {r['ttft_ms_p50']} / {r['ttft_ms_p99']} | "
              f"{r['gap_ms_p50']} / {r['gap_ms_p99']} | {r['tokens_per_response']} | {r.get('rows_per_pass', '-')} |")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "results": rows}, indent=2) + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
