"""Token choice: greedy, and temperature / top-k / top-p sampling, numpy only.

The same filtered distribution is used for the AR target p and the diffusion proposal q
(top-k/top-p apply to p and q alike, so speculative sampling keeps the filtered AR distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling parameters {self}")


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


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a 1-D distribution (inverse CDF; robust to rounding)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))
