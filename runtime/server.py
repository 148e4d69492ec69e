"""An OpenAI-compatible HTTP server over the in-flight engine (FastAPI + uvicorn; no torch).

Endpoints: `POST /v1/completions` (prompt, max_tokens, temperature, top_p, top_k, seed, stop,
stream as server-sent events, stream_options.include_usage, usage counts), `POST
/v1/chat/completions` (messages rendered with the artifact's chat template, runtime/chat.py;
the same fields; the turn ends on the template's end-of-turn tokens), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text format, prometheus_client). Responses follow
OpenAI's completions schema; each choice also carries `token_ids` (the generated ids), which
clients that do not know it ignore.

Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}` with a one-line
message: 400 for a malformed body or an out-of-range parameter, 404 for another model name or
an unknown path, 405 for a wrong method,
503 with `Retry-After` when the engine's queue is full, 500 if the backend fails (the engine
and the server keep running). A client that disconnects, streaming or not, aborts its request,
which frees its batch row before the next pass.

`pip install 'tidar-export[serve]'` installs fastapi, uvicorn and prometheus_client.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tidar_runtime.chat import ChatTemplate, check_messages
from tidar_runtime.engine import Completion, Engine, Event, QueueFull
from tidar_runtime.errors import TiDARError
from tidar_runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP = 4
_DISCONNECT = object()


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
            503: "server_overloaded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status, headers)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer", name)
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(f"{name} must be >= {lo}, got {v}" if hi is None else f"{name} must lie in [{lo}, {hi}], got {v}",
                         name)
    return v


def parse_completion(body, model_name: str) -> dict:
    """The engine's submit arguments (and the stream flags) from a completions request body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"model {model!r} is not served here (this server serves {model_name!r})", "model", 404)
    if "prompt" not in body:
        raise BadRequest("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise BadRequest("prompt must be a string or a non-empty list of token ids (one prompt per request)",
                             "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    for name, neutral in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None), ("suffix", None),
                          ("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", None)):
        v = body.get(name)
        if v is not None and v != neutral and not (name == "logit_bias" and v == {}):
            raise BadRequest(f"{name}={json.dumps(v)} is not supported", name)
    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    if any(not s for s in stop):
        raise BadRequest("stop strings must be non-empty", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return {"prompt": prompt, "max_tokens": max_tokens, "stop": stop, "stream": stream,
            "include_usage": bool(options.get("include_usage", False)),
            "params": SamplingParams(temperature, max(0, top_k), top_p, seed)}


def parse_chat_completion(body, model_name: str, chat: "ChatTemplate | None") -> dict:
    """The engine's submit arguments from a chat completions body: the messages rendered with the
    chat template (runtime/chat.py), the other fields as for completions; the turn ends on the
    template's end-of-turn and eos tokens."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if chat is None:
        raise BadRequest("this model has no chat template (chat_template.jinja): use /v1/completions", "messages")
    try:
        prompt = chat.encode(check_messages(body.get("messages")))
    except TiDARError as e:
        raise BadRequest(str(e), "messages") from None
    if not prompt:
        raise BadRequest("the chat template rendered an empty prompt", "messages")
    fields = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens")}
    if body.get("max_completion_tokens") is not None:  # the chat API's newer name of max_tokens
        fields["max_tokens"] = body["max_completion_tokens"]
    return parse_completion(fields | {"prompt": prompt}, model_name) | {"stop_tokens": chat.stop_ids}


class Reply:
    """How a response spells its objects: the completions API (`text`) or the chat API
    (`message`, and `delta` when streamed). Every choice also carries the generated `token_ids`."""

    def __init__(self, id_prefix: str, objects: tuple[str, str], chat: bool):
        self.id_prefix, self._objects, self.chat = id_prefix, objects, chat

    def object(self, stream: bool) -> str:
        return self._objects[stream]

    def choice(self, text: str, tokens: list[int], finish: str | None, delta: bool = False, first: bool = False) -> dict:
        out = {"index": 0, "logprobs": None, "finish_reason": finish, "token_ids": tokens}
        if not self.chat:
            return {"text": text} | out
        if not delta:
            return {"message": {"role": "assistant", "content": text}} | out
        return {"delta": ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})} | out


TEXT_REPLY = Reply("cmpl", ("text_completion", "text_completion"), chat=False)
CHAT_REPLY = Reply("chatcmpl", ("chat.completion", "chat.completion.chunk"), chat=True)


def _finish(reason: str) -> str:
    return "stop" if reason == "stop" else "length"  # cache_full: the length limit of the artifact


class Metrics:
    """Prometheus metrics of one server (its own registry), fed by the engine's listener hooks."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        b = getattr(engine.backend, "block_size", 1)
        self.requests = Counter("tidar_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("tidar_requests_rejected", "Requests refused before decoding", ["reason"], registry=r)
        self.tokens = Counter("tidar_tokens_generated", "Tokens generated (prefill and steps)", registry=r)
        self.forwards = Counter("tidar_forwards", "Batched passes", ["kind"], registry=r)
        self.tokens_per_forward = Histogram("tidar_tokens_per_forward", "Tokens one decode step emitted for one row",
                                            buckets=list(range(0, b + 1)), registry=r)
        self.step_seconds = Histogram("tidar_step_seconds", "Wall time of one pass", ["kind"], registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.ttft = Histogram("tidar_time_to_first_token_seconds", "Submit to first token", registry=r)
        Gauge("tidar_queue_depth", "Requests waiting for a row", registry=r).set_function(
            lambda: engine.snapshot().queue_depth)
        Gauge("tidar_active_rows", "Batch rows decoding a request", registry=r).set_function(
            lambda: engine.snapshot().active_rows)
        Gauge("tidar_batch_rows", "Rows of the artifact's batch", registry=r).set(engine.max_batch)
        engine.add_listener(self)

    def on_pass(self, kind: str, seconds: float, tokens: list[int]) -> None:
        self.forwards.labels(kind).inc()
        self.step_seconds.labels(kind).observe(seconds)
        self.tokens.inc(sum(tokens))
        if kind == "step":
            for n in tokens:
                self.tokens_per_forward.observe(n)

    def on_finish(self, c: Completion) -> None:
        self.requests.labels(c.finish_reason).inc()
        if c.first_token_s is not None:
            self.ttft.observe(c.first_token_s)


def create_app(engine: Engine, model_name: str, retry_after_s: int = 1, chat: "ChatTemplate | None" = None) -> FastAPI:
    """The HTTP app over `engine`; `chat` (the artifact's chat template) serves /v1/chat/completions."""
    app = FastAPI(title="tidar-export serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown path (404), wrong method (405)
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", headers=e.headers)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, e: Exception):  # the server never crashes on a request
        return error_response(500, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tidar-export"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run_request(request, parse_completion, TEXT_REPLY)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run_request(request, lambda body, name: parse_chat_completion(body, name, chat), CHAT_REPLY)

    async def run_request(request: Request, parse, reply: "Reply"):
        """Parse the JSON body with `parse(body, model_name)`, run the request, answer as `reply` spells it."""
        raw = await request.body()
        try:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"invalid JSON body: {str(e).splitlines()[0]}") from None
            req = parse(body, model_name)
        except BadRequest as e:
            metrics.rejected.labels("bad_request").inc()
            return error_response(e.status, e.message, e.param)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev: Event) -> None:  # engine thread -> this request's event loop
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            handle = engine.submit(req["prompt"], max_tokens=req["max_tokens"], params=req["params"],
                                   stop=req["stop"], stop_tokens=req.get("stop_tokens"), on_event=on_event)
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            return error_response(503, str(e), headers={"Retry-After": str(retry_after_s)})
        except TiDARError as e:
            metrics.rejected.labels("bad_request").inc()
            return error_response(400, str(e).splitlines()[0], "prompt" if "prompt" in str(e) else None)

        async def watch_disconnect() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    handle.abort()
                    events.put_nowait(_DISCONNECT)
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        cid = f"{reply.id_prefix}-{handle.id}"

        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": reply.object(req["stream"]), "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage(c: Completion) -> dict:
            return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                    "total_tokens": c.prompt_tokens + len(c.tokens)}

        if not req["stream"]:
            try:
                while True:
                    ev = await events.get()
                    if ev is _DISCONNECT:
                        return Response(status_code=499)  # nobody reads it
                    if ev.finish_reason is not None:
                        break
            finally:
                watcher.cancel()
                handle.abort()  # no-op once finished
            c = handle.result()
            if c.finish_reason == "error":
                return error_response(500, f"decoding failed: {c.error}")
            choice = reply.choice(c.text or "", c.tokens, _finish(c.finish_reason))
            return JSONResponse(chunk([choice], usage(c)))

        async def sse():
            first = True
            try:
                while True:
                    ev = await events.get()
                    if ev is _DISCONNECT:
                        return
                    if ev.finish_reason == "error":
                        c = handle.result()
                        yield _sse({"error": {"message": f"decoding failed: {c.error}", "type": "server_error",
                                              "param": None, "code": None}})
                        break
                    done = ev.finish_reason is not None
                    if ev.tokens or ev.text or done:
                        yield _sse(chunk([reply.choice(ev.text, ev.tokens, _finish(ev.finish_reason) if done else None,
                                                       delta=True, first=first)]))
                        first = False
                    if done:
                        if req["include_usage"]:
                            yield _sse(chunk([], usage(handle.result())))
                        break
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                handle.abort()  # the client went away (or we are done: no-op)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one), for uvicorn's `sockets=`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TiDARError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, log_level: str = "warning"):
    """A uvicorn server for `app` (run it with `server.run(sockets=[bind(host, port)])`)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2))
