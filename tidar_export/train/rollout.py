"""The `rollout` draft target of `tidar-export train`: sequence-level self-distillation data.

A pool of rows, each a real corpus prefix continued with the model's own greedy AR decode, is
regenerated every `rollout_every` steps; each step takes `rollout_rows()` of its rows from the pool
(docs/TRAINING.md). Every draw is a pure function of (seed, step), so a resumed run sees the same data.
torch is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidar_export.errors import TiDARError

if TYPE_CHECKING:
    import torch

    from tidar_export.model.transformer import TiDARModel
    from tidar_export.train.trainer import TrainSettings


def rollout_prefix_lens(step: int, s: TrainSettings) -> list[int]:
    """Real prefix length of each pool row generated at step `step`: a pure function of (seed, step)."""
    import numpy as np

    rng = np.random.default_rng([s.seed, step, 1])
    return [int(v) for v in rng.integers(s.rollout_prefix_min, s.rollout_prefix_max + 1, size=s.rollout_pool)]


def make_rollout_pool(model: TiDARModel, stream: torch.Tensor, step: int, s: TrainSettings):
    """Sequence-level self-distillation data: (windows [N, S+1], real_len [N]).

    Row n is a real prefix of P_n corpus tokens (a window drawn from (seed, step, pool)) continued
    with the model's own greedy AR tokens up to S+1 tokens, decoded with the KV cache under the
    runtime's loop. Inside the generated part the "self" target of a mask slot is exactly the
    token the greedy decode produced, i.e. what TiDAR's verification checks drafts against.
    """
    import numpy as np
    import torch

    from tidar_export.model.reference import TorchBackend
    from tidar_runtime import generate_ar_batch

    S = s.seq_len
    lens = rollout_prefix_lens(step, s)
    n = stream.numel() - S - 1
    rng = np.random.default_rng([s.seed, step, 2])
    starts = rng.integers(0, n + 1, size=s.rollout_pool)
    prompts = [stream[int(a) : int(a) + P].numpy() for a, P in zip(starts, lens)]
    was_training = model.training
    # cache of S slots: a row stops ("cache_full") once it holds S + 1 tokens, so every row ends full
    backend = TorchBackend(model, S, block_size=1, max_batch=len(prompts))
    results = generate_ar_batch(backend, prompts, S + 1 - min(lens), stop_tokens=())
    model.train(was_training)
    rows = []
    for p, r in zip(prompts, results):
        row = np.concatenate([p, np.asarray(r.tokens, dtype=np.int64)])[: S + 1]
        if len(row) != S + 1:
            raise TiDARError(f"rollout row has {len(row)} tokens, expected {S + 1}")
        rows.append(row)
    return torch.from_numpy(np.stack(rows)).long(), torch.tensor(lens, dtype=torch.long)


def rollout_batch(x: torch.Tensor, pool: tuple, step: int, s: TrainSettings):
    """The step's windows with their first `s.rollout_rows()` rows drawn from the pool; (x, real_len)."""
    import numpy as np
    import torch

    k = s.rollout_rows()
    windows, lens = pool
    pick = torch.from_numpy(np.random.default_rng([s.seed, step, 3]).integers(0, len(windows), size=k))
    x = x.clone()
    x[:k] = windows[pick]
    real_len = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    real_len[:k] = lens[pick]
    return x, real_len
