import errno
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

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



def test_a_lock_failing_for_another_reason_stops_the_run(tmp_path, monkeypatch):
    def failing(file, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_lock.fcntl, "flock", failing)
    with pytest.raises(OSError, match="Input/output error"):  # not a warning and a run without its lock
        with writer_lock.first_writer(tmp_path / "train.lock", "split 'train'"):
            pass


def started_then_asleep(running) -> None:
    running.set()
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path):
    """A DataLoader worker stuck in the decoder outlives its killed main process: it must not hold the run's lock."""
    lock = tmp_path / "train.lock"
    context = multiprocessing.get_context("fork")
    running = context.Event()
    with writer_lock.first_writer(lock, "split 'train'"):
        child = context.Process(target=started_then_asleep, args=(running,))
        child.start()
        assert running.wait(60)  # the child is past fork's hooks
    try:
        with writer_lock.first_writer(lock, "split 'train'"):  # the child is still alive
            assert child.is_alive()
    finally:
        child.kill()
        child.join()


def test_a_rank_that_cannot_see_rank_0s_lock_says_so(tmp_path):
    with pytest.raises(CacheError, match="rank 0 of this run holds it, but this process cannot see it; if the cache is on a "
                                         "shared filesystem"):
        with writer_lock.joining_writer(tmp_path / "locks" / "train.lock", "split 'train'"):
            pass


def test_a_lock_file_its_holder_removed_meanwhile_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """A refused finetune removes the run folder it made for its lock: a run that opened the file just before must
    not lock the removed file while a third run locks a new one."""
    lock = tmp_path / "run" / "run.lock"
    refused = writer_lock.first_writer(lock, "the run folder")
    refused.__enter__()
    real_lock, removed = writer_lock._lock, []

    def removed_before_this_lock(fd, operation, path, subject):
        if not removed:  # this run has opened the file; the refused run now removes it and lets go
            removed.append(path)
            lock.unlink()
            refused.__exit__(None, None, None)
            lock.parent.rmdir()
        return real_lock(fd, operation, path, subject)

    monkeypatch.setattr(writer_lock, "_lock", removed_before_this_lock)
    with writer_lock.first_writer(lock, "the run folder"):
        monkeypatch.setattr(writer_lock, "_lock", real_lock)
        assert removed and lock.is_file()
        with pytest.raises(CacheError, match="is being written by another run"):
            with writer_lock.first_writer(lock, "the run folder"):
                pass


FORKED_CHILD_LEAVES_THE_BLOCK = """
import os, sys
from pipeline import writer_lock
with writer_lock.first_writer(sys.argv[1], "x"):
    child = os.fork()
    if child == 0:  # its copy of the lock was closed at fork: the pipe may take its number
        reader, writer = os.pipe()
if child == 0:
    try:
        os.write(writer, b"x")
        os._exit(0 if os.read(reader, 1) == b"x" else 1)
    except BaseException:
        os._exit(2)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_leaving_the_block_does_not_close_a_descriptor_it_reused(tmp_path):
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD_LEAVES_THE_BLOCK, str(tmp_path / "train.lock")],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
