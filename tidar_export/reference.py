"""The torch reference backend: runs the reference model under the runtime's decode loop.

It holds a preallocated batch-1 KV cache and implements `tidar_runtime.loop.Backend`, so the
one loop of `tidar_runtime.loop` decodes the torch model exactly as it decodes an engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tidar_export import masks
from tidar_export.model import TiDARModel


class TorchBackend:
    def __init__(self, model: TiDARModel, max_len: int = 512, block_size: int | None = None,
                 proposals: Sequence[int] | None = None):
        self.model = model.eval()
        self.block_size = block_size or model.cfg.block_size
        self.proposals = masks.normalize_proposals(self.block_size, proposals)
        self.max_len = max_len
        self.mask_token_id = model.cfg.mask_token_id
        self.keys, self.values = model.new_cache(1, max_len)
        self._step_mask = masks.step_mask(self.block_size, self.proposals)
        self._step_offsets = masks.step_offsets(self.block_size, self.proposals)

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, in_step: torch.Tensor, cache_len: int) -> np.ndarray:
        logits, self.keys, self.values = self.model(
            ids[None], positions[None], in_step, self.keys, self.values, torch.tensor([cache_len])
        )
        return logits[0].float().numpy()  # [T, V]

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        P, b = len(prompt), self.block_size
        ids = torch.cat([torch.as_tensor(prompt), torch.full((b,), self.mask_token_id)])
        logits = self._run(ids, masks.prefill_positions(P, b), masks.prefill_mask(P, b), 0)
        return logits[P - 1 :]  # [1 + b, V]

    def step(self, tokens: np.ndarray, cache_len: int) -> np.ndarray:
        q = len(self._step_offsets)
        ids = torch.full((q,), self.mask_token_id)
        ids[: self.block_size] = torch.as_tensor(tokens)
        return self._run(ids, cache_len + self._step_offsets, self._step_mask, cache_len)

    def ar_prefill(self, prompt: np.ndarray) -> np.ndarray:
        P = len(prompt)
        return self._run(torch.as_tensor(prompt), torch.arange(P), masks.causal_mask(P), 0)[-1]

    def ar_step(self, token: int, cache_len: int) -> np.ndarray:
        return self._run(torch.tensor([token]), torch.tensor([cache_len]), masks.causal_mask(1), cache_len)[0]
