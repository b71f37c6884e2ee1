"""One run at a time writes a cache split or a finetune run folder: an advisory lock its writers hold.

Two extract runs writing one split would break the cache's promise that each shard has one
writer: a rerun deletes the temporary files of a run still in progress, and rewrites, under a
committed marker, a shard the other run has just committed (readers then see zeros). Two finetune
runs in one folder overwrite each other's checkpoints. So the run's rank 0 takes the lock file
exclusively (any holder, from another run, means refusal), writes who holds it, and turns its hold
into a shared one; the run's other ranks that write join with shared holds after it. Another
run's rank 0 is then refused while any writer of this run is alive.

flock is released by the kernel when a process dies, so a killed run never leaves a stale lock.
On a filesystem without flock (some network mounts) the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.cache import CacheError

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


RUN_LOCK = "run.lock"  # a run folder's lock (finetune, fit-head), held by the run writing it


def split_lock_path(cache_root: Path, split: str) -> Path:
    return Path(cache_root) / "locks" / f"{split}.lock"


def holder_text() -> str:
    """Who holds the lock, as its file says it: this process, for the message another run prints."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    launcher = f", torchrun run {run} with {os.environ.get('WORLD_SIZE', '?')} ranks" if run else ""
    return f"pid {os.getpid()} on host {socket.gethostname()}{launcher}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def writer_of(path: Path) -> str | None:
    """Who holds the lock at `path` now, in its file's words; None when no run does (or the filesystem cannot lock).

    It probes with an exclusive hold, released at once: a run starting in that instant is refused as if another run
    held the lock, and can be started again."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(path)
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        return None
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """Who holds the lock at `path`, as its holder wrote there (holder_text)."""
    try:
        return path.read_text(encoding="utf-8").strip() or "a run that has not written its name yet"
    except OSError:
        return "unknown"


def _busy(path: Path, subject: str) -> CacheError:
    return CacheError(
        f"{subject} is being written by another run ({_holder(path)}); only one run may write it at a time. Wait for that "
        f"run to end or stop it, then rerun: what it has committed is kept. (Lock: {path})"
    )


_HELD: set[int] = set()  # this process's lock descriptors


def _drop_inherited() -> None:
    """In a forked child (a DataLoader worker): close the copies of the parent's lock descriptors.

    flock belongs to the open file, which fork shares: a worker left stuck in the decoder after its
    main process died would otherwise keep the lock. Closing a copy never unlocks (LOCK_UN would)."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def _lock(fd: int, operation: int, path: Path, subject: str) -> bool:
    """flock without waiting; False where the filesystem cannot lock (said as a warning)."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise _busy(path, subject) from None
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        warnings.warn(f"cannot lock {path} ({err.strerror}): make sure that only one run writes {subject} at a time",
                      stacklevel=3)
        return False


@contextmanager
def _held(fd: int) -> Iterator[int]:
    """Own the open lock descriptor `fd` (os.open's: not inherited across exec, PEP 446; forked children drop it)."""
    _HELD.add(fd)
    try:
        yield fd
    finally:
        if fd in _HELD:  # else a forked child, which closed its copy at fork: the number may be another file's now
            _HELD.discard(fd)
            os.close(fd)


def _open_exclusive(path: Path, subject: str) -> tuple[int, bool]:
    """A new descriptor of `path` holding its exclusive lock, and True; False where the filesystem cannot lock."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _lock(fd, fcntl.LOCK_EX, path, subject)
        except BaseException:
            os.close(fd)
            raise
        if not locked or _still_at(path, fd):
            return fd, locked
        os.close(fd)  # its holder removed the file (a refused finetune's folder) before this lock: start over


def _still_at(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


@contextmanager
def first_writer(path: Path, subject: str) -> Iterator[None]:
    """Rank 0's hold on `path`, taken before it writes anything: CacheError while any other run holds it.

    `subject` names what the lock guards, for the messages ("split 'train' of the cache X")."""
    path = Path(path)
    fd, locked = _open_exclusive(path, subject)
    with _held(fd):
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_text() + "\n").encode(), 0)
            # lets this run's other ranks join. From an exclusive hold the change cannot conflict, so on Linux no
            # other run gets in between; the check stays for filesystems that emulate flock
            _lock(fd, fcntl.LOCK_SH, path, subject)
        yield


@contextmanager
def joining_writer(path: Path, subject: str) -> Iterator[None]:
    """Another rank's hold, taken after rank 0's first_writer: keeps later runs out while this rank is alive."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CacheError(f"{path}: rank 0 of this run holds it, but this process cannot see it; if the cache is on a "
                         "shared filesystem, check that every node sees the same files") from None
    with _held(fd):
        _lock(fd, fcntl.LOCK_SH, path, subject)
        yield
