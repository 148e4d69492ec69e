"""Everything that writes files: atomic file writes, temp folders, folder swaps, and the one
output-folder policy shared by every command that writes a folder (docs/RELIABILITY.md).

- `write_atomic`: a file through a temp file beside it and a rename.
- `temp_dir` / `staging_dir`: temp folders with a recognisable name (prefix, pid, host tag); a
  later run removes those whose process is gone (`sweep_stale`), so a SIGTERM or kill -9 leaves
  nothing behind for good.
- `prepare_output`: resolves `-o` (a symlink to a folder means that folder), refuses a file, a
  folder that is not this tool's output of that kind (unless `force`), the working directory
  and folders holding an input; checks that the parent is writable before any long work.
- `publish_dir`: gives a finished staging folder the umask's usual modes and swaps it in
  (`replace_dir`, under an flock of the parent folder so that concurrent swaps serialize).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from tidar_runtime.contract import MANIFEST_FILE, MANIFEST_FORMAT
from tidar_runtime.errors import TiDARError

try:
    import fcntl
except ImportError:  # not POSIX: swaps are not serialized across processes
    fcntl = None

TMP_TAG = "tidar-tmp"  # staging folders beside an output: .NAME.tidar-tmp.PID.HOST.XXXX
OLD_TAG = "tidar-old"  # the replaced folder, between the swap and its removal
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()

# Output kinds and the files this tool writes into them (besides what a manifest names).
CHECKPOINT_FILES = frozenset({
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
    "train_state.json", "train_state.safetensors", "adapter.json", "adapter.safetensors",
    "chat_template.jinja", "gguf_source.json", "gguf_blocks.safetensors",  # chat template; GGUF import records
})
ARTIFACT_SIDECARS = frozenset({"manifest.json", "quantization.json", "demo.json", "tokenizer.json",
                               "chat_template.jinja"})
KINDS = ("artifact", "checkpoint", "run")


def usual_mode(folder: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp and mkdtemp
    create owner-only entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def apply_usual_modes(folder: Path) -> None:
    """Give `folder` and everything under it the umask's usual modes (one rule for every output)."""
    os.chmod(folder, usual_mode(folder=True))
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), usual_mode(folder=True))
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, usual_mode())


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


# --------------------------------------------------------------------------- temp folders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: str | os.PathLike, prefix: str) -> int:
    """Remove the entries of `folder` named `prefix` + `PID.HOST.` that this user owns, made on
    this host by a process that no longer runs. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        parts = e.name[len(prefix):].split(".")
        if len(parts) < 3 or not parts[0].isdigit() or parts[1] != HOST_TAG:
            continue
        pid = int(parts[0])
        try:
            if pid == os.getpid() or _alive(pid) or e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
            removed += 1
        except OSError:
            continue
    return removed


_MADE: list[Path] = []  # the temp folders this process made (make_temp_dir), for remove_temp_dirs
_HELD = {getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)}


def make_temp_dir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new owner-only folder `prefix + PID.HOST.XXXX` in `parent` (default: the system temp
    folder), after removing the stale ones of the same prefix there. Ctrl-C and SIGTERM wait
    until it is recorded for `remove_temp_dirs`."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(parent, prefix)
    mask = getattr(signal, "pthread_sigmask", None)
    held = mask(signal.SIG_BLOCK, _HELD) if mask is not None else None
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.{HOST_TAG}.", dir=parent))
        _MADE.append(path)
    finally:
        if held is not None:
            mask(signal.SIG_SETMASK, held)
    return path


def remove_temp_dirs() -> None:
    """Remove every temp folder this process made that still exists: the CLI's last step after
    Ctrl-C or SIGTERM, for a signal that lands between a folder's creation and the `try` block
    that would remove it. (A published staging folder was renamed away: nothing to remove.)"""
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)


@contextlib.contextmanager
def temp_dir(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """`make_temp_dir`, removed when the block ends (also on an exception or SIGTERM, see cli)."""
    path = make_temp_dir(prefix, parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def staging_prefix(target: Path) -> str:
    return f".{target.name}.{TMP_TAG}."


def staging_dir(target: str | os.PathLike) -> Path:
    """A temp folder beside `target` to build it in (same file system: the swap is a rename);
    stale staging and replaced folders of `target` left by killed runs are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent, f".{target.name}.{OLD_TAG}.")
    return make_temp_dir(staging_prefix(target), target.parent)


# --------------------------------------------------------------------------- swaps


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file is left behind); released when the
    process dies, so a killed run never blocks a later one."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_dir(new: str | os.PathLike, target: str | os.PathLike, kind: str | None = None,
                force: bool = True) -> Path:
    """Rename the finished folder `new` to `target`. An existing `target` is moved aside first
    and removed only once `new` is in place (put back if that rename fails), so at every moment
    `target` is the old folder or the whole new one. Swaps into one parent folder are serialized
    by an flock on it, so concurrent writers of one output never fail or leave `.old` folders.
    With `kind` and not `force`, the folder found at swap time must still be ours (`owned`)."""
    new, target = Path(new), Path(target)
    old = None
    with folder_lock(target.parent):
        if os.path.lexists(target):
            if target.is_symlink() or not target.is_dir():
                raise TiDARError(f"{target} exists and is not a folder: refusing to replace it")
            if kind is not None and not force:
                _require_owned(target, kind)
            old = target.parent / f".{target.name}.{OLD_TAG}.{os.getpid()}.{HOST_TAG}.{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # outside the lock; a kill here is swept later
    return target


def publish_dir(new: str | os.PathLike, target: str | os.PathLike, kind: str | None = None,
                force: bool = True) -> Path:
    """The last step of every folder output: usual modes for everything in `new`, then the swap."""
    apply_usual_modes(Path(new))
    return replace_dir(new, target, kind, force)


# --------------------------------------------------------------------------- the output policy


def _artifact_names(folder: Path) -> set[str] | None:
    """Names a TiDAR manifest in `folder` accounts for, or None if it has no TiDAR manifest."""
    try:
        d = json.loads((folder / MANIFEST_FILE).read_text()[: 1 << 24])
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
        return None
    names = set(ARTIFACT_SIDECARS)
    for g in (d.get("graphs") or {}).values() if isinstance(d.get("graphs"), dict) else ():
        if isinstance(g, dict):
            names.update(v for v in (g.get("file"), g.get("engine")) if isinstance(v, str))
    for section in ("weights", "tokenizer"):
        v = d.get(section)
        if isinstance(v, dict) and isinstance(v.get("file"), str):
            names.add(v["file"])
    return names


def _is_our_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # write_atomic / engine temp files


def owned(folder: Path, kind: str) -> bool:
    """Whether `folder` is this tool's own output of `kind`: an empty folder, or one whose every
    entry is a plain file this tool writes there (an artifact: a TiDAR manifest and the files it
    names; a checkpoint or training run: a config.json with TiDAR settings and the checkpoint,
    tokenizer and training-state files)."""
    entries = list(folder.iterdir())
    if not entries:
        return True
    if kind == "artifact":
        allowed = _artifact_names(folder)
    else:
        try:
            cfg = json.loads((folder / "config.json").read_text()[: 1 << 24])
        except (OSError, ValueError, RecursionError, UnicodeDecodeError):
            cfg = None
        allowed = None
        if isinstance(cfg, dict) and isinstance(cfg.get("tidar"), dict):
            shards = {e.name for e in entries if e.name.startswith("model-") and e.name.endswith(".safetensors")}
            allowed = CHECKPOINT_FILES | shards
    if allowed is None:
        return False
    return all((e.name in allowed or _is_our_temp(e.name)) and e.is_file() and not e.is_symlink() for e in entries)


_WHAT = {"artifact": "an artifact directory", "checkpoint": "a checkpoint folder", "run": "a training run folder"}


def _require_owned(folder: Path, kind: str) -> None:
    if not owned(folder, kind):
        raise TiDARError(f"{folder} is not empty and is not {_WHAT[kind]} written by tidar-export (it holds other "
                         f"files): refusing to replace it; choose another -o, or pass --force to replace it")


def resolve_output(output: str | os.PathLike) -> Path:
    """The folder `-o` means: an absolute path; a symlink to a folder stands for that folder (the
    link stays); a dangling link or a link to a file is refused."""
    p = Path(os.path.abspath(output))
    if p.is_symlink():
        real = Path(os.path.realpath(p))
        if not real.is_dir():
            raise TiDARError(f"{output} is a symlink to {'nothing' if not real.exists() else 'a file'}: "
                             "refusing to write through it")
        return real
    return p


def check_writable(folder: Path) -> None:
    """Create the folder's missing parents and prove it writable with a temp file (removed), so a
    read-only disk fails before minutes of work, in one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".tidar-probe.{os.getpid()}.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TiDARError(f"cannot write to {folder}: {e.strerror or e}") from None


def prepare_output(output: str | os.PathLike, kind: str, force: bool = False,
                   inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check `-o` before any work and return the folder to write. Refused, in one line: a path
    that is a file; the working directory or one of its parents; a folder that holds (or is) one
    of `inputs`; even with `force`. A non-empty folder that is not our output of `kind` is refused
    unless `force`. The parent must be writable."""
    if kind not in KINDS:
        raise ValueError(kind)
    target = resolve_output(output)
    if target.exists() and not target.is_dir():
        raise TiDARError(f"{output} exists and is not a folder: refusing to replace it")
    if target.parent == target:
        raise TiDARError(f"{output}: refusing to write the root folder")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise TiDARError(f"{output} is the working directory or holds it: refusing to replace it; "
                         "write to a new folder")
    for src in inputs:
        src = Path(os.path.realpath(src))
        if src == target or target in src.parents:
            raise TiDARError(f"{output} holds the input {src.name}: refusing to replace it; write to another folder")
    if target.is_dir() and not force:
        _require_owned(target, kind)
    check_writable(target.parent)
    return target


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what failed, on which path (disk full, read-only, permissions)."""
    where = f": {e.filename}" if e.filename else ""
    text = e.strerror or errno.errorcode.get(e.errno or 0, "") or type(e).__name__
    return f"{text}{where}"
