"""Measuring a quantized artifact against its float source: greedy agreement, teacher-forced loss and
token agreement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tidar_export.errors import TiDARError

def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Greedy token agreement: the tokens `other` decodes before its first difference from
    `reference`, over all the reference's tokens (after a difference the texts diverge, and
    position-wise matches would mean nothing)."""
    total = sum(len(r) for r in reference)
    return sum(common_prefix(r, o) for r, o in zip(reference, other)) / max(1, total)


def teacher_forced(backend, windows: Sequence[Sequence[int]]) -> tuple[float, list[list[int]]]:
    """The AR mode fed the true tokens: the prefill graph on the first token of each window, then
    the ar_step graph one token at a time. Returns the mean next-token cross-entropy (nats) and,
    per window, the argmax at every position (what greedy decoding would pick there)."""
    total, count, picks = 0.0, 0, []
    for w in windows:
        w = np.asarray(w, np.int64)
        if len(w) + 1 > backend.max_len:
            raise TiDARError(f"window of {len(w)} tokens does not fit the cache of {backend.max_len} slots")
        logits = backend.ar_prefill(0, w[:1], True).logits[0, 0]
        tokens = np.zeros((backend.max_batch, 1), np.int64)
        cache_len = np.zeros(backend.max_batch, np.int64)
        row = []
        for t in range(1, len(w)):
            z = logits.astype(np.float64)
            total += float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[w[t]])
            count += 1
            row.append(int(z.argmax()))
            tokens[0, 0], cache_len[0] = w[t], t
            logits = backend.ar_step(tokens, cache_len, True).logits[0, 0]
        picks.append(row)
    return total / max(1, count), picks


def teacher_forced_ar_loss(backend, windows: Sequence[Sequence[int]]) -> float:
    """Mean next-token cross-entropy (nats) of the AR mode over `windows` (see teacher_forced)."""
    return teacher_forced(backend, windows)[0]


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Fraction of positions where two runs pick the same token (same inputs at every position)."""
    pairs = [(a, b) for r, o in zip(reference, other) for a, b in zip(r, o)]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


AGREEMENT_WARNING = 0.9  # per-token agreement with the source artifact below which `quantize` warns
AGREEMENT_PROMPTS, AGREEMENT_PROMPT_LEN, AGREEMENT_NEW_TOKENS = 4, 24, 16  # the check after quantizing


def agreement_with_source(source_dir, quantized_dir, prompts: Sequence[Sequence[int]],
                          max_new_tokens: int = AGREEMENT_NEW_TOKENS) -> float:
    """Per-token agreement of a quantized artifact with its source on `prompts`: the source's greedy
    AR continuation of each, then the argmax of both artifacts at every position of prompt +
    continuation, fed the same tokens (`teacher_forced`)."""
    from tidar_runtime import SamplingParams, generate_ar
    from tidar_runtime.backends.ort import OrtBackend

    source, quantized = OrtBackend(source_dir), OrtBackend(quantized_dir)
    room = source.max_len - max_new_tokens - 1
    prompts = [list(p)[-room:] for p in prompts if len(p)]
    windows = [p + generate_ar(source, p, max_new_tokens, SamplingParams()).tokens for p in prompts]
    _, want = teacher_forced(source, windows)
    _, got = teacher_forced(quantized, windows)
    return token_agreement(want, got)
