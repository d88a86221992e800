"""Writes that a killed process can never leave half-done.

A file is written to a temporary sibling and moved into place with os.replace (atomic on POSIX).
A directory (an adapter, a checkpoint) is built in a temporary sibling and swapped in with
renameat2(RENAME_EXCHANGE) where Linux offers it, so readers see either the old or the new
directory, never a mix. Where the exchange is unavailable we fall back to two renames and leave a
`.old` sibling that `recover_dir` puts back if the process died between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the kernel or libc cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temp(path: Path, data: bytes) -> str:
    """Write `data` to a new temporary sibling of `path` (synced to disk); return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_files(files: dict[Path, bytes]) -> None:
    """Files that belong together (a dataset's splits, or just one file): all are written to
    temporary siblings first, then renamed in one quick pass, so a failure while writing leaves the
    previous files untouched and a kill can only land in the microseconds of renames."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    write_files({Path(path): data})


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json_set(files: dict[Path, Any]) -> None:
    """Several JSON files that belong together, written with `write_files`. Everything is
    serialised before the first byte is written, so an unserialisable object changes nothing."""
    write_files({Path(p): (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8") for p, obj in files.items()})


def write_json(path: str | Path, obj: Any) -> None:
    write_json_set({Path(path): obj})


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure through a temporary sibling (a kill never leaves half a PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(buffer, dpi=dpi)
    os.replace(buffer, path)


def recover_dir(dest: str | Path) -> None:
    """Put back a directory that a fallback swap moved aside before the process died."""
    dest = Path(dest)
    old = dest.with_name(dest.name + ".old")
    if old.exists() and not dest.exists():
        os.rename(old, dest)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def replace_dir(staged: str | Path, dest: str | Path) -> None:
    """Make `staged` (a finished directory) appear at `dest`, replacing what was there."""
    staged, dest = Path(staged), Path(dest)
    recover_dir(dest)
    if not dest.exists():
        os.rename(staged, dest)
        return
    if _rename_exchange(staged, dest):
        shutil.rmtree(staged)  # `staged` now holds the previous contents
        return
    old = dest.with_name(dest.name + ".old")
    os.rename(dest, old)
    os.rename(staged, dest)
    shutil.rmtree(old)


@contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty sibling directory; on clean exit it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".staged"))
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir(staged, dest)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock between processes (flock on `path`): the second to arrive waits, then
    finds the first one's finished work (a converted model, a built program) instead of redoing it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
