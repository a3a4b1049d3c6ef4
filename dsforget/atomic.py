"""Files and directories that are either the old version or the new one, whole: never half-written
after a crash, and durable (fsynced, with their directory entries) once the call returns."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_directory(directory: str | Path) -> None:
    """Make `directory`'s entries (files created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every regular file under `directory`, then every directory in it, deepest first.

    fsync through a read-only descriptor flushes the file's dirty pages, so one process can make
    durable what it wrote through other handles (DeepSpeed's and torch's writers)."""
    directory = Path(directory)
    for current, _, files in os.walk(directory, topdown=False):
        for name in files:
            path = Path(current, name)
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(current)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


def replace_directory(new: str | Path, target: str | Path) -> None:
    """Put the directory `new` at `target`, replacing what is there, so that `target` always holds
    either the old directory or the new one, whole.

    `new` is made durable first. Where the filesystem can exchange two directories in one step
    (Linux, renameat2) `target` never disappears; elsewhere the old one is renamed aside
    (``.<name>.old-<pid>``) for the instant before the new one is renamed in, then deleted.
    """
    new, target = Path(new), Path(target)
    fsync_tree(new)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now the old directory
    else:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(new, target)
        shutil.rmtree(aside)
    fsync_directory(target.parent)
