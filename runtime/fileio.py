"""Atomic file writes, shared by the runtime (manifests) and the toolkit (reports, sidecars)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def usual_mode(folder: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp and mkdtemp
    create owner-only entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temp file beside it, then rename: readers see the old
    file or the whole new one, never a half-written one. The file gets the umask's usual mode
    (mkstemp alone would leave it owner-only); missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, usual_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished folder `new` to `target`. An existing `target` is moved aside first
    and removed only once `new` is in place (put back if that rename fails), so at every moment
    `target` is the old folder or the whole new one."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return target
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / "previous")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "previous", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return target
