"""TiDAR greedy decoding equals AR greedy decoding, token for token (TIDAR.md 4, beta = 1)."""

import numpy as np
import pytest

from tidar_export.errors import TiDARError
from tidar_export.reference import TorchBackend
from tidar_runtime import generate_ar, generate_tidar

PROMPTS = [[3], [5, 17, 42, 9, 100, 7], list(range(30, 60))]


@pytest.mark.parametrize("b", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["len1", "len6", "len30"])
def test_tidar_greedy_equals_ar(tiny_model, b, prompt):
    n = 40
    ar = generate_ar(TorchBackend(tiny_model, 256), prompt, n)
    td = generate_tidar(TorchBackend(tiny_model, 256, block_size=b), prompt, n)
    assert td.tokens == ar.tokens
    assert len(td.tokens) == n and td.finish_reason == ar.finish_reason == "length"
    assert all(1 <= k <= b for k in td.stats.accepted)


@pytest.mark.parametrize("proposals", [[1], [1, 3], [1, 2, 4]])
def test_sparse_proposals_equal_ar(tiny_model, proposals):
    prompt = PROMPTS[1]
    ar = generate_ar(TorchBackend(tiny_model, 256), prompt, 40)
    td = generate_tidar(TorchBackend(tiny_model, 256, block_size=4, proposals=proposals), prompt, 40)
    assert td.tokens == ar.tokens


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_and_stop_tokens(tiny_model, max_new):
    prompt = PROMPTS[1]
    ref = generate_ar(TorchBackend(tiny_model, 256), prompt, 30).tokens
    for run in (generate_ar, generate_tidar):
        res = run(TorchBackend(tiny_model, 256), prompt, max_new)
        assert res.tokens == ref[:max_new] and res.finish_reason == "length"
    stop = ref[5]
    first = ref.index(stop)
    for run in (generate_ar, generate_tidar):
        res = run(TorchBackend(tiny_model, 256), prompt, 30, stop_tokens=[stop])
        assert res.tokens == ref[:first] and res.finish_reason == "stop"


def test_cache_full_stops_with_reason(tiny_model):
    prompt = PROMPTS[1]
    ar = generate_ar(TorchBackend(tiny_model, 20), prompt, 100)
    assert ar.finish_reason == "cache_full" and len(ar.tokens) == 20 - len(prompt) + 1
    td = generate_tidar(TorchBackend(tiny_model, 40, block_size=4), prompt, 100)
    assert td.finish_reason == "cache_full"
    assert td.tokens == generate_ar(TorchBackend(tiny_model, 256), prompt, len(td.tokens)).tokens


def test_prompt_longer_than_cache(tiny_model):
    with pytest.raises(TiDARError, match="does not fit the KV cache"):
        generate_tidar(TorchBackend(tiny_model, 16, block_size=4), list(range(14)), 5)
    with pytest.raises(TiDARError, match="does not fit the KV cache"):
        generate_ar(TorchBackend(tiny_model, 16), list(range(17)), 5)


class ScriptedDrafts:
    """Wraps a backend and overwrites its diffusion logits so that the drafts are right for a
    scripted number of slots and wrong after it. AR logits are untouched, so verification is
    the real model's, and the KV cache is the real one: the commit/rewind logic is exercised
    with acceptances of every length 1..b, not only the all-rejected case of a random model.
    """

    def __init__(self, inner, oracle, correct_per_step):
        self.inner, self.oracle, self.plan = inner, oracle, list(correct_per_step)
        for name in ("block_size", "proposals", "max_len", "mask_token_id"):
            setattr(self, name, getattr(inner, name))
        self.calls = 0

    def _script(self, logits, rows, L_plus):
        """rows: logits rows of mask slots; L_plus[t]: absolute position slot t predicts."""
        j = self.plan[self.calls % len(self.plan)]  # drafts d_1..d_j will be right
        self.calls += 1
        for row, pos, t in rows:
            want = self.oracle[pos] if t <= j else (self.oracle[pos] + 1) % logits.shape[1]
            logits[row] = -10.0
            logits[row, want] = 10.0

    def prefill(self, prompt):
        out = self.inner.prefill(prompt).copy()
        P, b = len(prompt), self.block_size
        self._script(out, [(1 + t, P + t, t) for t in range(b)], None)
        return out

    def step(self, tokens, L):
        out = self.inner.step(tokens, L).copy()
        b = self.block_size
        rows = [(b + n * b + t, L + r + t, t) for n, r in enumerate(self.proposals) for t in range(b)]
        self._script(out, rows, None)
        return out


@pytest.mark.parametrize("b", [2, 4, 5])
def test_partial_and_full_acceptance_commit_logic(tiny_model, b):
    prompt = PROMPTS[1]
    n = 60
    ar = generate_ar(TorchBackend(tiny_model, 512), prompt, n + 3 * b).tokens
    oracle = list(prompt) + ar  # oracle[pos] = AR greedy token at absolute position pos
    plan = [b - 1, 0, *range(1, b - 1)]  # next step accepts k = j + 1: b, 1, 2, ..., b-1
    backend = ScriptedDrafts(TorchBackend(tiny_model, 512, block_size=b), oracle, plan)
    res = generate_tidar(backend, prompt, n)
    assert res.tokens == ar[:n]
    expected_k = [min(plan[s % len(plan)] + 1, b) for s in range(len(res.stats.accepted))]
    assert res.stats.accepted[:-1] == expected_k[:-1]  # the last step may be cut by max_new_tokens
    assert set(res.stats.accepted[:-1]) == set(range(1, b + 1))
    assert res.stats.tokens_per_forward > 1.0
