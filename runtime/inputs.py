"""Validation of token ids a caller hands to the runtime (prompts), shared by every command and
the decode loop: one place, one-line errors.

Ids come from a command line (`--prompt-ids`), a prompts file, a tokenizer or a client; an id
that is negative, not an integer, or not below the vocabulary size would index the embedding
out of range (or wrap around when cast to int64), so it is refused before any forward pass.
"""

from __future__ import annotations

import numbers

import numpy as np

from tidar_runtime.errors import FieldError

MAX_PROMPT_TOKENS = 1 << 24  # far above any cache; bounds the conversion below


def check_token_ids(ids, vocab_size: int | None, what: str = "prompt") -> np.ndarray:
    """`ids` as a 1-D int64 array after checking that every entry is an integer in
    0..vocab_size-1 (any integer >= 0 when vocab_size is None); a one-line FieldError naming
    `what` otherwise."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise FieldError(what, f"token ids must be integers, got dtype {ids.dtype}")
        flat = ids.reshape(-1)
    else:
        try:
            flat = list(ids)
        except TypeError:
            raise FieldError(what, f"token ids must be a list of integers, got {type(ids).__name__}") from None
    if len(flat) > MAX_PROMPT_TOKENS:
        raise FieldError(what, f"has {len(flat)} tokens, more than {MAX_PROMPT_TOKENS}")
    for i, t in enumerate(flat):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
            raise FieldError(what, f"token id #{i} is not an integer: {str(t)[:40]!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"0..{vocab_size - 1}" if vocab_size is not None else ">= 0"
            raise FieldError(what, f"token id {str(int(t))[:40]} is outside the vocabulary ({bound})")
    return np.asarray(flat, dtype=np.int64).reshape(-1)
