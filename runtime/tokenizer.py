"""The tokenizer of an artifact or checkpoint folder (a `tokenizers` tokenizer.json).

The runtime decodes token ids into text and encodes prompts with it; torch is not needed.
"""

from __future__ import annotations

from pathlib import Path

from tidar_runtime.errors import TiDARError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | Path):
    """The tokenizer at `path` (a tokenizer.json, or a folder holding one); one-line error otherwise."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TiDARError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TiDARError(f"{path}: cannot read tokenizer ({e})") from None


def folder_tokenizer(folder: str | Path):
    """The tokenizer.json of an artifact or checkpoint folder, or None when it has none."""
    from tidar_runtime.paths import checkpoint_root, confined

    path = confined(folder, TOKENIZER_FILE, f"{folder}: tokenizer", root=checkpoint_root(folder))
    return load_tokenizer(path) if path.is_file() else None
