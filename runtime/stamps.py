"""Verified-once stamps: a weights file whose whole digest was checked is not hashed again on
the next load while it stays the same file (docs/RELIABILITY.md, "Integrity").

A stamp is an empty file in the user's cache folder ($XDG_CACHE_HOME/tidar-export/verified, or
~/.cache/...) named by a hash of the file's identity and its recorded digest: device, inode,
size, modification and change times (st_ctime cannot be set by a user: any write, rename onto,
chmod or touch of the file gives a new one), and the digest the manifest records. A file
changed in place, replaced, copied elsewhere, or named by another manifest has no stamp, so its
next load hashes it whole. Stamps are only an optimisation: a cache folder that cannot be
written means the whole digest on every load, never an error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tidar-export" / "verified"


def _name(path: Path, digest: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{digest}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def is_verified(path: str | os.PathLike, digest: str) -> bool:
    """Whether `path` was hashed whole to `digest` and has not changed since (a stamp exists)."""
    name = _name(Path(path), digest)
    return name is not None and (_folder() / name).is_file()


def mark_verified(path: str | os.PathLike, digest: str) -> None:
    """Record that `path` was just hashed whole to `digest` (best effort)."""
    name = _name(Path(path), digest)
    if name is None:
        return
    try:
        folder = _folder()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    except OSError:
        pass
