"""TiDAR sampling has exactly the AR sampling distribution (docs/ALGORITHM.md section 6).

On a model with an 8-token vocabulary, the exact distribution of the first three generated
tokens under AR sampling is computed by enumerating all 8^3 continuations; TiDAR samples from
many seeds are compared to it with a chi-square test. The same test, run against two classic
wrong acceptance rules, must reject them: it has the power to catch a broken rule.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chi2

import tidar_runtime.loop as loop
from tests.conftest import random_model
from tidar_export.model import masks
from tidar_export.model.reference import TorchBackend
from tidar_runtime import SamplingParams, generate_ar, generate_tidar
from tidar_runtime.sampling import probs

V, N_NEW, PROMPT = 8, 3, [1, 2, 3]
RUNS = 2500


@pytest.fixture(scope="module")
def small_vocab_model():
    return random_model(seed=3, vocab_size=V, mask_token_id=V - 1, hidden_size=32,
                        intermediate_size=64, num_layers=1, head_dim=8)


def exact_ar_distribution(model, params, n_new: int = N_NEW) -> dict[tuple, float]:
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n_new)))  # [V^n, n]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    T = ids.shape[1]
    with torch.no_grad():
        logits, _, _ = model(ids, torch.arange(T).expand(len(seqs), -1), masks.causal_mask(T))
    p = probs(logits[:, len(PROMPT) - 1 : -1].double().numpy(), params)  # [V^n, n, V]
    step_p = np.take_along_axis(p, seqs.numpy()[..., None], axis=-1)[..., 0]
    return {tuple(s): float(pr) for s, pr in zip(seqs.tolist(), step_p.prod(axis=1))}


def chi_square_pvalue(counts: dict[tuple, int], exact: dict[tuple, float], n: int) -> float:
    """Pearson chi-square; outcomes expected fewer than 5 times are pooled into one bin."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for seq, pr in exact.items():
        if pr * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(pr * n)
        else:
            pool_o += counts.get(seq, 0)
            pool_e += pr * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    obs, exp = np.array(obs), np.array(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(chi2.sf(stat, len(obs) - 1))


def sample_counts(run, model, params, block_size=3, proposals=None, n_new=N_NEW):
    backend = TorchBackend(model, 64, block_size=block_size, proposals=proposals)
    counts: dict[tuple, int] = {}
    for seed in range(RUNS):
        res = run(backend, PROMPT, n_new, SamplingParams(params.temperature, params.top_k, params.top_p, seed))
        key = tuple(res.tokens)
        counts[key] = counts.get(key, 0) + 1
    return counts


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4, top_p=0.9)]


@pytest.mark.parametrize("params", PARAMS, ids=["T1", "T0.8-topk4-topp0.9"])
def test_tidar_sampling_matches_ar_distribution(small_vocab_model, params):
    exact = exact_ar_distribution(small_vocab_model, params)
    assert abs(sum(exact.values()) - 1) < 1e-9
    counts = sample_counts(generate_tidar, small_vocab_model, params)
    assert chi_square_pvalue(counts, exact, RUNS) > 1e-3
    # The drafts must really be exercised: some accepted, some rejected.
    res = [generate_tidar(TorchBackend(small_vocab_model, 64, block_size=3), PROMPT, 12,
                          SamplingParams(params.temperature, params.top_k, params.top_p, s)) for s in range(40)]
    ks = [k for r in res for k in r.stats.accepted]
    assert min(ks) == 1 and max(ks) >= 2


def test_ar_sampling_matches_exact_distribution(small_vocab_model):
    params = PARAMS[0]
    counts = sample_counts(generate_ar, small_vocab_model, params)
    assert chi_square_pvalue(counts, exact_ar_distribution(small_vocab_model, params), RUNS) > 1e-3


@pytest.mark.parametrize("wrong", ["always_accept", "resample_from_p"])
def test_chi_square_rejects_wrong_acceptance_rules(small_vocab_model, monkeypatch, wrong):
    params = PARAMS[0]
    if wrong == "always_accept":  # keep every draft: the output follows q, not p
        monkeypatch.setattr(loop, "accept_draft", lambda p, q, tok, rng: True)
    else:  # replace a rejected draft with a sample of p instead of normalize(max(0, p - q))
        monkeypatch.setattr(loop, "residual", lambda p, q: p)
    counts = sample_counts(generate_tidar, small_vocab_model, params)
    assert chi_square_pvalue(counts, exact_ar_distribution(small_vocab_model, params), RUNS) < 1e-6


@pytest.mark.parametrize("params", PARAMS[1:], ids=["T0.8-topk4-topp0.9"])  # the filters too; one case for time
def test_tidar_sampling_over_a_sparse_proposal_set_matches_ar(small_vocab_model, params):
    """b = 3 with blocks {1, 3} only: a step that accepts k = 2 has no block of its own, so the
    next step drafts from block 1 with one draft fewer. Four new tokens (8^4 outcomes) so that
    such a step lies inside the tested window: prefill (1) + a step accepting 2 + the next."""
    n_new, proposals = 4, [1, 3]
    exact = exact_ar_distribution(small_vocab_model, params, n_new)
    assert abs(sum(exact.values()) - 1) < 1e-9
    counts = sample_counts(generate_tidar, small_vocab_model, params, 3, proposals, n_new)
    assert chi_square_pvalue(counts, exact, RUNS) > 1e-3
    backend = TorchBackend(small_vocab_model, 64, block_size=3, proposals=proposals)
    runs = [generate_tidar(backend, PROMPT, n_new, SamplingParams(params.temperature, params.top_k, params.top_p, s))
            for s in range(200)]
    # the sparse path really runs inside the window: a k = 2 step followed by another step
    assert any(2 in r.stats.accepted[:-1] for r in runs)
