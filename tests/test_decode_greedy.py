"""TiDAR greedy decoding equals AR greedy decoding, token for token (docs/ALGORITHM.md section 4, beta = 1)."""

import pytest

from tidar_export.errors import TiDARError
from tidar_export.model.reference import TorchBackend
from tidar_runtime import Outputs, generate_ar, generate_tidar
from tidar_runtime.contract import block_out_row

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
    """Wraps a backend and overwrites its diffusion outputs so that the drafts are right for a
    scripted number of slots and wrong after it. AR outputs are untouched, so verification is
    the real model's, and the KV cache is the real one: the commit/rewind logic is exercised
    with acceptances of every length 1..b, not only the all-rejected case of a random model.
    """

    def __init__(self, inner, oracle, correct_per_step):
        self.inner, self.oracle, self.plan = inner, oracle, list(correct_per_step)
        for name in ("block_size", "proposals", "max_len", "max_batch", "mask_token_id", "vocab_size"):
            setattr(self, name, getattr(inner, name))
        self.vocab = inner.model.cfg.vocab_size
        self.calls = 0

    def _script(self, ids, slots):
        """slots: (output row, absolute position it predicts, block slot t)."""
        j = self.plan[self.calls % len(self.plan)]  # drafts d_1..d_j of the next step will be right
        self.calls += 1
        for row, pos, t in slots:
            ids[0, row] = self.oracle[pos] if t <= j else (self.oracle[pos] + 1) % self.vocab
        return Outputs(ids)

    def prefill(self, row, prompt, want_logits):
        ids = self.inner.prefill(row, prompt, False).token_ids.copy()
        return self._script(ids, [(t, len(prompt) + t, t) for t in range(1, self.block_size)])

    def step(self, drafts, cache_len, want_logits):
        ids = self.inner.step(drafts, cache_len, False).token_ids.copy()
        b, L = self.block_size, int(cache_len[0])
        slots = [(block_out_row(b, self.proposals, r) + t - 1, L + r + t, t)
                 for r in self.proposals for t in range(1, b)]
        return self._script(ids, slots)


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


def _expected_sparse_ks(plan, b, proposals, steps):
    """Accepted lengths under ScriptedDrafts: step s gets drafts from the block chosen after
    step s-1 (all b-1 mask slots after the prefill); slot t of it is right iff t <= plan[s]."""
    ks, shift = [], 0  # shift = k - r: the leading slots of block r that the commit skipped
    for s in range(steps):
        j = min(plan[s % len(plan)], b - 1)
        k = 1 + max(0, j - shift)
        ks.append(k)
        r = max(x for x in proposals if x <= k)
        shift = k - r
    return ks


@pytest.mark.parametrize("b,proposals", [(4, [1, 3]), (5, [1, 2, 5]), (4, [1])])
def test_sparse_proposals_partial_acceptance_commit_logic(tiny_model, b, proposals):
    """Scripted drafts over sparse proposal sets: after k accepted tokens the next drafts come
    from block r < k when k has no block of its own, so the next step gets fewer than b - 1
    drafts. Every step's accepted length is predicted exactly, and TiDAR still equals AR."""
    prompt = PROMPTS[1]
    n = 60
    ar = generate_ar(TorchBackend(tiny_model, 512), prompt, n + 3 * b).tokens
    oracle = list(prompt) + ar
    plan = [b - 1, 0, *range(1, b - 1), b - 1, b - 1]
    backend = ScriptedDrafts(TorchBackend(tiny_model, 512, block_size=b, proposals=proposals), oracle, plan)
    res = generate_tidar(backend, prompt, n)
    assert res.tokens == ar[:n]
    ks = res.stats.accepted
    assert ks[:-1] == _expected_sparse_ks(plan, b, backend.proposals, len(ks))[:-1]
    assert len(set(ks[:-1])) >= 2 and max(ks) > 1  # partial and longer acceptances both happen
    # at least one step ran on fewer than b - 1 drafts (a block r < k was the only match)
    assert any(max(x for x in backend.proposals if x <= k) < k for k in ks[:-1])


@pytest.mark.parametrize("b,proposals", [(4, None), (4, [1, 3]), (5, [1, 2, 5])])
def test_proposal_block_choice(b, proposals):
    """The block that assumed k accepted tokens (largest r <= k) and the rows of its slots that
    predict the positions after the new anchor."""
    from tidar_runtime.contract import normalize_proposals
    from tidar_runtime.loop import proposal_block

    rs = normalize_proposals(b, proposals)
    for k in range(1, b + 1):
        r, lo, hi = proposal_block(b, rs, k)
        assert r in rs and r <= k and all(x > k for x in rs if x > r)
        first = block_out_row(b, rs, r)  # output row of slot 1 of block r
        assert hi == first + b - 1  # up to slot b-1, the block's last
        assert lo == first + (k - r)  # slot k-r+1: it predicts L_old + k + 1, right after the anchor
        assert hi - lo == b - 1 - (k - r)
        if k in rs:
            assert (r, hi - lo) == (k, b - 1)  # a dense match: a full set of drafts


def test_tokens_per_forward_counts_only_emitted_tokens(tiny_model):
    """A last step cut by the length limit or a stop token counts the tokens it emitted."""
    prompt = PROMPTS[1]
    b, n = 4, 10
    ar = generate_ar(TorchBackend(tiny_model, 512), prompt, 40).tokens
    oracle = list(prompt) + ar
    backend = ScriptedDrafts(TorchBackend(tiny_model, 512, block_size=b), oracle, [b - 1])  # every draft right
    res = generate_tidar(backend, prompt, n)  # 1 token from the prefill, then steps of 4: 4, 4, and 1 of 4
    assert res.tokens == ar[:n] and res.stats.accepted == [4, 4, 1]
    assert sum(res.stats.accepted) == n - 1 and res.stats.tokens_per_forward == 3.0
    stop = ar[6]  # stops inside the second step: tokens 0..5 emitted, the stop token is not
    res = generate_tidar(ScriptedDrafts(TorchBackend(tiny_model, 512, block_size=b), oracle, [b - 1]), prompt, 30,
                         stop_tokens=[stop])
    first = ar.index(stop)
    assert res.finish_reason == "stop" and res.tokens == ar[:first]
    assert sum(res.stats.accepted) == len(res.tokens) - 1 and res.stats.accepted[-1] < b


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_stream_results_after_an_early_break_and_a_second_iteration(tiny_model, mode):
    from tidar_runtime import stream_ar, stream_tidar

    run = stream_tidar if mode == "tidar" else stream_ar
    prompts = [PROMPTS[0], PROMPTS[1]]
    full = [generate_ar(TorchBackend(tiny_model, 256), PROMPTS[1], 12).tokens]  # greedy: the same in both modes
    stream = run(TorchBackend(tiny_model, 256, block_size=4, max_batch=2), prompts, 12)
    seen = []
    for i, piece in stream:
        seen.append((i, piece))
        if len(seen) == 4:
            break
    partial = stream.results
    assert partial is not None and len(partial) == 2
    assert all(r.finish_reason is None for r in partial) and len(partial[1].tokens) >= 1
    assert partial[1].tokens == full[0][: len(partial[1].tokens)]
    rest = list(stream)  # resumes where the first iteration stopped
    assert rest and rest[0] != seen[-1]
    got = {0: [], 1: []}
    for i, piece in seen + rest:
        got[i] += piece
    assert [got[0], got[1]] == [r.tokens for r in stream.results]
    assert stream.results[1].tokens == full[0] and all(r.finish_reason == "length" for r in stream.results)
    assert list(stream) == [] and stream.results[1].tokens == full[0]  # a finished stream stays finished
