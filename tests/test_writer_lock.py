import errno
import os

import pytest

from pipeline import writer_lock
from pipeline.cache import CacheError


def test_a_run_is_refused_while_any_rank_of_another_run_holds_the_lock(tmp_path):
    """A rank that joined keeps the lock held after its rank 0 has ended (say ranks left running by a killed launcher)."""
    lock = tmp_path / "locks" / "train.lock"
    with writer_lock.first_writer(lock, "split 'train'"):
        joined = writer_lock.joining_writer(lock, "split 'train'")
        joined.__enter__()
    try:
        with pytest.raises(CacheError, match=r"split 'train' is being written by another run \(pid \d+ on host "):
            with writer_lock.first_writer(lock, "split 'train'"):
                pass
    finally:
        joined.__exit__(None, None, None)
    with writer_lock.first_writer(lock, "split 'train'"):
        assert f"pid {os.getpid()} " in lock.read_text()


def test_a_filesystem_without_flock_is_warned_about_and_the_run_goes_on(tmp_path, monkeypatch):
    def unsupported(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(writer_lock.fcntl, "flock", unsupported)
    with pytest.warns(UserWarning, match=r"cannot lock .*train.lock \(No locks available\): make sure that only one run"):
        with writer_lock.first_writer(tmp_path / "train.lock", "split 'train'"):
            pass
