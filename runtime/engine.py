"""The in-flight batching engine: requests come and go while the batch decodes. Numpy only.

The engine drives the decode loop's `Decoder` (tidar_runtime.loop: the same prefill, step,
verify and commit as `generate_*`). Between two batched passes it drops aborted requests,
admits waiting requests into free rows of the artifact's batch (one prefill per admitted row)
and then runs one step over every active row; a row is freed as soon as its request finishes
(stop token, stop string, max tokens, cache full) or is aborted. Each request has its own
sampling parameters and its own random generator, and a batch row's outputs depend only on
that row's inputs, so a request decodes the same tokens whatever shares the batch (greedy:
token for token; seeded sampling: the same sample as the request decoded alone, which is also
what `generate_*` and `tidar-export generate --seed S` give for one prompt).

API (stable; the HTTP server and the Triton Python model build on it):

    engine = Engine(backend, mode="tidar", tokenizer=None, stop_tokens=(), max_queue=64)
    engine = open_engine(artifact_dir, backend="ort", mode="tidar", max_queue=64)  # + tokenizer, eos

    h = engine.submit(prompt,                    # str (needs the tokenizer) or token ids, or a
                                                 #   GenerationRequest (tidar_runtime.request)
                      max_tokens=64,
                      params=SamplingParams(temperature=0.8, top_p=0.9, seed=1),
                      stop=("\\n\\n",),            # stop strings (need the tokenizer); not shown
                      stop_tokens=None,          # None: the engine's (the artifact's eos)
                      request_id=None,           # None: a fresh id (h.id)
                      on_event=None)             # called from the engine thread with each Event
    for ev in h:                                 # blocks; the last event has a finish_reason
        ev.tokens, ev.text, ev.finish_reason
    c = h.result(timeout=None)                   # Completion: request_id, prompt_tokens, tokens,
                                                 #   text, finish_reason, stats, timings, error
    h.abort()  or  engine.abort(request_id)      # -> bool: False if unknown or already finished
    engine.snapshot()                            # EngineStats: queue depth, active rows, counters
    engine.add_listener(obj)                     # obj.on_pass(kind, seconds, tokens) /
                                                 #   obj.on_finish(completion), engine thread
    engine.drain(timeout)                        # refuse new requests, let live ones finish, then close
    engine.close()                               # aborts what is left; also `with Engine(...)`

`submit` raises `QueueFull` (a TiDARError) when `max_queue` requests already wait or the
engine drains, FieldError (a TiDARError naming the request field) for a bad request: the
request model's checks (tidar_runtime.request: types, max_tokens >= 1, stop strings) and the
artifact's (empty or too long prompt, a token id outside the vocabulary, max_tokens over the
context, stop strings without a tokenizer); TiDARError for a live duplicate id. A text prompt
is tokenized in `submit`, by the caller's thread; text is detokenized on the thread that runs
the passes (tidar_runtime.text: a bounded window per token).
finish_reason: "stop" (stop token or stop string), "length" (max_tokens), "cache_full" (the
row's KV cache has no room for another pass), "abort", or "error" (the backend raised; the
message is in `Completion.error`, the engine keeps serving).

Threads: by default a background thread runs the passes and any thread may submit, iterate,
wait and abort (a plain thread-based host such as Triton's execute() needs nothing else).
`Engine(..., thread=False)` has no thread: the caller drives it with `step()` or
`run_until_idle()`, and iterating a handle or waiting for its result drives it too.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tidar_runtime.errors import FieldError, TiDARError, first_line
from tidar_runtime.loop import Backend, DecodeStats, Decoder, SeqState
from tidar_runtime.request import GenerationRequest
from tidar_runtime.sampling import SamplingParams, row_rng
from tidar_runtime.text import TextAssembler
from tidar_runtime.tokenizer import count_for_limit, prompt_char_limit

FINISH_REASONS = ("stop", "length", "cache_full", "abort", "error")


class QueueFull(TiDARError):
    """The engine already holds `max_queue` waiting requests."""


@dataclass
class Event:
    """A piece of one request's output, in order: tokens and the text they completed (text held
    back at a UTF-8 boundary or a possible stop string comes in a later event)."""

    tokens: list[int]
    text: str
    finish_reason: str | None = None  # set on the last event only


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    tokens: list[int]  # generated ids (stop token excluded; up to the token that completed a stop string)
    text: str | None  # None without a tokenizer; a stop string and what follows it are cut
    finish_reason: str
    stats: DecodeStats
    queued_s: float = 0.0  # submit -> admitted into a row
    first_token_s: float | None = None  # submit -> first token decided
    total_s: float = 0.0  # submit -> finished
    error: str | None = None


@dataclass
class EngineStats:
    max_batch: int
    queue_depth: int
    active_rows: int
    submitted: int
    finished: dict[str, int]
    tokens_generated: int
    prefills: int
    steps: int  # batched decode passes
    row_steps: int  # sum over steps of the rows decoded in that step
    step_s: float  # total wall time of the steps
    prefill_tokens: int = 0  # tokens decided by prefills (the first token of each request)

    @property
    def tokens_per_forward(self) -> float | None:
        """Tokens emitted by decode steps per row-forward (prefill tokens excluded)."""
        return (self.tokens_generated - self.prefill_tokens) / self.row_steps if self.row_steps else None


class Handle:
    """One submitted request: iterate for its Events, `result()` for its Completion, `abort()`.

    The engine talks to it through `deliver` only; it asks the engine to `abort` and, when the
    engine has no thread, to `step`."""

    def __init__(self, engine: "Engine", request_id: str, prompt: np.ndarray,
                 on_event: Callable[[Event], None] | None):
        self.id = request_id
        self.prompt = prompt
        self._engine, self._on_event = engine, on_event
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self._completion is not None

    def abort(self) -> bool:
        return self._engine.abort(self.id)

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._wait_or_drive():
                    pass
                ev = self._events[i] if i < len(self._events) else None
            if ev is None:
                continue
            i += 1
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once finished; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._completion is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.id} not finished after {timeout} s")
                self._wait_or_drive(left)
            return self._completion

    def _wait_or_drive(self, timeout: float | None = None) -> bool:
        """Called with self._cond held: wait for news (or, without an engine thread, run one
        engine iteration). Returns True if an event or the completion may have arrived."""
        if not self._engine.threaded:
            self._cond.release()
            try:
                self._engine.step()
            finally:
                self._cond.acquire()
            return True
        return self._cond.wait(timeout)

    def deliver(self, ev: Event, completion: Completion | None = None) -> None:
        """The engine's news: the next event (and, with the last one, the completion)."""
        with self._cond:
            self._events.append(ev)
            if completion is not None:
                self._completion = completion
            self._cond.notify_all()
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:  # a listener's failure is its own (e.g. its event loop closed)
                pass


@dataclass(eq=False)
class _Live:
    """The engine's own record of a waiting or running request."""

    handle: Handle
    seq: SeqState
    text: TextAssembler | None
    t_submit: float
    t_admit: float | None = None
    t_first: float | None = None
    aborted: bool = False


class Engine:
    def __init__(self, backend: Backend, mode: str = "tidar", tokenizer=None, stop_tokens: Sequence[int] = (),
                 max_queue: int = 64, thread: bool = True):
        if max_queue < 0:
            raise TiDARError(f"max_queue must be >= 0, got {max_queue}")
        self.backend, self.mode, self.tokenizer = backend, mode, tokenizer
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.max_queue = max_queue
        self._decoder = Decoder(backend, mode)
        # a text prompt longer than this cannot fit the cache: refused before it is tokenized
        self._char_limit = None if tokenizer is None else prompt_char_limit(tokenizer, backend.max_len)
        self._waiting: deque[_Live] = deque()
        self._live: dict[str, _Live] = {}  # waiting and running, by id
        self._running: dict[int, _Live] = {}  # row -> request
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._listeners: list = []
        self._closed = False
        self._draining = False
        self._counts = dict(submitted=0, tokens=0, prefill_tokens=0, prefills=0, steps=0, row_steps=0)
        self._finished = {r: 0 for r in FINISH_REASONS}
        self._step_s = 0.0
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._serve, name="tidar-engine", daemon=True)
            self._thread.start()

    @property
    def max_batch(self) -> int:
        return self.backend.max_batch

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def threaded(self) -> bool:
        """Whether a background thread runs the passes (else callers drive `step`)."""
        return self._thread is not None

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt, max_tokens: int = 64, params: SamplingParams = SamplingParams(),
               stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None, request_id: str | None = None,
               on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request: a GenerationRequest, or its fields (prompt, max_tokens, params, stop,
        stop_tokens). Tokenizes a text prompt (call it off an event loop)."""
        req = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest(
            prompt, max_tokens, params, stop, stop_tokens)
        ids = self._prompt_ids(req)
        stops = self.stop_tokens if req.stop_tokens is None else req.stop_tokens
        text = None if self.tokenizer is None else TextAssembler(self.tokenizer.decode, req.stop)
        seq = SeqState(ids, req.max_tokens, req.params, stops, row_rng(req.params.seed), text)
        with self._cond:
            if self._closed:
                raise TiDARError("the engine is closed")
            if self._draining:
                raise QueueFull("the engine is shutting down: no new requests")
            rid = request_id if request_id is not None else uuid.uuid4().hex
            if rid in self._live:
                raise TiDARError(f"request id {rid!r} is already in use")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            live = _Live(Handle(self, rid, ids, on_event), seq, text, time.perf_counter())
            self._waiting.append(live)
            self._live[rid] = live
            self._counts["submitted"] += 1
            self._cond.notify_all()
        return live.handle

    def _prompt_ids(self, req: GenerationRequest) -> np.ndarray:
        """The checks that need the artifact: the prompt's ids (tokenized), max_tokens, stop strings."""
        if req.stop and self.tokenizer is None:
            raise FieldError("stop", "strings need the artifact's tokenizer.json; use stop token ids")
        if req.max_tokens > self.backend.max_len:
            raise FieldError("max_tokens", f"must be at most {self.backend.max_len} (the artifact's context), "
                             f"got {req.max_tokens}")
        prompt = req.prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise FieldError("prompt", "as text needs the artifact's tokenizer.json; send token ids")
            limit, whole = self._char_limit
            if count_for_limit(prompt, whole) > limit:
                raise FieldError("prompt", f"of {len(prompt)} characters cannot fit the KV cache of "
                                 f"{self.backend.max_len} slots (at most {limit} "
                                 f"{'characters' if whole else 'characters other than whitespace'})")
            prompt = self.tokenizer.encode(prompt).ids
        return self._decoder.check_prompt(prompt)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request; its row is freed before the next pass."""
        with self._cond:
            live = self._live.get(request_id)
            if live is None or live.aborted:
                return False
            live.aborted = True
            waiting = live in self._waiting
            if waiting:
                self._waiting.remove(live)
                del self._live[request_id]
            self._cond.notify_all()
        if waiting:
            live.seq.finish("abort")
            self._complete(live)
        return True

    # -- the passes ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine iteration: free aborted rows, admit waiting requests into free rows, one
        batched pass over the active rows. Returns whether requests remain."""
        with self._step_lock:
            self._free_aborted()
            self._admit()
            if self._running:
                self._pass()
            with self._cond:
                return bool(self._waiting or self._running)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _free_aborted(self) -> None:
        for row, live in list(self._running.items()):
            if live.aborted:
                live.seq.finish("abort")
                self._release(row)

    def _admit(self) -> None:
        for row in self._decoder.free_rows():
            with self._cond:
                if not self._waiting:
                    return
                live = self._waiting.popleft()
            live.t_admit = time.perf_counter()
            self._running[row] = live
            try:
                _, kept = self._decoder.admit(live.seq, row)
            except Exception as e:  # noqa: BLE001 (the engine keeps serving the other requests)
                self._decoder.release(row)
                del self._running[row]
                self._fail([live], e)
                continue
            self._counts["prefills"] += 1
            self._counts["prefill_tokens"] += len(kept)
            self._notify("on_pass", "prefill", live.seq.result.stats.prefill_s, [len(kept)])
            self._deliver(row, kept)

    def _pass(self) -> None:
        rows = list(self._running)
        try:
            pieces = self._decoder.step()
        except Exception as e:  # noqa: BLE001
            for row in rows:
                self._decoder.release(row)
            self._fail([self._running.pop(row) for row in rows], e)
            return
        if pieces:
            dt = self._decoder.last_step_s
            self._counts["steps"] += 1
            self._counts["row_steps"] += len(pieces)
            self._step_s += dt
            self._notify("on_pass", "step", dt, [len(kept) for _, kept in pieces])
        for row, kept in pieces:
            self._deliver(row, kept)
        for row, live in list(self._running.items()):  # rows finished without a piece (cache_full)
            if live.seq.done:
                self._release(row)

    def _deliver(self, row: int, kept: list[int]) -> None:
        live = self._running[row]
        if live.t_first is None and kept:
            live.t_first = time.perf_counter()
        text = live.text.take() if live.text is not None else ""
        with self._cond:
            self._counts["tokens"] += len(kept)
        if live.seq.done:
            self._release(row, Event(kept, text))
        elif kept or text:
            live.handle.deliver(Event(kept, text))

    def _release(self, row: int, last: Event | None = None) -> None:
        live = self._running.pop(row)
        self._decoder.release(row)
        with self._cond:
            self._live.pop(live.handle.id, None)
            self._cond.notify_all()
        self._complete(live, last)

    def _complete(self, live: _Live, last: Event | None = None, error: str | None = None) -> None:
        seq, h, now = live.seq, live.handle, time.perf_counter()
        last = last or Event([], "")
        if live.text is not None:
            live.text.finish()
            last.text += live.text.take()
        last.finish_reason = seq.result.finish_reason or "abort"
        c = Completion(h.id, len(h.prompt), list(seq.result.tokens), None if live.text is None else live.text.text,
                       last.finish_reason, seq.result.stats,
                       queued_s=(live.t_admit or now) - live.t_submit,
                       first_token_s=None if live.t_first is None else live.t_first - live.t_submit,
                       total_s=now - live.t_submit, error=error)
        with self._cond:
            self._finished[c.finish_reason] += 1
        h.deliver(last, c)
        self._notify("on_finish", c)

    def _fail(self, requests: list[_Live], e: Exception) -> None:
        msg = first_line(e) if isinstance(e, TiDARError) else f"{type(e).__name__}: {first_line(e)}"
        for live in requests:
            with self._cond:
                self._live.pop(live.handle.id, None)
            live.seq.finish("error")
            self._complete(live, error=msg)

    def _notify(self, name: str, *args) -> None:
        for obj in self._listeners:
            fn = getattr(obj, name, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 (metrics must not stop decoding)
                    pass

    def add_listener(self, obj) -> None:
        """obj.on_pass(kind "prefill"|"step", seconds, [tokens per row]) and obj.on_finish(Completion),
        both optional, called from the thread that runs the passes (on_finish of a request aborted
        while waiting: from the aborting thread). Exceptions they raise are ignored."""
        self._listeners.append(obj)

    # -- the thread ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    def snapshot(self) -> EngineStats:
        with self._cond:
            c = self._counts
            return EngineStats(self.max_batch, len(self._waiting), len(self._running), c["submitted"],
                               dict(self._finished), c["tokens"], c["prefills"], c["steps"], c["row_steps"],
                               self._step_s, prefill_tokens=c["prefill_tokens"])

    def drain(self, timeout: float) -> int:
        """Graceful stop: refuse new requests (QueueFull), let the live ones finish for up to
        `timeout` seconds, then close (abort what is left: its last event has finish_reason
        "abort"). Returns how many were aborted. Needs the engine thread (or another driver)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._draining = True
            while self._live and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            left_over = len(self._live)
        self.close()
        return left_over

    def close(self) -> None:
        """Stop the thread; abort every waiting and running request. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._step_lock:
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            for live in waiting:
                self._live.pop(live.handle.id, None)
                live.seq.finish("abort")
                self._complete(live)
            for row in list(self._running):
                self._running[row].seq.finish("abort")
                self._release(row)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_engine(artifact_dir: str | os.PathLike, backend: str = "ort", mode: str = "tidar", max_queue: int = 64,
                thread: bool = True, **backend_kwargs) -> Engine:
    """An engine over an artifact: its backend (`open_backend`), tokenizer and eos stop tokens."""
    from tidar_runtime.backends.select import open_backend
    from tidar_runtime.manifest import load_manifest
    from tidar_runtime.tokenizer import artifact_tokenizer, default_stop_tokens

    manifest = load_manifest(artifact_dir)
    tok = artifact_tokenizer(artifact_dir, manifest)
    be = open_backend(backend, artifact_dir, **backend_kwargs)
    return Engine(be, mode=mode, tokenizer=tok, stop_tokens=default_stop_tokens(manifest),
                  max_queue=max_queue, thread=thread)
