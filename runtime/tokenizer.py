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


def artifact_tokenizer(artifact_dir: str | Path, manifest):
    """The tokenizer an artifact's manifest names (None when it names none), checked against the
    manifest: its vocabulary must equal the size recorded at export (in an older artifact without
    one: fit the model's). Its digest is checked by `load_manifest` with the other files."""
    from tidar_runtime.paths import confined

    name = manifest.tokenizer.get("file")
    if name is None:
        return None
    tok = load_tokenizer(confined(artifact_dir, name, f"{artifact_dir}: tokenizer file"))
    size, model_vocab = tok.get_vocab_size(with_added_tokens=True), manifest.vocab_size
    recorded = manifest.tokenizer.get("vocab_size")
    wrong = size != recorded if recorded is not None else size > model_vocab
    if wrong:
        want = f"{recorded}, as recorded at export" if recorded is not None else f"at most the model's {model_vocab}"
        raise TiDARError(f"{artifact_dir}: {name} has a vocabulary of {size} tokens, the manifest says {want} "
                         "(a tokenizer of another model?)")
    return tok


def default_stop_tokens(manifest) -> tuple[int, ...]:
    """The stop tokens a request gets unless it names its own: the artifact's end-of-sequence
    tokens (every id of its eos_token_id; none when the manifest records none). The one place that decides it."""
    return tuple(manifest.eos_ids)


def prompt_char_limit(tok, max_tokens: int) -> tuple[int, bool]:
    """(limit, whole): a text prompt over `limit` characters cannot be `max_tokens` tokens or
    fewer, since no token covers more characters than the tokenizer's longest. `whole`: the limit
    counts every character (a byte-level tokenizer without a normalizer keeps them all); else only
    characters other than whitespace count (a pre-tokenizer or normalizer may drop whitespace).
    The server refuses such a prompt before tokenizing it: the tokenizers library holds the GIL
    while it encodes, so a huge prompt would stall every thread (docs/RELIABILITY.md)."""
    import json

    n = tok.get_vocab_size(with_added_tokens=True)
    longest = max(len(t) for t in tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False))
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    kinds = {p.get("type") for p in pre.get("pretokenizers", [pre])} if pre else set()
    whole = spec.get("normalizer") is None and "ByteLevel" in kinds and kinds <= {"ByteLevel", "Split", "Digits"}
    return max(1, longest) * max_tokens, whole


def count_for_limit(text: str, whole: bool) -> int:
    """The characters of `text` that `prompt_char_limit` bounds (all, or all but whitespace)."""
    return len(text) if whole else len("".join(text.split()))
