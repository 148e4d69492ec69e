"""Row layout of the TiDAR graphs' outputs, shared by every backend and the loop (no torch).

Decode step outputs, per batch row, `n_out = b + R * (b - 1)` rows:
    [AR at draft 0 .. AR at draft b-1 | block r_1 slots 1..b-1 | block r_2 slots 1..b-1 | ...]
AR row i predicts position L+i+1; block r slot t predicts position L+r+t. Slot 0 of a block
predicts the anchor's position, which always comes from AR, so it is not returned.
Prefill outputs b rows: [AR at p_{P-1} | mask slots 1..b-1].

The binding names of the KV cache are fixed here too: `past_key_values.{i}.key/value` in,
`present.{i}.key/value` out, layer i = 0..num_layers-1, key before value.
"""

from __future__ import annotations

from collections.abc import Sequence

from tidar_runtime.errors import TiDARError


def normalize_proposals(block_size: int, proposals: Sequence[int] | None) -> tuple[int, ...]:
    """The acceptance levels r that get a pre-drafted block, sorted.

    None means all of 1..b (the paper's default). Block 1 must be present: after a step that
    accepts only the anchor (k = 1) it is the only block that can draft the next step, and
    without it decoding would fall back to one token per step for good (the paper leaves this
    open, docs/ALGORITHM.md section 8; this project requires it, see docs/DECISIONS.md).
    """
    b = block_size
    if proposals is None:
        return tuple(range(1, b + 1))
    rs = tuple(sorted(set(int(r) for r in proposals)))
    if not rs or rs[0] < 1 or rs[-1] > b:
        raise TiDARError(f"proposal levels must lie in 1..{b}, got {list(proposals)}")
    if rs[0] != 1:
        raise TiDARError(f"the proposal set must contain block 1 (got {list(rs)}); see docs/DECISIONS.md")
    return rs


def step_len(block_size: int, proposals: Sequence[int] | None = None) -> int:
    """q_len of one decode step: b drafts plus b mask slots per proposal block."""
    return block_size * (1 + len(normalize_proposals(block_size, proposals)))


def n_out(block_size: int, proposals: Sequence[int]) -> int:
    """Output rows of the step graph."""
    return block_size + len(proposals) * (block_size - 1)


def block_out_row(block_size: int, proposals: Sequence[int], r: int) -> int:
    """Output row of slot 1 of proposal block r (slot t is at this row + t - 1)."""
    return block_size + list(proposals).index(r) * (block_size - 1)


def step_out_rows(block_size: int, proposals: Sequence[int]) -> list[int]:
    """For each output row, its row inside the step's q_len input rows."""
    b = block_size
    rows = list(range(b))
    for n in range(len(proposals)):
        rows += [b + n * b + t for t in range(1, b)]
    return rows


def prefill_out_rows(prompt_len: int, block_size: int) -> list[int]:
    """For each prefill output row, its row among the P + b input rows: AR at p_{P-1} (row P-1),
    then mask slots 1..b-1 (rows P+1 .. P+b-1). Slot 0 would predict p_P, which AR decides."""
    P, b = prompt_len, block_size
    return [P - 1, *range(P + 1, P + b)]


PAST_PREFIX, PRESENT_PREFIX = "past_key_values", "present"


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """KV binding names of every layer, key before value: `{prefix}.{i}.key`, `{prefix}.{i}.value`."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, PAST_PREFIX)


def present_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, PRESENT_PREFIX)
