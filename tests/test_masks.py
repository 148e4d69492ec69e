"""Every mask entry for small b against the rules of docs/ALGORITHM.md (sections 2-4, 8), written out as plain loops."""

import itertools

import pytest
import torch

from tidar_export.model import masks
from tidar_export.errors import TiDARError

from .mask_rules import train_mask_entry

BLOCK_SIZES = [1, 2, 3, 4]


def proposal_sets(b):
    """All subsets of 1..b that contain block 1 (the dense set among them)."""
    rest = range(2, b + 1)
    for n in range(len(rest) + 1):
        for combo in itertools.combinations(rest, n):
            yield (1, *combo)


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("S", [1, 4, 7])
def test_train_mask_rules(S, b):
    m = masks.train_mask(S, b)
    assert m.shape == (2 * S, 2 * S)
    for q in range(2 * S):
        for k in range(2 * S):
            assert bool(m[q, k]) == train_mask_entry(q, k, S, b), (q, k)
    assert masks.train_positions(S).tolist() == list(range(S)) * 2


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("P", [1, 3, 5])
def test_prefill_mask_rules(P, b):
    m = masks.prefill_mask(P, b)
    assert m.shape == (P + b, P + b)
    for q in range(P + b):
        for k in range(P + b):
            want = k <= q if q < P else True  # prompt causal; masks see the prompt and each other
            assert bool(m[q, k]) == want, (q, k)
    assert masks.prefill_positions(P, b).tolist() == list(range(P + b))


def describe_step_rows(b, rs):
    """Row -> ("draft", i) or ("mask", r, t), in the layout of docs/ALGORITHM.md section 4."""
    rows = [("draft", i) for i in range(b)]
    rows += [("mask", r, t) for r in rs for t in range(b)]
    return rows


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_step_mask_rules_every_proposal_set(b):
    for rs in proposal_sets(b):
        m = masks.step_mask(b, rs)
        rows = describe_step_rows(b, rs)
        assert m.shape == (len(rows), len(rows)) == (masks.step_len(b, rs),) * 2
        for qi, qd in enumerate(rows):
            for ki, kd in enumerate(rows):
                if qd[0] == "draft" and kd[0] == "draft":
                    want = kd[1] <= qd[1]  # draft i sees d_0..d_i
                elif qd[0] == "draft":
                    want = False  # drafts never see mask tokens
                elif kd[0] == "draft":
                    want = kd[1] < qd[1]  # block r sees d_0..d_{r-1}
                else:
                    want = kd[1] == qd[1]  # own block, bidirectional; never another block
                assert bool(m[qi, ki]) == want, (rs, qd, kd)
        offsets = masks.step_offsets(b, rs).tolist()
        assert offsets == [d[1] if d[0] == "draft" else d[1] + d[2] for d in rows]
        for r in rs:
            assert rows[masks.block_row(b, rs, r)] == ("mask", r, 0)


def test_step_len_matches_paper():
    assert [masks.step_len(b) for b in (4, 8, 16)] == [20, 72, 272]
    assert masks.step_len(16, [1, 4, 7, 10, 16]) == 16 + 5 * 16


def test_dense_is_default():
    assert torch.equal(masks.step_mask(3), masks.step_mask(3, [1, 2, 3]))


@pytest.mark.parametrize("bad", [[4, 7], [0, 1], [1, 5], []])
def test_invalid_proposals(bad):
    with pytest.raises(TiDARError):
        masks.normalize_proposals(4, bad)


def test_causal_mask():
    m = masks.causal_mask(4)
    assert all(bool(m[q, k]) == (k <= q) for q in range(4) for k in range(4))


@pytest.mark.parametrize("b", [1, 2, 4])
def test_with_cache_rules(b):
    in_step = masks.step_mask(b)
    q, S = in_step.shape[0], 40
    lens = torch.tensor([0, 5, S - q])  # per-row committed lengths, including a full window
    full = masks.with_cache(in_step, lens, S)
    assert full.shape == (3, 1, q, S)
    for row, L in enumerate(lens.tolist()):
        for i in range(q):
            for s in range(S):
                if s < L:
                    want = True  # committed cache
                elif s < L + q:
                    want = bool(in_step[i, s - L])  # this step's own keys, static pattern
                else:
                    want = False  # stale slots of rejected drafts / earlier steps
                assert bool(full[row, 0, i, s]) == want, (row, i, s)


@pytest.mark.parametrize("b", [1, 3])
def test_cache_then_step_matches_with_cache(b):
    """The [cache | step] layout hides the same keys as the in-place layout."""
    in_step = masks.step_mask(b)
    q, S = in_step.shape[0], 30
    lens = torch.tensor([0, 4, S - q])
    concat = masks.cache_then_step(in_step, lens, S)
    inplace = masks.with_cache(in_step, lens, S)
    assert concat.shape == (3, 1, q, S + q)
    for row, L in enumerate(lens.tolist()):
        # key slot s < L is the same key in both layouts; the step's key j sits at S + j vs L + j
        assert torch.equal(concat[row, 0, :, :L], inplace[row, 0, :, :L])
        assert not concat[row, 0, :, L:S].any()
        assert torch.equal(concat[row, 0, :, S:], inplace[row, 0, :, L : L + q])
