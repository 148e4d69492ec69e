"""Token choice: greedy, and temperature / top-k / top-p sampling, numpy only.

The same filtered distribution is used for the AR target p and the diffusion proposal q
(top-k/top-p apply to p and q alike, so speculative sampling keeps the filtered AR distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tidar_runtime.errors import FieldError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples from softmax(logits / T)
    top_k: int = 0  # keep only the k most likely tokens; 0 disables
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 disables
    seed: int | None = None  # seed of the numpy generator; None draws fresh entropy

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self) -> None:
        check_sampling(self)


class SamplingError(FieldError, ValueError):
    """Invalid sampling parameters: a one-line user error (a ValueError too, for older callers).
    Its message names the command-line flag (--top-p); `field` is the API name (top_p)."""

    def __init__(self, field: str, detail: str):
        super().__init__(field, detail)
        self.args = (self.named("--" + field.replace("_", "-")),)

    def __str__(self) -> str:
        return self.args[0]


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4  # below: logits / T overflows (1e-320 gives NaN); use 0 for greedy
MAX_SEED = 2**64 - 1


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_sampling(p: "SamplingParams") -> None:
    """The one validation of sampling options, for every command and the server."""
    t = p.temperature
    if not _is_real(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise SamplingError("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                            f"got {t!r}"[:200])
    if isinstance(p.top_k, (bool, np.bool_)) or not isinstance(p.top_k, (int, np.integer)) or p.top_k < 0:
        raise SamplingError("top_k", f"must be an integer >= 0 (0 disables it), got {p.top_k!r}"[:200])
    if not _is_real(p.top_p) or not math.isfinite(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise SamplingError("top_p", f"must be in (0, 1], got {p.top_p!r}"[:200])
    s = p.seed
    if s is not None and (isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
                          or not 0 <= s <= MAX_SEED):
        raise SamplingError("seed", f"must be an integer in 0..2**64-1, got {s!r}"[:200])


def probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Filtered, normalised distribution over the last axis (float64). logits: [..., V]."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k, axis=-1)[..., -params.top_k, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # keep a token if the mass strictly before it is still below top_p (the first always stays)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def row_rng(seed: int | None, row: int = 0) -> np.random.Generator:
    """The random generator of batch row `row` for a request seeded with `seed` (None: fresh
    entropy). The one rule for every entry point: a request served alone by the engine draws
    what row 0 of `generate_*` draws, so a seeded request gives the same sample everywhere."""
    return np.random.default_rng(None if seed is None else [seed, row])


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a 1-D distribution (inverse CDF; robust to rounding)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))
