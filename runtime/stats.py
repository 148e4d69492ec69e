"""Summaries of decode statistics: tokens per forward, acceptance histogram, latency, rate."""

from __future__ import annotations

import numpy as np

from tidar_runtime.loop import DecodeResult


def percentiles_ms(seconds: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    if not seconds:
        return {f"p{q}": None for q in qs}
    ms = np.percentile(np.asarray(seconds) * 1e3, qs)
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, ms)}


def summarize(result: DecodeResult) -> dict:
    """JSON-ready figures of one decoded row."""
    st = result.stats
    decode_s = sum(st.step_s)
    n = len(result.tokens)
    return {
        "new_tokens": n,
        "finish_reason": result.finish_reason,
        "forwards": st.forwards,
        "tokens_per_forward": round(st.tokens_per_forward, 3),
        "accepted_histogram": {str(k): v for k, v in st.histogram.items()},
        "prefill_ms": round(st.prefill_s * 1e3, 3),
        "step_ms": percentiles_ms(st.step_s),
        # decode rate: tokens after the first (which the prefill produced) over decode time
        "tokens_per_s": round((n - 1) / decode_s, 2) if decode_s > 0 and n > 1 else None,
    }
