"""A backend that does no work: it measures the decode loop's own host overhead.

Its outputs are preallocated and constant, chosen so that the loop walks its real paths:
the AR rows agree with the drafts for the first `accept - 1` positions and then disagree,
so every step accepts exactly `accept` drafts (verify, commit, block choice, proposals).
"""

from __future__ import annotations

import numpy as np

from tidar_runtime.contract import n_out, normalize_proposals
from tidar_runtime.loop import Outputs


class NullBackend:
    def __init__(self, block_size: int = 8, proposals=None, max_len: int = 1 << 30, max_batch: int = 1,
                 vocab_size: int = 4096, accept: int | None = None):
        self.block_size = block_size
        self.proposals = normalize_proposals(block_size, proposals)
        self.max_len, self.max_batch, self.mask_token_id = max_len, max_batch, vocab_size - 1
        self.vocab_size = vocab_size
        self.accept = accept or block_size
        b, rows = block_size, n_out(block_size, self.proposals)
        # drafts are always token 1; AR says 1 for the first accept-1 rows, then 2 (a rejection)
        step_ids = np.ones((max_batch, rows), np.int64)
        step_ids[:, self.accept - 1 : b] = 2
        self._step = Outputs(step_ids, np.zeros((max_batch, rows, vocab_size), np.float32))
        self._prefill = Outputs(np.ones((1, b), np.int64), np.zeros((1, b, vocab_size), np.float32))
        self._ar = Outputs(np.ones((max_batch, 1), np.int64), np.zeros((max_batch, 1, vocab_size), np.float32))

    def prefill(self, row, prompt, want_logits):
        return self._prefill

    def step(self, drafts, cache_len, want_logits):
        return self._step

    def ar_prefill(self, row, prompt, want_logits):
        return Outputs(self._prefill.token_ids[:, :1], self._prefill.logits[:, :1] if want_logits else None)

    def ar_step(self, tokens, cache_len, want_logits):
        return self._ar
