"""An OpenAI-compatible HTTP server over the in-flight engine (FastAPI + uvicorn; no torch).

Endpoints: `POST /v1/completions` (prompt, max_tokens, temperature, top_p, top_k, seed, stop,
stream as server-sent events, stream_options.include_usage, usage counts), `POST
/v1/chat/completions` (messages rendered with the artifact's chat template, runtime/chat.py;
the same fields; the turn ends on the template's end-of-turn tokens), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text format, prometheus_client). Responses follow
OpenAI's completions schema; each choice also carries `token_ids` (the generated ids), which
clients that do not know it ignore.

Every client error is a 4xx in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
with a one-line message and `param` naming the JSON field: 400 for a malformed body or a bad
field (the request model, tidar_runtime.request, and the engine's checks raise FieldError), 404
for another model name or an unknown path, 405 for a wrong method, 408 for a body that does not
arrive in time, 413 for a body over the limit, 503 with `Retry-After` when the engine's queue is
full or the server is draining. The server's own faults are 500 with one log line; the engine
and the server keep running.

Nothing a request does blocks the event loop: the body is parsed and the prompt tokenized in a
thread pool, text is detokenized on the engine's thread. A client that disconnects, streaming or
not, aborts its request, which frees its batch row before the next pass (one log line). Slow
clients are cut: headers must arrive within `header_timeout_s`, the body within
`body_timeout_s` (`Limits`). On SIGTERM / SIGINT the server stops accepting, lets the requests
in flight finish for `drain_timeout_s`, then ends every open stream with a finish_reason
"abort" chunk and `data: [DONE]` (`make_server`).

The chat route plugs in as `completions` does: it renders the messages into prompt ids, builds
`GenerationRequest(ids, stop_tokens=..., **request_options(body))` and shares `_generate`; a
`Reply` says how each API spells its objects.

`pip install 'tidar-export[serve]'` installs fastapi, uvicorn and prometheus_client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidar_runtime.chat import ChatTemplate, check_messages
from tidar_runtime.engine import Completion, Engine, Event, QueueFull
from tidar_runtime.errors import FieldError, TiDARError, first_line
from tidar_runtime.request import GenerationRequest
from tidar_runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
log = logging.getLogger("uvicorn.error").getChild("tidar")  # uvicorn's handler and --log-level
_DISCONNECT = object()
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server, enforced before any work (docs/RELIABILITY.md)."""

    max_body_bytes: int = 1 << 20  # a request body; larger ones get 413 (Content-Length: unread)
    header_timeout_s: float = 10.0  # from connecting (or the last response) to the end of the headers
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    drain_timeout_s: float = 30.0  # SIGTERM: how long requests in flight may run on
    tokenizer_threads: int = 4  # the pool that parses bodies and tokenizes prompts


class BadRequest(Exception):
    """A client error found by the HTTP layer itself (the body, the model name)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status, headers)


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": None,
                                 "code": None}}).encode()


# ------------------------------------------------------------------------------ the request body


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FieldError(name, "must be a number")
    if v < lo or v > hi or (lo_open and v == lo):
        raise FieldError(name, f"must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _optional_int(body: dict, name: str, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(name, "must be an integer")
    if not lo <= v <= hi:
        raise FieldError(name, f"must lie in [{lo}, {hi}], got {v}")
    return v


def _neutral(name: str, v) -> bool:
    """Whether an option we do not implement has its neutral value (accepted, as OpenAI's default)."""
    if v is None:
        return True
    if name == "logit_bias":  # {token: 0, ...}: no bias
        return isinstance(v, dict) and all(not isinstance(b, bool) and isinstance(b, (int, float)) and b == 0
                                           for b in v.values())
    neutral = {"n": 1, "best_of": 1, "echo": False, "presence_penalty": 0, "frequency_penalty": 0}.get(name)
    return v == neutral and isinstance(v, bool) == isinstance(neutral, bool)


def request_options(body: dict, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """The GenerationRequest fields every OpenAI generation route shares (all but the prompt):
    max_tokens, sampling, stop, stream, stream_options; options this server does not implement
    are refused unless neutral. Unknown fields are ignored, as OpenAI's API does."""
    for name in ("n", "best_of", "echo", "logprobs", "suffix", "presence_penalty", "frequency_penalty", "logit_bias"):
        if not _neutral(name, body.get(name)):
            raise FieldError(name, f"is not supported (got {json.dumps(body.get(name))[:40]}; only its default)")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise FieldError("stream_options", "must be an object")
    max_tokens = body.get("max_tokens")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise FieldError("top_k", f"must be an integer >= -1 (0 or -1: off), got {json.dumps(top_k)[:40]}")
    params = SamplingParams(_number(body, "temperature", 1.0, 0.0, 2.0), max(0, top_k or 0),
                            _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                            _optional_int(body, "seed", 0, 2**63 - 1))
    return {"max_tokens": default_max_tokens if max_tokens is None else max_tokens, "params": params,
            "stop": body.get("stop"), "stream": body.get("stream"),
            "include_usage": (options or {}).get("include_usage")}


def parse_completion(body, model_name: str) -> GenerationRequest:
    """The request of a completions body; FieldError (a JSON field) or BadRequest."""
    check_body(body, model_name)
    if "prompt" not in body:
        raise FieldError("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and any(isinstance(t, (str, list)) for t in prompt):
        raise FieldError("prompt", "must be a string or a non-empty list of token ids (one prompt per request)")
    return GenerationRequest(prompt, **request_options(body))


def check_body(body, model_name: str) -> None:
    """A JSON object that asks for the served model (every route)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"model {str(model)[:80]!r} is not served here (this server serves {model_name!r})",
                         "model", 404)


def parse_chat_completion(body, model_name: str, chat: ChatTemplate | None) -> GenerationRequest:
    """The request of a chat completions body: the messages rendered with the chat template
    (runtime/chat.py), the other fields as for completions; the turn ends on the template's
    end-of-turn and eos tokens."""
    check_body(body, model_name)
    if chat is None:
        raise FieldError("messages", "cannot be rendered: this model has no chat template (chat_template.jinja); "
                                     "use /v1/completions")
    try:
        prompt = chat.encode(check_messages(body.get("messages")))
    except TiDARError as e:
        raise FieldError("messages", first_line(e)) from None
    if not prompt:
        raise FieldError("messages", "rendered an empty prompt with the chat template")
    if body.get("max_completion_tokens") is not None:  # the chat API's newer name of max_tokens
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return GenerationRequest(tuple(prompt), stop_tokens=tuple(chat.stop_ids), **request_options(body))


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
    # cache_full: the length limit of the artifact; abort: ended by a server drain
    return {"stop": "stop", "abort": "abort"}.get(reason, "length")


# ------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus metrics of one server (its own registry), fed by the engine's listener hooks."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        b = engine.backend.block_size
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


# ------------------------------------------------------------------------------ the app


def create_app(engine: Engine, model_name: str, retry_after_s: int = 1, limits: Limits = Limits(),
               chat: ChatTemplate | None = None):
    """The ASGI app: the FastAPI routes inside `BodyLimit` (size and time of request bodies);
    `chat` (the artifact's chat template) serves /v1/chat/completions."""
    app = FastAPI(title="tidar-export serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    created = int(time.time())
    pool = ThreadPoolExecutor(max_workers=limits.tokenizer_threads, thread_name_prefix="tidar-parse")
    app.state.engine, app.state.metrics, app.state.pool = engine, metrics, pool

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown path, wrong method
        message = {404: f"no route {request.url.path[:80]!r}: this server has /v1/completions, "
                        "/v1/chat/completions, /v1/models, "
                        "/health and /metrics", 405: f"{request.method} is not allowed on {request.url.path[:80]!r}"}
        return error_response(e.status_code, message.get(e.status_code, str(e.detail)), headers=e.headers)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, e: Exception):  # the server never crashes on a request
        return error_response(500, f"internal error ({type(e).__name__}); the server log has its line")

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
        return await _generate(request, lambda body: parse_completion(body, model_name), TEXT_REPLY)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, lambda body: parse_chat_completion(body, model_name, chat), CHAT_REPLY)

    async def _generate(request: Request, parse, reply: Reply) -> Response:
        """Parse (in the pool), submit (tokenizing there too), then answer: one JSON response or
        a stream of server-sent events. `parse(body) -> GenerationRequest` is the route's own part."""
        raw = await request.body()  # BodyLimit has read it already, within its size and time limits
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev: Event) -> None:  # engine thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        def admit():
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"invalid JSON body: {str(e).splitlines()[0]}") from None
            req = parse(body)
            return req, engine.submit(req, on_event=on_event)

        try:
            req, handle = await loop.run_in_executor(pool, admit)
        except (BadRequest, FieldError) as e:
            metrics.rejected.labels("bad_request").inc()
            if isinstance(e, BadRequest):
                return error_response(e.status, e.message, e.param)
            return error_response(400, e.named(e.field), e.field)  # the field as the client sent it
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            return error_response(503, str(e), headers={"Retry-After": str(retry_after_s)})
        except TiDARError as e:
            metrics.rejected.labels("bad_request").inc()
            return error_response(400, first_line(e))

        async def watch_disconnect() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    if handle.abort():
                        log.warning("client %s went away: request %s aborted", _client(request), handle.id)
                    events.put_nowait(_DISCONNECT)
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        cid = f"{reply.id_prefix}-{handle.id}"

        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": reply.object(req.stream), "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage(c: Completion) -> dict:
            return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                    "total_tokens": c.prompt_tokens + len(c.tokens)}

        if not req.stream:
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
                log.error("request %s: decoding failed: %s", handle.id, c.error)
                return error_response(500, f"decoding failed: {c.error}")
            return JSONResponse(chunk([reply.choice(c.text or "", c.tokens, _finish(c.finish_reason))], usage(c)))

        async def sse():
            first = True
            try:
                while True:
                    ev = await events.get()
                    if ev is _DISCONNECT:
                        return
                    if ev.finish_reason == "error":
                        c = handle.result()
                        log.error("request %s: decoding failed: %s", handle.id, c.error)
                        yield _sse({"error": {"message": f"decoding failed: {c.error}", "type": "server_error",
                                              "param": None, "code": None}})
                        break
                    done = ev.finish_reason is not None
                    if ev.tokens or ev.text or done:
                        yield _sse(chunk([reply.choice(ev.text, ev.tokens, _finish(ev.finish_reason) if done else None,
                                                       delta=True, first=first)]))
                        first = False
                    if done:
                        if req.include_usage:
                            yield _sse(chunk([], usage(handle.result())))
                        break
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                handle.abort()  # the client went away (or we are done: no-op)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return BodyLimit(app, limits)


def _client(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "?"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class BodyLimit:
    """ASGI wrapper: reads an HTTP request's whole body before the app sees it, within
    `max_body_bytes` (a larger Content-Length is refused with 413 before a byte is read; a body
    without one is cut at the limit) and `body_timeout_s` (408). The app then gets the body as
    one message, and the connection's later messages (the disconnect) as they come."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return await _refuse(send, 413, f"the request body is over {self.limits.max_body_bytes} bytes")
        try:
            body = await asyncio.wait_for(self._read(receive), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            log.warning("client %s: body not received within %s s: closed", _peer(scope), self.limits.body_timeout_s)
            return await _refuse(send, 408, f"the request body did not arrive within {self.limits.body_timeout_s} s")
        if body is None:  # the client went away
            log.warning("client %s went away before its request body arrived", _peer(scope))
            return
        if len(body) > self.limits.max_body_bytes:
            return await _refuse(send, 413, f"the request body is over {self.limits.max_body_bytes} bytes")
        replayed = started = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def tracked(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception as e:  # noqa: BLE001 (one log line, no traceback; the 500 went out already if it could)
            log.error("%s %s: %s: %s", scope.get("method"), scope.get("path"), type(e).__name__, first_line(e))
            if not started:
                await _refuse(send, 500, f"internal error ({type(e).__name__})")

    async def _read(self, receive) -> bytes | None:
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return b" " * size  # over the limit: the caller refuses it (nothing more is read)
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)


def _peer(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


async def _refuse(send, status: int, message: str) -> None:
    body = _error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ the server


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


def make_server(app, log_level: str = "warning"):
    """A uvicorn server for `app` (from create_app; run it with `server.run(sockets=[bind(host, port)])`):
    slow headers are cut (`header_timeout_s`), and on SIGTERM / SIGINT (or `should_exit`) it drains
    (`drain_timeout_s`, see the module doc)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits: Limits = app.limits
    engine: Engine = app.state.engine

    class Protocol(H11Protocol):
        """uvicorn's h11 protocol with a deadline on headers: from the connection (or the end of
        the last response) to the end of the next request's headers."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(limits.header_timeout_s, self._headers_late, self.cycle)

        def _headers_late(self, cycle) -> None:
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():  # no request began since
                if self.conn.trailing_data[0]:  # part of the headers came: a slow client, not an idle one
                    log.warning("client %s: no complete request headers within %s s: closed",
                                "%s:%d" % self.client if self.client else "?", limits.header_timeout_s)
                self.transport.close()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            loop = asyncio.get_running_loop()
            drained = loop.run_in_executor(None, engine.drain, limits.drain_timeout_s)
            await super().shutdown(sockets)
            aborted = await drained
            if aborted:
                log.warning("drain: %d request(s) still running after %s s were ended (finish_reason abort)",
                            aborted, limits.drain_timeout_s)
            app.state.pool.shutdown(wait=False, cancel_futures=True)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, http=Protocol, lifespan="off",
                            timeout_graceful_shutdown=limits.drain_timeout_s + 5, timeout_keep_alive=5)
    return Server(config)
