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


def split_lock_path(cache_root: Path, split: str) -> Path:
    return Path(cache_root) / "locks" / f"{split}.lock"


def holder_text() -> str:
    """Who holds the lock, as its file says it: this process, for the message another run prints."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    launcher = f", torchrun run {run} with {os.environ.get('WORLD_SIZE', '?')} ranks" if run else ""
    return f"pid {os.getpid()} on host {socket.gethostname()}{launcher}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def _busy(path: Path, subject: str) -> CacheError:
    try:
        holder = path.read_text(encoding="utf-8").strip() or "a run that has not written its name yet"
    except OSError:
        holder = "unknown"
    return CacheError(
        f"{subject} is being written by another run ({holder}); only one run may write it at a time. Wait for that "
        f"run to end or stop it, then rerun: what it has committed is kept. (Lock: {path})"
    )


def _lock(file, operation: int, path: Path, subject: str) -> bool:
    """flock without waiting; False where the filesystem cannot lock (said as a warning)."""
    try:
        fcntl.flock(file, operation | fcntl.LOCK_NB)
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
def first_writer(path: Path, subject: str) -> Iterator[None]:
    """Rank 0's hold on `path`, taken before it writes anything: CacheError while any other run holds it.

    `subject` names what the lock guards, for the messages ("split 'train' of the cache X")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as file:
        if _lock(file, fcntl.LOCK_EX, path, subject):
            file.truncate(0)
            file.write(holder_text() + "\n")
            file.flush()
            _lock(file, fcntl.LOCK_SH, path, subject)  # lets this run's other ranks join; not atomic, so checked again
        yield


@contextmanager
def joining_writer(path: Path, subject: str) -> Iterator[None]:
    """Another rank's hold, taken after rank 0's first_writer: keeps later runs out while this rank is alive."""
    with open(path, "r", encoding="utf-8") as file:
        _lock(file, fcntl.LOCK_SH, Path(path), subject)
        yield
