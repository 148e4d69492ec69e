"""The single source of truth for TiDAR's attention masks and position ids (docs/ALGORITHM.md sections 2-4, 8).

Convention everywhere: a boolean matrix `allow[q, k]`, True where query q may attend to key k.
The in-step patterns below are constants of (block size, proposal set); only the part that
covers the KV cache depends on the committed length L, and `with_cache` adds it.

Layouts (b = block size, `M` = mask token):
- training:  [x_0 .. x_{S-1} | M x S], positions [0..S-1, 0..S-1]
- prefill:   [p_0 .. p_{P-1} | M x b], positions [0..P-1, P..P+b-1]
- step:      [d_0 .. d_{b-1} | block_r1 | block_r2 | ...], each block b masks;
             draft i at L+i, block r slot t at L+r+t
- AR:        causal over the new tokens (after the cache)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tidar_runtime.contract import normalize_proposals, prefill_out_rows, step_len, step_out_rows  # noqa: F401 (step_len re-exported)


def causal_mask(n: int) -> torch.Tensor:
    """[n, n] lower-triangular: token i sees tokens 0..i (plain AR)."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def train_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """[2S, 2S] training mask over [clean x S | mask x S] (docs/ALGORITHM.md section 2)."""
    S, b = seq_len, block_size
    i = torch.arange(S)
    m = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
    m[:S, :S] = i[None, :] <= i[:, None]  # clean i -> clean i' iff i' <= i
    block = i // b
    m[S:, :S] = i[None, :] < (b * block)[:, None]  # mask j -> clean i' iff i' < b*floor(j/b)
    m[S:, S:] = block[None, :] == block[:, None]  # mask j -> mask j' iff same block
    return m  # clean -> mask stays False


def train_positions(seq_len: int) -> torch.Tensor:
    """[2S] positions [0..S-1, 0..S-1]: mask slot j sits at position j and predicts x_j."""
    i = torch.arange(seq_len)
    return torch.cat([i, i])


def prefill_mask(prompt_len: int, block_size: int) -> torch.Tensor:
    """[P+b, P+b]: prompt causal; the b masks see the whole prompt and each other."""
    # Comparisons only (no in-place writes), so that the prefill graph builds it from its
    # dynamic prompt length with a few elementwise ops.
    i = torch.arange(prompt_len + block_size)
    q, k = i[:, None], i[None, :]
    return (k <= q) | (q >= prompt_len)  # prompt rows: causal (masks lie after them); mask rows: all


def prefill_positions(prompt_len: int, block_size: int) -> torch.Tensor:
    """[P+b] positions 0..P+b-1: mask slot t at P+t predicts position P+t."""
    return torch.arange(prompt_len + block_size)


def step_mask(block_size: int, proposals: Sequence[int] | None = None) -> torch.Tensor:
    """[q, q] in-step part of the decode-step mask (docs/ALGORITHM.md section 4), q = step_len(b, proposals).

    Draft i sees d_0..d_i. Block r sees d_0..d_{r-1} and all of block r, never another block.
    Drafts never see mask tokens.
    """
    b = block_size
    rs = normalize_proposals(b, proposals)
    q = b + b * len(rs)
    m = torch.zeros(q, q, dtype=torch.bool)
    m[:b, :b] = causal_mask(b)
    for n, r in enumerate(rs):
        s = b + n * b
        m[s : s + b, :r] = True  # the r drafts assumed accepted
        m[s : s + b, s : s + b] = True  # bidirectional inside its own block
    return m


def step_offsets(block_size: int, proposals: Sequence[int] | None = None) -> torch.Tensor:
    """[q] position offsets from L: draft i -> i, block r slot t -> r + t."""
    b = block_size
    rs = normalize_proposals(b, proposals)
    t = torch.arange(b)
    return torch.cat([t] + [r + t for r in rs])


def block_row(block_size: int, proposals: Sequence[int] | None, r: int) -> int:
    """Row index of slot 0 of proposal block r inside the step."""
    rs = normalize_proposals(block_size, proposals)
    return block_size + block_size * rs.index(r)


# --------------------------------------------------------------------------- the inputs of each pass
# The one construction of each graph's rows, positions, mask and output rows from its inputs: the
# traced graphs (tidar_export.export.tracing), the torch backend and the reference outputs use it.


def prefill_pass(prompt: torch.Tensor, block_size: int, mask_token_id: int):
    """[prompt | M x b] of a prefill, prompt [B, P] -> (ids [B, P+b], positions [B, P+b], mask
    [P+b, P+b]). Its output rows: `prefill_out_rows` (AR at p_{P-1}, then mask slots 1..b-1)."""
    B, P = prompt.shape
    ids = torch.cat([prompt, prompt.new_full((B, block_size), mask_token_id)], dim=1)
    positions = prefill_positions(P, block_size)[None].expand(B, -1)
    return ids, positions, prefill_mask(P, block_size)


def step_pass(block_size: int, proposals: Sequence[int] | None = None):
    """The static parts of a decode step: (in-step mask [q, q], position offsets from L [q], output rows [n_out])."""
    rs = normalize_proposals(block_size, proposals)
    return step_mask(block_size, rs), step_offsets(block_size, rs), torch.tensor(step_out_rows(block_size, rs))


def ar_pass():
    """The static parts of an AR step: (mask [1, 1], offsets [1], output rows [1])."""
    return causal_mask(1), torch.zeros(1, dtype=torch.long), torch.tensor([0])


def pass_ids(given: torch.Tensor, q_len: int, mask_token_id: int) -> torch.Tensor:
    """The q_len input ids of a cached pass: the given ids [B, w] (drafts, or the AR token) then mask tokens."""
    B, w = given.shape
    return given if w == q_len else torch.cat([given, given.new_full((B, q_len - w), mask_token_id)], dim=1)


def pass_positions(cache_len: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, q] positions of a cached pass: each row's L plus the static offsets."""
    return cache_len[:, None] + offsets[None]


def with_cache(in_step: torch.Tensor, cache_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """Full mask over a preallocated cache of `max_len` slots, [B, 1, q, max_len].

    The step's keys are written at slots L..L+q-1 (docs/ALGORITHM.md section 5), so key slot s is visible to
    query i iff s < L (committed cache) or (L <= s < L+q and in_step[i, s-L]). Slots at or past
    L+q hold stale keys of earlier steps and are hidden. `cache_len` is [B] (per-row L).
    Written with tensor ops only, so that it traces to ONNX with `in_step` as a constant.
    """
    q = in_step.shape[0]
    slot = torch.arange(max_len, device=cache_len.device)
    rel = slot[None, :] - cache_len[:, None]  # [B, S]: slot relative to L
    in_cache = rel < 0
    in_window = (rel >= 0) & (rel < q)
    idx = rel.clamp(0, q - 1)  # [B, S]
    step_part = in_step.to(cache_len.device)[:, idx]  # [q, B, S]
    allow = in_cache[:, None, :] | (in_window[:, None, :] & step_part.permute(1, 0, 2))
    return allow[:, None, :, :]  # [B, 1, q, S]


def cache_then_step(in_step: torch.Tensor, cache_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """Mask over [cache slots | this step's keys], [B, 1, q, max_len + q].

    For graphs that attend over the past cache concatenated with the step's own keys and hand
    the new keys back to the caller (who writes them at L): cache slot s is visible iff s < L;
    the step's keys follow the static `in_step` pattern. Same rules as `with_cache`.
    """
    q = in_step.shape[0]
    slot = torch.arange(max_len, device=cache_len.device)
    in_cache = (slot[None, :] < cache_len[:, None])[:, None, None, :].expand(-1, 1, q, max_len)
    step = in_step.to(cache_len.device)[None, None].expand(cache_len.shape[0], 1, q, q)
    return torch.cat([in_cache, step], dim=-1)
