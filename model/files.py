"""Files that survive crashes and share nicely: atomic writes, checksums, locks, normal permissions.

Everything here respects the process umask without changing it: new files and folders get the permissions
`open`/`mkdir` would give them, so run folders on shared storage stay readable by the group.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("char_rnn")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def named(e: OSError, path: Path, doing: str) -> OSError:
    """`e` with the path and what was being done in its message (a full disk names no file by itself)."""
    if e.filename is not None and str(path) in str(e):
        return e
    return type(e)(e.errno, f"{e.strerror or e} while {doing} {path}")


def temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def write_file(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist), write `data` and fsync; permissions from the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` at once: a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named(e, path, "writing") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_dirs(path: Path) -> Path:
    """`mkdir -p` whose errors name the path."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise named(e, Path(path), "creating the folder") from e
    return Path(path)


@contextmanager
def locked(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed) across processes; log `waiting` if busy."""
    make_dirs(Path(path).parent)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise named(e, Path(path), "locking") from e
            if waiting:
                log.info(waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FolderBusy(RuntimeError):
    """Another live process owns the folder (it holds the folder's lock)."""


@contextmanager
def owned(folder: Path, doing: str, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Own `folder` for the whole block: an exclusive `flock` on `folder/.lock`, which names the owner (PID,
    host, command). A live owner gets a FolderBusy naming it, or, given `waiting`, is waited for (`waiting`
    hears who it is): two runs of the same work then take turns instead of one failing. The kernel drops the
    lock when its process dies, however it dies, so a run killed with SIGKILL never blocks the next one."""
    path = make_dirs(folder) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise named(e, path, "locking") from e
            f.seek(0)
            busy = f"{folder} is in use: {f.read().strip() or 'another process'} is {doing} there"
            if waiting is None:
                raise FolderBusy(f"{busy}; wait for it to end, or stop it first") from None
            waiting(f"{busy}; waiting for it to end")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
