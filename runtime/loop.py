"""TiDAR's decode loop (TIDAR.md 3-6): prefill, step, verify, commit. Numpy only.

The loop owns each row's committed length L and its drafts; the backend owns the KV cache.
A step writes its keys/values at slots L..L+q-1 with the drafts first (TIDAR.md 5), so
committing k accepted drafts is only `L += k`: nothing is copied, the next step overwrites
the rest and its mask hides them.

Token bookkeeping: the anchor d_0 is emitted as soon as it is chosen; a step that accepts k
drafts (d_0..d_{k-1}) emits d_1..d_{k-1} plus the next anchor: k tokens, T/NFE = k.

Batching: all rows run every step (static shapes); a finished row is fed mask tokens at
L = 0 and its outputs are ignored. Rows finish independently.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tidar_runtime.errors import TiDARError
from tidar_runtime.inputs import check_token_ids
from tidar_runtime.layout import block_out_row
from tidar_runtime.sampling import SamplingParams, probs, sample


@dataclass
class Outputs:
    token_ids: np.ndarray  # [B, rows] int64: argmax of every output row
    logits: np.ndarray | None = None  # [B, rows, V], only when asked for (sampling)


class Backend(Protocol):
    """What the loop needs from an engine; output rows follow tidar_runtime.layout."""

    block_size: int  # b: draft rows per step
    proposals: tuple[int, ...]  # acceptance levels r with a pre-drafted block, ascending, contain 1
    max_len: int  # cache slots per row
    max_batch: int  # rows of the step graphs
    mask_token_id: int

    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        """[prompt | M x b] into cache row `row` from slot 0. Outputs [1, b]."""

    def step(self, drafts: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        """drafts [B, b] at L = cache_len [B]; writes K/V at each row's L. Outputs [B, n_out]."""

    def ar_prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        """Causal pass over the prompt into cache row `row`. Outputs [1, 1] at p_{P-1}."""

    def ar_step(self, tokens: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        """tokens [B, 1] at position cache_len [B]. Outputs [B, 1]."""


@dataclass
class DecodeStats:
    accepted: list[int] = field(default_factory=list)  # k (tokens emitted) of every decode forward
    prefill_s: float = 0.0  # wall time of this row's prefill pass
    step_s: list[float] = field(default_factory=list)  # wall time of every decode forward

    @property
    def forwards(self) -> int:
        return len(self.accepted)

    @property
    def tokens_per_forward(self) -> float:
        """T/NFE over decode forwards (prefill excluded); 1.0 for AR decoding."""
        return sum(self.accepted) / max(1, len(self.accepted))

    @property
    def histogram(self) -> dict[int, int]:
        """Accepted length k -> number of steps."""
        return dict(sorted(Counter(self.accepted).items()))


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (prompt excluded, stop token excluded)
    finish_reason: str | None  # "stop" (a stop token), "length" (max_new_tokens) or "cache_full"
    stats: DecodeStats


class _Row:
    """One sequence of the batch: its committed length, drafts and output."""

    def __init__(self, L: int, max_new: int, stop, rng: np.random.Generator):
        self.L = L
        self.anchor = -1
        self.drafts: list[int] = []
        self.q: list[np.ndarray] | None = None  # proposal distributions of the drafts (sampling)
        self.result = DecodeResult([], None if max_new > 0 else "length", DecodeStats())
        self.max_new, self.stop, self.rng = max_new, stop, rng

    @property
    def done(self) -> bool:
        return self.result.finish_reason is not None

    def emit(self, tokens: list[int]) -> list[int]:
        """Append tokens up to a stop token or the length limit; returns those kept."""
        kept = []
        for t in tokens:
            if self.done:
                break
            if t in self.stop:
                self.result.finish_reason = "stop"
                break
            kept.append(int(t))
            self.result.tokens.append(int(t))
            if len(self.result.tokens) >= self.max_new:
                self.result.finish_reason = "length"
        return kept


class Stream:
    """Iterate for (row, tokens) pieces as they are decided; `results` once exhausted."""

    def __init__(self, gen: Iterator):
        self._gen = gen
        self.results: list[DecodeResult] | None = None

    def __iter__(self):
        self.results = yield from self._gen


def text_pieces(stream: Stream, decode, row: int = 0) -> Iterator[str]:
    """The new text of one row as its tokens are decided (decode: token ids -> str).

    The whole row is decoded again after each piece and only the new suffix is yielded, so
    tokens that merge (byte-level BPE) come out right; text ending in U+FFFD (a UTF-8 sequence
    cut between tokens) is held back until the next piece completes it.
    """
    ids: list[int] = []
    shown = 0
    for i, piece in stream:
        if i != row or not piece:
            continue
        ids += piece
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > shown:
            yield text[shown:]
        shown = len(text)
    text = decode(ids)
    if len(text) > shown:
        yield text[shown:]


def accept_draft(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> bool:
    """Speculative sampling: accept a draft drawn from q with probability min(1, p/q)."""
    return rng.random() * q[token] < p[token]


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distribution of the replacement after a rejection: normalize(max(0, p - q))."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p  # total == 0 only if p == q, where nothing is rejected


def _choose(token_id, logits: np.ndarray | None, params: SamplingParams, rng) -> int:
    """The token of one output row: the graph's argmax when greedy, else a sample of softmax(logits/T)."""
    if params.greedy:
        return int(token_id)
    return sample(probs(logits, params), rng)


def _propose(row: _Row, ids: np.ndarray, logits: np.ndarray | None, params: SamplingParams) -> None:
    """Drafts from diffusion rows; when sampling also keep q (one distribution per draft) for the acceptance test."""
    if params.greedy:
        row.drafts, row.q = [int(t) for t in ids], None
    else:
        # Row by row: measured faster than one [n, V] pass (numpy temporaries stay cache-sized).
        row.q = [probs(lg, params) for lg in logits]
        row.drafts = [sample(q, row.rng) for q in row.q]


def _verify(row: _Row, ids: np.ndarray, logits: np.ndarray | None, params: SamplingParams) -> tuple[int, int]:
    """Accepted count k and the next anchor, from the AR rows [b] of this row's step."""
    d = [row.anchor] + row.drafts
    k = 1
    for i in range(1, len(d)):
        if params.greedy:
            # Greedy: accept d_i while it equals argmax(AR[i-1]); the first mismatch is the anchor.
            if d[i] != ids[i - 1]:
                return k, int(ids[i - 1])
        else:
            # Sampling: accept d_i with prob min(1, p(d_i)/q(d_i)); on rejection the next anchor
            # is drawn from normalize(max(0, p - q)).
            p_i, q_i = probs(logits[i - 1], params), row.q[i - 1]  # AR[i-1] predicts d_i
            if not accept_draft(p_i, q_i, d[i], row.rng):
                return k, sample(residual(p_i, q_i), row.rng)
        k += 1
    # All accepted: the next anchor is AR's own token after d_{k-1} (the bonus token).
    return k, _choose(ids[k - 1], None if logits is None else logits[k - 1], params, row.rng)


def _check_prompts(prompts, extra: int, backend) -> list[np.ndarray]:
    out = []
    if len(prompts) > backend.max_batch:
        raise TiDARError(f"{len(prompts)} prompts exceed the artifact's batch of {backend.max_batch}")
    for p in prompts:
        p = check_token_ids(p, getattr(backend, "vocab_size", None))
        if p.size == 0:
            raise TiDARError("empty prompt")
        if p.size + extra > backend.max_len:
            raise TiDARError(
                f"prompt of {p.size} tokens does not fit the KV cache of {backend.max_len} slots "
                f"(needs {p.size + extra})"
            )
        out.append(p)
    return out


def _active(rows: list[_Row], need: int, max_len: int) -> list[int]:
    """Indices of the rows still decoding; a row whose next pass (`need` slots from its L) would
    not fit the cache finishes with "cache_full"."""
    for row in rows:
        if not row.done and row.L + need > max_len:
            row.result.finish_reason = "cache_full"
    return [i for i, row in enumerate(rows) if not row.done]


def _rows(prompts, max_new, params, stop_tokens) -> list[_Row]:
    stop = set(stop_tokens or ())
    seed = lambda i: None if params.seed is None else [params.seed, i]  # noqa: E731 (one stream per row)
    return [_Row(len(p), max_new, stop, np.random.default_rng(seed(i))) for i, p in enumerate(prompts)]


def _tidar(backend: Backend, prompts, max_new: int, params: SamplingParams, stop_tokens):
    b, rs = backend.block_size, backend.proposals
    q_len = b * (1 + len(rs))
    prompts = _check_prompts(prompts, b, backend)
    rows = _rows(prompts, max_new, params, stop_tokens)
    want = not params.greedy

    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        t0 = time.perf_counter()
        out = backend.prefill(i, prompt, want)  # rows: AR at p_{P-1}, mask slots 1..b-1
        row.result.stats.prefill_s = time.perf_counter() - t0
        lg = None if out.logits is None else out.logits[0]
        row.anchor = _choose(out.token_ids[0, 0], None if lg is None else lg[0], params, row.rng)
        _propose(row, out.token_ids[0, 1:], None if lg is None else lg[1:], params)
        yield i, row.emit([row.anchor])

    drafts = np.full((backend.max_batch, b), backend.mask_token_id, dtype=np.int64)
    cache_len = np.zeros(backend.max_batch, dtype=np.int64)
    while active := _active(rows, q_len, backend.max_len):
        drafts.fill(backend.mask_token_id)
        cache_len.fill(0)  # finished and padding rows compute harmlessly at L = 0
        for i in active:
            d = [rows[i].anchor] + rows[i].drafts  # n <= b valid drafts (sparse proposals)
            drafts[i, : len(d)] = d
            cache_len[i] = rows[i].L
        t0 = time.perf_counter()
        out = backend.step(drafts, cache_len, want)  # [B, n_out]
        dt = time.perf_counter() - t0
        for i in active:
            row, ids = rows[i], out.token_ids[i]
            lg = None if out.logits is None else out.logits[i]
            k, anchor = _verify(row, ids[:b], None if lg is None else lg[:b], params)
            accepted = row.drafts[: k - 1]
            row.L += k  # commit d_0..d_{k-1}: their K/V already sit at L..L+k-1
            row.result.stats.accepted.append(k)
            row.result.stats.step_s.append(dt)
            row.anchor = anchor
            # Next drafts: the block that assumed exactly this outcome (largest r <= k);
            # block r slot t predicts L_old + r + t, so the new L + j is slot k - r + j.
            r = max(x for x in rs if x <= k)
            row1 = block_out_row(b, rs, r)  # slot t of block r is output row row1 + t - 1
            lo, hi = row1 + (k - r + 1) - 1, row1 + (b - 1)  # slots k-r+1 .. b-1
            _propose(row, ids[lo:hi], None if lg is None else lg[lo:hi], params)
            yield i, row.emit(accepted + [anchor])
    return [row.result for row in rows]


def _ar(backend: Backend, prompts, max_new: int, params: SamplingParams, stop_tokens):
    prompts = _check_prompts(prompts, 0, backend)
    rows = _rows(prompts, max_new, params, stop_tokens)
    want = not params.greedy
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        t0 = time.perf_counter()
        out = backend.ar_prefill(i, prompt, want)
        row.result.stats.prefill_s = time.perf_counter() - t0
        row.anchor = _choose(out.token_ids[0, 0], None if out.logits is None else out.logits[0, 0], params, row.rng)
        yield i, row.emit([row.anchor])
    tokens = np.full((backend.max_batch, 1), backend.mask_token_id, dtype=np.int64)
    cache_len = np.zeros(backend.max_batch, dtype=np.int64)
    while active := _active(rows, 1, backend.max_len):
        tokens.fill(backend.mask_token_id)
        cache_len.fill(0)
        for i in active:
            tokens[i, 0], cache_len[i] = rows[i].anchor, rows[i].L
        t0 = time.perf_counter()
        out = backend.ar_step(tokens, cache_len, want)
        dt = time.perf_counter() - t0
        for i in active:
            row = rows[i]
            row.L += 1
            row.result.stats.accepted.append(1)
            row.result.stats.step_s.append(dt)
            lg = None if out.logits is None else out.logits[i, 0]
            row.anchor = _choose(out.token_ids[i, 0], lg, params, row.rng)
            yield i, row.emit([row.anchor])
    return [row.result for row in rows]


def stream_tidar(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
                 params: SamplingParams = SamplingParams(), stop_tokens=()) -> Stream:
    """TiDAR decoding of a batch of prompts, as a stream of (row, new tokens) pieces."""
    return Stream(_tidar(backend, prompts, max_new_tokens, params, stop_tokens))


def stream_ar(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
              params: SamplingParams = SamplingParams(), stop_tokens=()) -> Stream:
    """Plain AR decoding of the same weights (the baseline and the oracle), as a stream."""
    return Stream(_ar(backend, prompts, max_new_tokens, params, stop_tokens))


def _drain(stream: Stream) -> list[DecodeResult]:
    for _ in stream:
        pass
    return stream.results


def generate_tidar_batch(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
                         params: SamplingParams = SamplingParams(), stop_tokens=()) -> list[DecodeResult]:
    return _drain(stream_tidar(backend, prompts, max_new_tokens, params, stop_tokens))


def generate_ar_batch(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
                      params: SamplingParams = SamplingParams(), stop_tokens=()) -> list[DecodeResult]:
    return _drain(stream_ar(backend, prompts, max_new_tokens, params, stop_tokens))


def generate_tidar(backend: Backend, prompt, max_new_tokens: int = 64,
                   params: SamplingParams = SamplingParams(), stop_tokens=()) -> DecodeResult:
    """TiDAR decoding of one prompt: one forward verifies the drafts and pre-drafts the next block."""
    return generate_tidar_batch(backend, [prompt], max_new_tokens, params, stop_tokens)[0]


def generate_ar(backend: Backend, prompt, max_new_tokens: int = 64,
                params: SamplingParams = SamplingParams(), stop_tokens=()) -> DecodeResult:
    """Plain autoregressive decoding of one prompt."""
    return generate_ar_batch(backend, [prompt], max_new_tokens, params, stop_tokens)[0]
