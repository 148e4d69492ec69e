"""TiDAR's decode loop (TIDAR.md 3-6): prefill, step, verify, commit. Numpy only.

The loop owns the committed length L and the drafts; the backend owns the KV cache. Because
a step writes its keys/values at slots L..L+q-1 with the drafts first (TIDAR.md 5), committing
k accepted drafts is only `L += k`: nothing is copied, the next step overwrites the rest.

Token bookkeeping: the anchor d_0 is emitted as soon as it is chosen; a step that accepts k
drafts (d_0..d_{k-1}) therefore emits d_1..d_{k-1} plus the next anchor, k tokens in all.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tidar_runtime.errors import TiDARError
from tidar_runtime.sampling import SamplingParams, probs, sample


class Backend(Protocol):
    """What the loop needs from an engine. Logits are float arrays [rows, V]."""

    block_size: int  # b: draft rows per step
    proposals: tuple[int, ...]  # acceptance levels r with a pre-drafted block, ascending, contain 1
    max_len: int  # cache slots
    mask_token_id: int

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Run [prompt | M x b] from an empty cache. Returns [1 + b, V]: the AR row at p_{P-1}, then mask slots 0..b-1."""

    def step(self, tokens: np.ndarray, cache_len: int) -> np.ndarray:
        """Run one decode step on b draft tokens at L = cache_len. Returns [q, V] (drafts, then blocks)."""

    def ar_prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Causal pass over the prompt from an empty cache. Returns [V] logits at p_{P-1}."""

    def ar_step(self, token: int, cache_len: int) -> np.ndarray:
        """One AR token at position cache_len. Returns [V] logits."""


@dataclass
class DecodeStats:
    accepted: list[int] = field(default_factory=list)  # k (tokens emitted) of every decode forward
    prefill_s: float = 0.0  # wall time of the prefill pass
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
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "cache_full"
    stats: DecodeStats


class _Emitter:
    """Collects emitted tokens and decides when to stop."""

    def __init__(self, max_new_tokens: int, stop_tokens):
        self.tokens: list[int] = []
        self.max_new = max_new_tokens
        self.stop = set(stop_tokens or ())
        self.reason: str | None = None if max_new_tokens > 0 else "length"

    def emit(self, token: int) -> bool:
        """Add one token; True when generation is over."""
        if self.reason is None:
            if token in self.stop:
                self.reason = "stop"
            else:
                self.tokens.append(int(token))
                if len(self.tokens) >= self.max_new:
                    self.reason = "length"
        return self.reason is not None


def _check_prompt(prompt, needed: int, max_len: int) -> np.ndarray:
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise TiDARError("empty prompt")
    if needed > max_len:
        raise TiDARError(
            f"prompt of {prompt.size} tokens does not fit the KV cache of {max_len} slots (needs {needed})"
        )
    return prompt


def accept_draft(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> bool:
    """Speculative sampling: accept a draft drawn from q with probability min(1, p/q)."""
    return rng.random() * q[token] < p[token]


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distribution of the replacement after a rejection: normalize(max(0, p - q))."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p  # total == 0 only if p == q, where nothing is rejected


def _choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    return sample(probs(logits, params), rng)


def _propose(block_logits: np.ndarray, params: SamplingParams, rng):
    """Drafts from diffusion logits [n, V]: ids and, when sampling, the proposal distributions q."""
    if params.greedy:
        return [int(t) for t in block_logits.argmax(-1)], None
    q = probs(block_logits, params)
    return [sample(qi, rng) for qi in q], q


def generate_tidar(backend: Backend, prompt, max_new_tokens: int = 64,
                   params: SamplingParams = SamplingParams(), stop_tokens=()) -> DecodeResult:
    """TiDAR decoding: one forward verifies the drafts and pre-drafts every outcome's next block."""
    b, rs = backend.block_size, backend.proposals
    q_len = b + b * len(rs)
    prompt = _check_prompt(prompt, len(prompt) + b, backend.max_len)
    rng = np.random.default_rng(params.seed)
    stats, out = DecodeStats(), _Emitter(max_new_tokens, stop_tokens)

    t0 = time.perf_counter()
    logits = backend.prefill(prompt)  # [1 + b, V]
    stats.prefill_s = time.perf_counter() - t0
    L = len(prompt)
    anchor = _choose(logits[0], params, rng)  # d_0 comes from AR (TIDAR.md 3)
    drafts, q = _propose(logits[2 : 1 + b], params, rng)  # mask slots 1..b-1 -> d_1..d_{b-1}
    done = out.emit(anchor)

    while not done:
        if L + q_len > backend.max_len:
            out.reason = "cache_full"
            break
        d = [anchor] + drafts  # d_0..d_{n-1}, n <= b valid drafts
        n = len(d)
        tokens = np.full(b, backend.mask_token_id, dtype=np.int64)
        tokens[:n] = d
        t0 = time.perf_counter()
        logits = backend.step(tokens, L)  # [q_len, V]
        stats.step_s.append(time.perf_counter() - t0)
        ar = logits[:b]  # ar[i] predicts position L+i+1

        # Verify. Greedy: accept d_i while it equals argmax(AR[i-1]).
        # Sampling: accept d_i with prob min(1, p(d_i)/q(d_i)); on rejection the next anchor is
        # drawn from normalize(max(0, p - q)); if all are accepted it is drawn from p.
        k, anchor = 1, None
        for i in range(1, n):
            if params.greedy:
                target = int(np.argmax(ar[i - 1]))
                if d[i] != target:
                    anchor = target
                    break
            else:
                p_i, q_i = probs(ar[i - 1], params), q[i - 1]
                if not accept_draft(p_i, q_i, d[i], rng):
                    anchor = sample(residual(p_i, q_i), rng)
                    break
            k += 1
        if anchor is None:
            anchor = _choose(ar[k - 1], params, rng)

        L += k  # commit d_0..d_{k-1}: their KV already sits at L..L+k-1
        stats.accepted.append(k)
        for tok in d[1:k] + [anchor]:
            if out.emit(tok):
                done = True
                break
        if done:
            break

        # Next drafts: the block that assumed exactly this outcome (largest r <= k).
        r = max(x for x in rs if x <= k)
        row = b + b * rs.index(r)
        drafts, q = _propose(logits[row + k - r + 1 : row + b], params, rng)

    return DecodeResult(out.tokens, out.reason, stats)


def generate_ar(backend: Backend, prompt, max_new_tokens: int = 64,
                params: SamplingParams = SamplingParams(), stop_tokens=()) -> DecodeResult:
    """Plain autoregressive decoding of the same weights: the baseline and the oracle."""
    prompt = _check_prompt(prompt, len(prompt), backend.max_len)
    rng = np.random.default_rng(params.seed)
    stats, out = DecodeStats(), _Emitter(max_new_tokens, stop_tokens)
    t0 = time.perf_counter()
    logits = backend.ar_prefill(prompt)
    stats.prefill_s = time.perf_counter() - t0
    L = len(prompt)
    token = _choose(logits, params, rng)
    done = out.emit(token)
    while not done:
        if L + 1 > backend.max_len:
            out.reason = "cache_full"
            break
        t0 = time.perf_counter()
        logits = backend.ar_step(token, L)
        stats.step_s.append(time.perf_counter() - t0)
        L += 1
        stats.accepted.append(1)
        token = _choose(logits, params, rng)
        done = out.emit(token)
    return DecodeResult(out.tokens, out.reason, stats)
