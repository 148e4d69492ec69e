"""Bounded load test of `tidar-export serve` on loopback (docs/SERVING.md).

Starts the server as a subprocess on a free 127.0.0.1 port, then:
1. solo pass: every distinct request (greedy, and sampled with a seed) alone, one at a time:
   the reference outputs;
2. load pass: C concurrent streaming clients, each sending R requests drawn from the same set,
   some aborting after a few chunks (closing the connection mid-stream).
Checks: every finished greedy and seeded output equals its solo output token for token, every
aborted one is a prefix of it, every request is answered exactly once, the server's RSS does
not grow over repeated load rounds (reported). Records throughput (generated tokens/s over the
load pass), time to first token and inter-token latency (gap between streamed chunks divided
over the tokens they carry) p50/p99. Stops by itself; prints one JSON line per run.

With `--hostile N`, each load round runs twice, without and then with N hostile clients on
loopback beside the normal ones, for as long as the round lasts (bounded: one connection each at
a time): headers sent a byte at a time, a body that trickles, a Content-Length of 20 MB, a body
at the size limit (a prompt of about 1 MiB that must be tokenized and refused), bad fields (a
lone surrogate, include_usage "no", a logit_bias), a stream cut right after its headers. The
normal requests' outputs must stay exact; the report adds their TTFT p99 with and without.

    python benchmarks/serve_load.py ARTIFACT [--concurrency 1 8 32] [--requests 4] [--max-tokens 48]
                                    [--hostile 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

import httpx
import numpy as np

PROMPTS = ["def read_config(path):\n", "import os\n", "class Foo:\n", "    return x\n",
           "for i in range(10):\n", "x = ", "    if not os.path.isdir(path):\n", "# the main loop\n"]


def request_set(max_tokens: int) -> list[dict]:
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append({"prompt": p, "max_tokens": max_tokens, "temperature": 0})
        reqs.append({"prompt": p, "max_tokens": max_tokens, "temperature": 0.9, "top_p": 0.95, "top_k": 50,
                     "seed": 100 + i})
    return reqs


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


async def one(client: httpx.AsyncClient, url: str, body: dict, abort_after: int | None) -> dict:
    t0 = time.perf_counter()
    tokens, gaps, ttft, last, finish = [], [], None, None, None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"][0]
            now = time.perf_counter()
            if c["token_ids"]:
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps += [(now - last) / len(c["token_ids"])] * len(c["token_ids"])
                last = now
                tokens += c["token_ids"]
            finish = c["finish_reason"] or finish
            chunks += 1
            if abort_after is not None and chunks >= abort_after and finish is None:
                return {"status": 200, "tokens": tokens, "aborted": True, "ttft": ttft, "gaps": gaps}
    return {"status": 200, "tokens": tokens, "aborted": False, "finish": finish, "ttft": ttft, "gaps": gaps}


def _hostile_requests(max_body: int) -> list[bytes]:
    """Request bytes of the hostile kinds that send whole requests."""
    def post(body: bytes, length: int | None = None) -> bytes:
        return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)) + body
    big = json.dumps({"prompt": "x " * ((max_body - 40) // 2), "max_tokens": 4}).encode()[:max_body]
    if not big.endswith(b"}"):
        big = json.dumps({"prompt": "x " * ((max_body - 60) // 2), "max_tokens": 4}).encode()
    return [post(b"", 20_000_000),  # Content-Length over the limit: 413 unread
            post(big),  # at the limit: tokenized (off the event loop) and refused (too long for the cache)
            post(b'{"prompt": "\\ud800", "max_tokens": 4}'),
            post(b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "no"}}'),
            post(b'{"prompt": "x", "logit_bias": {"5": 3}}'),
            post(b'{"prompt": "x", "max_tokens": 4, "stream": true}')]  # cut right after the headers


async def hostile(url: str, kind: int, stop: asyncio.Event, counts: dict) -> None:
    """One hostile client: repeats its kind until `stop` (one connection at a time)."""
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    whole = _hostile_requests(1 << 20)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            if kind % 8 == 0:  # headers a byte at a time until the server closes
                writer.write(b"POST /v1/completions HTTP/1.1\r\n")
                while not stop.is_set() and not reader.at_eof():
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(1024), 0.2)
                    except asyncio.TimeoutError:
                        pass
            elif kind % 8 == 1:  # a body that trickles
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
                while not stop.is_set() and not reader.at_eof():
                    writer.write(b" ")
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1024), 0.2):
                            break
                    except asyncio.TimeoutError:
                        pass
            else:
                data = whole[(kind - 2) % len(whole)]
                writer.write(data)
                await writer.drain()
                if data.endswith(b'"stream": true}'):
                    await reader.read(64)  # the status line, then hang up mid-stream
                else:
                    await asyncio.wait_for(reader.read(1 << 16), 60)
            counts[kind % 8] = counts.get(kind % 8, 0) + 1
        except (OSError, asyncio.TimeoutError):
            counts[kind % 8] = counts.get(kind % 8, 0) + 1
        finally:
            writer.close()


async def load(url: str, reqs: list[dict], concurrency: int, per_client: int, abort_share: float, seed: int,
               hostiles: int = 0):
    rng = random.Random(seed)
    plan = [[(rng.randrange(len(reqs)), 2 if rng.random() < abort_share else None) for _ in range(per_client)]
            for _ in range(concurrency)]
    results = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(jobs):
            for k, abort_after in jobs:
                results.append((k, await one(client, url, reqs[k], abort_after)))

        stop, counts = asyncio.Event(), {}
        bad = [asyncio.ensure_future(hostile(url, k, stop, counts)) for k in range(hostiles)]
        if bad:
            await asyncio.sleep(1.0)  # the hostile clients are at it before the normal ones start
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(jobs) for jobs in plan))
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*bad, return_exceptions=True)
    return results, wall, sum(len(j) for j in plan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--abort-share", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=2, help="load rounds per concurrency (RSS over rounds)")
    ap.add_argument("--mode", default="tidar")
    ap.add_argument("--hostile", type=int, default=0, help="hostile clients beside the normal ones (see above)")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tidar_export", "serve", args.artifact, "--port", "0",
                             "--mode", args.mode, "--max-queue", "256", "--drain-timeout", "5"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = "http://127.0.0.1:" + re.search(r":(\d+)/v1", proc.stderr.readline()).group(1)
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        batch = int(re.search(r"^tidar_batch_rows (\S+)$", httpx.get(f"{url}/metrics").text, re.M).group(1).split(".")[0])
        reqs = request_set(args.max_tokens)
        solo = []
        for body in reqs:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
            solo.append(r["choices"][0]["token_ids"])
        for conc in args.concurrency:
            rss = [rss_kib(proc.pid)]
            for rnd in range(args.rounds):
                if args.hostile:
                    calm, _, _ = asyncio.run(load(url, reqs, conc, args.requests, args.abort_share, rnd))
                results, wall, sent = asyncio.run(load(url, reqs, conc, args.requests, args.abort_share, rnd,
                                                       args.hostile))
                rss.append(rss_kib(proc.pid))
            ok = [res for _, res in results if res["status"] == 200]
            wrong = [k for k, res in results if res["status"] == 200 and not res["aborted"] and res["tokens"] != solo[k]]
            bad_abort = [k for k, res in results if res["status"] == 200 and res["aborted"]
                         and res["tokens"] != solo[k][: len(res["tokens"])]]
            gaps = [g for res in ok for g in res["gaps"]]
            ttft = [res["ttft"] for res in ok if res["ttft"] is not None]
            tokens = sum(len(res["tokens"]) for res in ok)
            report = {
                "batch": batch, "concurrency": conc, "mode": args.mode, "requests": sent, "answered": len(results),
                "refused": sum(res["status"] != 200 for _, res in results),
                "aborted": sum(res.get("aborted", False) for res in ok),
                "greedy_or_seeded_mismatch": len(wrong), "abort_not_prefix": len(bad_abort),
                "tokens_per_s": round(tokens / wall, 1),
                "ttft_ms": {q: round(float(np.percentile(ttft, int(q[1:]))) * 1e3, 1) for q in ("p50", "p99")},
                "inter_token_ms": {q: round(float(np.percentile(gaps, int(q[1:]))) * 1e3, 1) for q in ("p50", "p99")},
                "server_rss_mib": [round(x / 1024, 1) for x in rss],
            }
            if args.hostile:
                calm_ttft = [res["ttft"] for _, res in calm if res["status"] == 200 and res["ttft"] is not None]
                calm_wrong = [k for k, res in calm if res["status"] == 200 and not res["aborted"]
                              and res["tokens"] != solo[k]]
                report["hostile_clients"] = args.hostile
                report["ttft_p99_ms_without_hostile"] = round(float(np.percentile(calm_ttft, 99)) * 1e3, 1)
                report["ttft_p99_ratio"] = round(report["ttft_ms"]["p99"] / report["ttft_p99_ms_without_hostile"], 2)
                wrong += calm_wrong
            print(json.dumps(report), flush=True)
            if wrong or bad_abort or report["answered"] != sent:
                print("FAILED: outputs differ from solo runs or requests were lost", file=sys.stderr)
                return 1
        return 0
    finally:
        proc.terminate()  # drains (at most 5 s), then exits
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
