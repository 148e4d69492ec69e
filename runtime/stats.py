"""Summaries of decode statistics: tokens per forward, acceptance histogram, latency, rate."""

from __future__ import annotations

import numpy as np

from tidar_runtime.loop import DecodeResult


def percentiles_ms(seconds: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    if not seconds:
        return {f"p{q}": None for q in qs}
    ms = np.percentile(np.asarray(seconds) * 1e3, qs)
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, ms)}


def rate(tokens: float, seconds: float) -> float | None:
    """tokens / seconds, or None when either is zero."""
    return tokens / seconds if seconds > 0 and tokens > 0 else None


def tokens_per_s(results: list[DecodeResult]) -> float | None:
    """The decode rate, the one definition of tokens/s in this project: the tokens after each
    row's first (which the prefill produced) over the decode forwards' time (step_s). Callers
    that time whole decode calls (bench) use `rate` with the same numerator."""
    return rate(sum(max(0, len(r.tokens) - 1) for r in results), sum(sum(r.stats.step_s) for r in results))


def summarize(result: DecodeResult) -> dict:
    """JSON-ready figures of one decoded row."""
    st = result.stats
    n = len(result.tokens)
    tps = tokens_per_s([result])
    return {
        "new_tokens": n,
        "finish_reason": result.finish_reason,
        "forwards": st.forwards,
        "tokens_per_forward": round(st.tokens_per_forward, 3),
        "accepted_histogram": {str(k): v for k, v in st.histogram.items()},
        "prefill_ms": round(st.prefill_s * 1e3, 3),
        "step_ms": percentiles_ms(st.step_s),
        "tokens_per_s": None if tps is None else round(tps, 2),
    }
