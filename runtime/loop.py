"""TiDAR's decode loop: prefill, step, verify, next drafts, commit. Numpy only.

The algorithm, one function each:
- `prefill`: one pass over [prompt | b mask slots] into a row of the cache; its AR row gives
  the first token (the anchor d_0), its mask rows the first drafts d_1..d_{b-1}.
- `step`: one batched pass over every active row: row i feeds [d_0 | drafts] at its committed
  length L_i; the outputs hold the AR rows (verification) and every proposal block (the next
  drafts under each outcome), `tidar_runtime.contract`.
- `verify`: the accepted count k (d_0..d_{k-1}) and the next anchor, from the AR rows.
- `proposal_block`: which pre-drafted block holds the next drafts after k accepted tokens.
- `next_drafts`: those drafts (and, when sampling, their proposal distributions q).

The loop owns each row's committed length L and its drafts; the backend owns the KV cache.
A step writes its keys/values at slots L..L+q-1 with the drafts first, so committing k
accepted drafts is only `L += k`: nothing is copied, the next step overwrites the rest and
its mask hides them.

Token bookkeeping: the anchor d_0 is emitted as soon as it is chosen; a step that accepts k
drafts (d_0..d_{k-1}) emits d_1..d_{k-1} plus the next anchor: k tokens. A row stops at a stop
token (not emitted) or at its length limit, so its last step may emit fewer than k; the
statistics count the tokens emitted (T/NFE = emitted tokens per decode forward).

One scaffolding for both modes: `Decoder` holds the backend's rows (each free or holding a
`SeqState`), admits a sequence into a free row (`admit`: its prefill), runs one batched pass
over all active rows (`step`) and frees rows (`release`). The mode (`TiDARMode`, `ARMode`)
supplies the passes and the per-row commit; AR is TiDAR with b = 1 and no drafts. Rows that
are free or finished are fed mask tokens at L = 0 and their outputs are ignored; rows finish
independently. The batch entry points below (`generate_*`, `stream_*`) admit every prompt and
step until all are done; the in-flight engine (`tidar_runtime.engine`) admits and releases
rows between steps. Both drive this one loop.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tidar_runtime.errors import FieldError, TiDARError
from tidar_runtime.inputs import check_token_ids
from tidar_runtime.contract import block_out_row
from tidar_runtime.sampling import SamplingParams, probs, row_rng, sample


@dataclass
class Outputs:
    token_ids: np.ndarray  # [B, rows] int64: argmax of every output row
    logits: np.ndarray | None = None  # [B, rows, V], only when asked for (sampling)

    def ar_row(self) -> "Outputs":
        """Row 0 alone: of a TiDAR prefill, the AR prediction at the last prompt token (what
        `Backend.ar_prefill` returns where the backend reuses the TiDAR prefill)."""
        return Outputs(self.token_ids[:, :1], None if self.logits is None else self.logits[:, :1])


class Backend(Protocol):
    """What the loop needs from an engine; output rows follow tidar_runtime.contract."""

    block_size: int  # b: draft rows per step
    proposals: tuple[int, ...]  # acceptance levels r with a pre-drafted block, ascending, contain 1
    max_len: int  # cache slots per row
    max_batch: int  # rows of the step graphs
    mask_token_id: int
    vocab_size: int  # token ids lie in 0..vocab_size-1

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
    accepted: list[int] = field(default_factory=list)  # tokens emitted by every decode forward (k, or fewer on the last)
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
        """Emitted length k -> number of steps."""
        return dict(sorted(Counter(self.accepted).items()))


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (prompt excluded, stop token excluded)
    finish_reason: str | None  # "stop" (a stop token), "length" (max_new_tokens) or "cache_full"; None: not finished
    stats: DecodeStats


class StopText(Protocol):
    """The text of a sequence with its stop strings (tidar_runtime.text.TextAssembler)."""

    stopped: bool  # a stop string has appeared

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; the new text shown."""


class SeqState:
    """One sequence being decoded: prompt, committed length L, anchor and drafts, sampling state, result.

    It ends at a stop token (not emitted), at a stop string (`text`: the token that completes
    it is the last one emitted), or at max_new tokens."""

    def __init__(self, prompt: np.ndarray, max_new: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: Iterable[int] = (), rng: np.random.Generator | None = None,
                 text: StopText | None = None):
        self.prompt = prompt
        self.L = len(prompt)
        self.anchor = -1
        self.drafts: list[int] = []
        self.q: list[np.ndarray] | None = None  # proposal distributions of the drafts (sampling)
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng()
        self.max_new, self.stop = max_new, frozenset(int(t) for t in stop_tokens)
        self.text = text
        self.result = DecodeResult([], None if max_new > 0 else "length", DecodeStats())

    @property
    def done(self) -> bool:
        return self.result.finish_reason is not None

    def finish(self, reason: str) -> None:
        if not self.done:
            self.result.finish_reason = reason

    def emit(self, tokens: list[int]) -> list[int]:
        """Append tokens up to a stop token, a stop string or the length limit; returns those kept."""
        kept = []
        for t in tokens:
            if self.done:
                break
            if t in self.stop:
                self.result.finish_reason = "stop"
                break
            kept.append(int(t))
            self.result.tokens.append(int(t))
            if self.text is not None:
                self.text.push([int(t)])  # token by token: a stop string ends the sequence at its last token
                if self.text.stopped:
                    self.result.finish_reason = "stop"  # also when the same token reached max_new
                    break
            if len(self.result.tokens) >= self.max_new:
                self.result.finish_reason = "length"
        return kept


# ------------------------------------------------------------------------------ the algorithm


def accept_draft(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> bool:
    """Speculative sampling: accept a draft drawn from q with probability min(1, p/q)."""
    return rng.random() * q[token] < p[token]


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distribution of the replacement after a rejection: normalize(max(0, p - q))."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p  # total == 0 only if p == q, where nothing is rejected


def choose(token_id, logits: np.ndarray | None, seq: SeqState) -> int:
    """The token of one output row: the graph's argmax when greedy, else a sample of softmax(logits/T)."""
    if seq.params.greedy:
        return int(token_id)
    return sample(probs(logits, seq.params), seq.rng)


def set_drafts(seq: SeqState, ids: np.ndarray, logits: np.ndarray | None) -> None:
    """Drafts from diffusion rows; when sampling also keep q (one distribution per draft) for the acceptance test."""
    if seq.params.greedy:
        seq.drafts, seq.q = [int(t) for t in ids], None
    else:
        # Row by row: measured faster than one [n, V] pass (numpy temporaries stay cache-sized).
        seq.q = [probs(lg, seq.params) for lg in logits]
        seq.drafts = [sample(q, seq.rng) for q in seq.q]


def verify(seq: SeqState, ids: np.ndarray, logits: np.ndarray | None) -> tuple[int, int]:
    """Accepted count k and the next anchor, from the AR rows [b] of this row's step."""
    params = seq.params
    d = [seq.anchor] + seq.drafts
    k = 1
    for i in range(1, len(d)):
        if params.greedy:
            # Greedy: accept d_i while it equals argmax(AR[i-1]); the first mismatch is the anchor.
            if d[i] != ids[i - 1]:
                return k, int(ids[i - 1])
        else:
            # Sampling: accept d_i with prob min(1, p(d_i)/q(d_i)); on rejection the next anchor
            # is drawn from normalize(max(0, p - q)).
            p_i, q_i = probs(logits[i - 1], params), seq.q[i - 1]  # AR[i-1] predicts d_i
            if not accept_draft(p_i, q_i, d[i], seq.rng):
                return k, sample(residual(p_i, q_i), seq.rng)
        k += 1
    # All accepted: the next anchor is AR's own token after d_{k-1} (the bonus token).
    return k, choose(ids[k - 1], None if logits is None else logits[k - 1], seq)


def proposal_block(block_size: int, proposals: Sequence[int], k: int) -> tuple[int, int, int]:
    """After k accepted tokens: (r, lo, hi), the proposal block r and the output rows lo:hi that
    hold the next step's drafts.

    The block that assumed exactly this outcome is the largest r <= k (block 1 always exists).
    Slot t of block r predicts position L_old + r + t; the new committed length is L_old + k and
    the new anchor sits at L_old + k, so the drafts d_1.. of the next step are slots
    k - r + 1 .. b - 1 of block r: b - 1 - (k - r) drafts (fewer than b - 1 when r < k, which
    only happens with a sparse proposal set).
    """
    b = block_size
    r = max(x for x in proposals if x <= k)
    row1 = block_out_row(b, proposals, r)  # slot t of block r is output row row1 + t - 1
    return r, row1 + (k - r + 1) - 1, row1 + (b - 1)


def next_drafts(seq: SeqState, ids: np.ndarray, logits: np.ndarray | None, k: int,
                block_size: int, proposals: Sequence[int]) -> None:
    """The drafts of the next step, from the proposal block that matches k accepted tokens."""
    _, lo, hi = proposal_block(block_size, proposals, k)
    set_drafts(seq, ids[lo:hi], None if logits is None else logits[lo:hi])


# ------------------------------------------------------------------------------ the two modes


def _row_logits(out: Outputs, i: int) -> np.ndarray | None:
    return None if out.logits is None else out.logits[i]


class TiDARMode:
    """One forward verifies the previous drafts (AR rows) and pre-drafts the next block (diffusion rows)."""

    name = "tidar"

    def __init__(self, backend: Backend):
        self.b, self.proposals = backend.block_size, tuple(backend.proposals)
        self.pass_len = self.b * (1 + len(self.proposals))  # slots one step writes from L
        self.prompt_extra = self.b  # the prefill's mask slots
        self._inputs = np.full((backend.max_batch, self.b), backend.mask_token_id, dtype=np.int64)
        self._mask = backend.mask_token_id

    def prefill(self, backend: Backend, row: int, seq: SeqState) -> list[int]:
        out = backend.prefill(row, seq.prompt, not seq.params.greedy)  # rows: AR at p_{P-1}, mask slots 1..b-1
        lg = _row_logits(out, 0)
        seq.anchor = choose(out.token_ids[0, 0], None if lg is None else lg[0], seq)
        set_drafts(seq, out.token_ids[0, 1:], None if lg is None else lg[1:])
        return [seq.anchor]

    def run(self, backend: Backend, seqs: dict[int, SeqState], cache_len: np.ndarray, want: bool) -> Outputs:
        self._inputs.fill(self._mask)
        for i, seq in seqs.items():
            d = [seq.anchor] + seq.drafts  # n <= b valid drafts (sparse proposals)
            self._inputs[i, : len(d)] = d
        return backend.step(self._inputs, cache_len, want)  # [B, n_out]

    def advance(self, seq: SeqState, ids: np.ndarray, logits: np.ndarray | None) -> list[int]:
        b = self.b
        k, anchor = verify(seq, ids[:b], None if logits is None else logits[:b])
        accepted = seq.drafts[: k - 1]
        seq.L += k  # commit d_0..d_{k-1}: their K/V already sit at L..L+k-1
        seq.anchor = anchor
        next_drafts(seq, ids, logits, k, b, self.proposals)
        return accepted + [anchor]


class ARMode:
    """Plain autoregressive decoding of the same weights (the baseline and the oracle)."""

    name = "ar"
    pass_len = 1
    prompt_extra = 0

    def __init__(self, backend: Backend):
        self._inputs = np.full((backend.max_batch, 1), backend.mask_token_id, dtype=np.int64)
        self._mask = backend.mask_token_id

    def prefill(self, backend: Backend, row: int, seq: SeqState) -> list[int]:
        out = backend.ar_prefill(row, seq.prompt, not seq.params.greedy)
        lg = _row_logits(out, 0)
        seq.anchor = choose(out.token_ids[0, 0], None if lg is None else lg[0], seq)
        return [seq.anchor]

    def run(self, backend: Backend, seqs: dict[int, SeqState], cache_len: np.ndarray, want: bool) -> Outputs:
        self._inputs.fill(self._mask)
        for i, seq in seqs.items():
            self._inputs[i, 0] = seq.anchor
        return backend.ar_step(self._inputs, cache_len, want)

    def advance(self, seq: SeqState, ids: np.ndarray, logits: np.ndarray | None) -> list[int]:
        seq.L += 1
        seq.anchor = choose(ids[0], None if logits is None else logits[0], seq)
        return [seq.anchor]


MODES = {"tidar": TiDARMode, "ar": ARMode}


# ------------------------------------------------------------------------------ the scaffolding


class Decoder:
    """The rows of one backend's batch and the one decode loop over them.

    `admit(seq)` prefills a free row; `step()` runs one batched pass over every active row and
    returns the (row, tokens) pieces it decided; `release(row)` frees a row. Not thread-safe:
    one thread drives a decoder (the engine's step thread, or the caller of `generate_*`).
    """

    def __init__(self, backend: Backend, mode: str = "tidar"):
        if mode not in MODES:
            raise TiDARError(f"unknown decode mode {mode!r}: choose tidar or ar")
        self.backend = backend
        self.mode = MODES[mode](backend)
        self.rows: list[SeqState | None] = [None] * backend.max_batch
        self._cache_len = np.zeros(backend.max_batch, dtype=np.int64)

    def check_prompt(self, prompt) -> np.ndarray:
        """The prompt as an int64 vector; a one-line error if an id is outside the vocabulary, or it is
        empty, or it does not fit the cache."""
        p = check_token_ids(prompt, self.backend.vocab_size)
        if p.size == 0:
            raise FieldError("prompt", "is empty")
        need = p.size + self.mode.prompt_extra
        if need > self.backend.max_len:
            raise FieldError("prompt", f"of {p.size} tokens does not fit the KV cache of {self.backend.max_len} "
                             f"slots (needs {need})")
        return p

    def free_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.rows) if s is None]

    def active_rows(self) -> list[int]:
        """Rows still decoding; a row whose next pass would not fit the cache finishes with "cache_full"."""
        need, max_len = self.mode.pass_len, self.backend.max_len
        active = []
        for i, seq in enumerate(self.rows):
            if seq is None or seq.done:
                continue
            if seq.L + need > max_len:
                seq.finish("cache_full")
            else:
                active.append(i)
        return active

    def admit(self, seq: SeqState, row: int | None = None) -> tuple[int, list[int]]:
        """Prefill `seq` into a free row (the first one unless given); (row, tokens emitted)."""
        if row is None:
            free = self.free_rows()
            if not free:
                raise TiDARError("no free row in the batch")
            row = free[0]
        elif self.rows[row] is not None:
            raise TiDARError(f"row {row} is taken")
        self.rows[row] = seq
        t0 = time.perf_counter()
        tokens = self.mode.prefill(self.backend, row, seq)
        seq.result.stats.prefill_s = time.perf_counter() - t0
        return row, seq.emit(tokens)

    def step(self) -> list[tuple[int, list[int]]]:
        """One batched decode pass over every active row: its (row, tokens emitted) pieces; [] when none is active."""
        active = self.active_rows()
        if not active:
            return []
        seqs = {i: self.rows[i] for i in active}
        self._cache_len.fill(0)  # free and finished rows compute harmlessly at L = 0
        for i, seq in seqs.items():
            self._cache_len[i] = seq.L
        want = any(not seq.params.greedy for seq in seqs.values())
        t0 = time.perf_counter()
        out = self.mode.run(self.backend, seqs, self._cache_len, want)
        dt = time.perf_counter() - t0
        self.last_step_s = dt
        pieces = []
        for i, seq in seqs.items():
            kept = seq.emit(self.mode.advance(seq, out.token_ids[i], _row_logits(out, i)))
            seq.result.stats.accepted.append(len(kept))
            seq.result.stats.step_s.append(dt)
            pieces.append((i, kept))
        return pieces

    def release(self, row: int) -> SeqState | None:
        seq, self.rows[row] = self.rows[row], None
        return seq


# ------------------------------------------------------------------------------ batch entry points


class Stream:
    """Iterate for (row, tokens) pieces as they are decided; `results` at any time.

    `results` holds every row's result so far (finish_reason None while a row is unfinished):
    breaking out early leaves the decoded part there, and iterating again resumes where the
    last iteration stopped (a finished stream yields nothing more).
    """

    def __init__(self, pieces: Iterable, results: Callable[[], list[DecodeResult]] | None = None):
        self._pieces = iter(pieces)
        self._results = results

    @property
    def results(self) -> list[DecodeResult] | None:
        return self._results() if self._results is not None else None

    def __iter__(self):
        # a for loop, not `yield from`: closing this iterator (a `break`) must not close the source
        for piece in self._pieces:
            yield piece


def _decode(decoder: Decoder, seqs: list[SeqState]) -> Iterator[tuple[int, list[int]]]:
    """Admit every sequence (row i = sequence i), then step until all are done."""
    for i, seq in enumerate(seqs):
        yield decoder.admit(seq, i)
    pending: deque = deque()
    while True:
        pending.extend(decoder.step())
        if not pending:
            return
        while pending:
            yield pending.popleft()


def _stream(mode: str, backend: Backend, prompts: Sequence, max_new: int, params: SamplingParams,
            stop_tokens) -> Stream:
    decoder = Decoder(backend, mode)
    if len(prompts) > backend.max_batch:
        raise TiDARError(f"{len(prompts)} prompts exceed the artifact's batch of {backend.max_batch}")
    checked = [decoder.check_prompt(p) for p in prompts]
    seqs = [SeqState(p, max_new, params, stop_tokens or (), row_rng(params.seed, i)) for i, p in enumerate(checked)]
    return Stream(_decode(decoder, seqs), lambda: [s.result for s in seqs])


def stream_tidar(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
                 params: SamplingParams = SamplingParams(), stop_tokens=()) -> Stream:
    """TiDAR decoding of a batch of prompts, as a stream of (row, new tokens) pieces."""
    return _stream("tidar", backend, prompts, max_new_tokens, params, stop_tokens)


def stream_ar(backend: Backend, prompts: Sequence, max_new_tokens: int = 64,
              params: SamplingParams = SamplingParams(), stop_tokens=()) -> Stream:
    """Plain AR decoding of the same weights (the baseline and the oracle), as a stream."""
    return _stream("ar", backend, prompts, max_new_tokens, params, stop_tokens)


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
