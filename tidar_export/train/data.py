"""Training data: corpus discovery, the train / held-out split, tokenizer training, token streams.

The default corpus is the Python standard library's own `.py` source, which exists wherever
Python does and needs no download. Files are picked deterministically: every `.py` file under
the stdlib folder, sorted by relative path, minus folders that are not hand-written library
code (tests, site-packages, generated codec tables, the pydoc text dump, the machine-specific
`_sysconfigdata*` module). Every `HOLDOUT_EVERY`-th file of that sorted list is held out for
evaluation and never seen by the tokenizer or the training loop.

Any other folder of text files works the same way (`--corpus DIR --pattern '*.py'`).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_runtime.tokenizer import load_tokenizer  # noqa: F401 (re-exported: the training side reads it as data.load_tokenizer)

EOS_TOKEN = "<|endoftext|>"  # document separator and stop token
MASK_TOKEN = "<|mask|>"  # the TiDAR mask token M; never produced from text
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)  # ids 0 and 1 of a tokenizer trained here

HOLDOUT_EVERY = 20  # file i of the sorted list is held out iff i % HOLDOUT_EVERY == HOLDOUT_AT
HOLDOUT_AT = 10
# Folders of the stdlib that are not hand-written library code.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                              "idle_test", "encodings", "pydoc_data"})
STDLIB_SKIP_PREFIXES = ("_sysconfigdata",)  # generated per machine


@dataclass(frozen=True)
class Corpus:
    root: Path  # folder the files were found under
    train: tuple[Path, ...]  # training files, sorted by relative path
    heldout: tuple[Path, ...]  # held-out files (every HOLDOUT_EVERY-th), sorted

    def describe(self) -> dict:
        """Counts and a fingerprint of the file list and contents (to compare machines)."""
        h = hashlib.sha256()
        nbytes = 0
        for p in self.train + self.heldout:
            data = p.read_bytes()
            nbytes += len(data)
            h.update(p.relative_to(self.root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(data).digest())
        return {"train_files": len(self.train), "heldout_files": len(self.heldout),
                "bytes": nbytes, "sha256": h.hexdigest()[:16]}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skipped(rel: Path, stdlib: bool) -> bool:
    if not stdlib:
        return False
    return bool(STDLIB_SKIP_DIRS.intersection(rel.parts[:-1])) or rel.name.startswith(STDLIB_SKIP_PREFIXES)


def _readable(p: Path) -> bool:
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return bool(text.strip()) and EOS_TOKEN not in text and MASK_TOKEN not in text


def find_corpus(corpus: str = "stdlib", pattern: str = "*.py") -> Corpus:
    """The sorted file list of `corpus` ("stdlib" or a folder), split into train / held-out."""
    stdlib = corpus == "stdlib"
    root = stdlib_root() if stdlib else Path(corpus)
    if not root.is_dir():
        raise TiDARError(f"corpus folder not found: {root}")
    files = sorted((p for p in root.rglob(pattern) if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    files = [p for p in files if not _skipped(p.relative_to(root), stdlib) and _readable(p)]
    if len(files) < 2:
        raise TiDARError(f"corpus {root} has {len(files)} readable UTF-8 files matching {pattern!r}: "
                         "need at least 2 (one to train on, one held out)")
    held = [p for i, p in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_AT % len(files)]
    held_set = set(held)
    train = [p for p in files if p not in held_set]
    return Corpus(root, tuple(train), tuple(held))


def read_texts(files: Sequence[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in files]


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_path: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on `texts`; `<|endoftext|>` is id 0, `<|mask|>` id 1.

    Also writes a tokenizer_config.json beside it so that transformers' AutoTokenizer opens
    the checkpoint folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise TiDARError(f"vocab size {vocab_size} is too small for a byte-level BPE (needs > 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    (out_path.parent / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN, "pad_token": EOS_TOKEN, "model_max_length": 1 << 20,
    }, indent=2) + "\n")
    return out_path


def special_id(tokenizer, token: str) -> int | None:
    return tokenizer.token_to_id(token)


def token_stream(tokenizer, texts: Sequence[str], eos_id: int | None) -> np.ndarray:
    """All `texts` encoded and concatenated, each followed by `eos_id` (if any). int32 [N]."""
    parts = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        if eos_id is not None:
            parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
