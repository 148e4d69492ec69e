"""File names read from a manifest or a checkpoint index, confined to their folder.

A manifest names its graphs, weights, engines and tokenizer; a safetensors index names its
shards. Such a name comes from a file anyone may have edited, so it is resolved here, once:
it must be a plain relative name (no absolute path, no drive, no `..`, no NUL, no backslash)
and, symlinks followed, still lie inside the folder. Otherwise the reader would load, run or
report the size of a file outside the artifact (and a writer that copies by that name would
write outside its output).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from tidar_runtime.errors import TiDARError

MAX_NAME_CHARS = 255


def check_name(name, what: str) -> str:
    """`name` if it is a plain relative file name (subfolders allowed), else a one-line TiDARError."""
    if not isinstance(name, str) or not name:
        raise TiDARError(f"{what}: expected a file name, got {name!r}"[:300])
    if len(name) > MAX_NAME_CHARS or "\0" in name or "\\" in name or ":" in name:
        raise TiDARError(f"{what}: {name[:80]!r} is not a plain file name")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in name.split("/")) or name.startswith("~"):
        raise TiDARError(f"{what}: {name[:80]!r} points outside its folder (absolute or '..'): refused")
    return name


def confined(folder: str | os.PathLike, name, what: str, root: str | os.PathLike | None = None) -> Path:
    """`folder / name`, after checking that `name` is a plain relative name and that the path,
    with every symlink resolved, stays inside `root` (default: `folder`). The file need not exist."""
    check_name(name, what)
    folder = Path(folder)
    path = folder / name
    bound = Path(root if root is not None else folder).resolve()
    real = path.resolve()
    if real != bound and bound not in real.parents:
        raise TiDARError(f"{what}: {name!r} resolves outside {folder} (a symlink): refused")
    return path


def checkpoint_root(folder: str | os.PathLike) -> Path:
    """How far a checkpoint's symlinks may point: the folder itself, or for a Hugging Face hub
    cache snapshot (`models--ORG--NAME/snapshots/REV`, whose files link to `../../blobs/`) the
    repository's cache folder."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder
