import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.distributed import MAIN_ERROR_GRACE_S
from tests.torchrun_output import root_cause

REPO = Path(__file__).resolve().parents[1]


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_end_when_their_torchrun_launcher_is_killed_alone(tmp_path):
    """torchrun puts each rank in a session of its own: kill -9 of the launcher alone used to leave them running."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "torchrun_probe.py"),
                                 str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    pids = []
    try:
        assert wait_for(lambda: all(p.is_file() and p.read_text() for p in pid_files), 120), "the ranks did not start"
        pids = [int(p.read_text()) for p in pid_files]
        assert all(running(pid) for pid in pids)
        launcher.kill()
        launcher.wait()
        assert wait_for(lambda: not any(running(pid) for pid in pids), 30), "ranks outlived their launcher"
    finally:
        launcher.kill()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_error_outside_the_shared_kinds_in_rank_0s_step_reaches_the_other_ranks_as_main_rank_failed(tmp_path):
    """Only the user-facing kinds were shared: a bug's RuntimeError on rank 0 left the others to die in gloo."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "torchrun_probe.py"),
                               str(tmp_path), "main-fails"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert (tmp_path / "rank0.error").read_text() == "RuntimeError: a bug"  # rank 0's own error, as it was
    assert (tmp_path / "rank1.error").read_text() == "MainRankFailed: rank 0 failed: RuntimeError: a bug"


def test_the_other_ranks_wait_for_rank_0_to_end_its_error_handling_and_torchrun_names_it_the_root_cause(tmp_path):
    """With the error shared at once, rank 1 exited first: torchrun named it the root cause and killed rank 0 in the
    middle of its own error handling (its traceback, or a decoder crash's diagnosis, could be lost)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    started = time.monotonic()
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "torchrun_probe.py"),
                               str(tmp_path), "main-fails-slowly"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
    said = " ".join((launched.stdout + launched.stderr).split())
    assert launched.returncode == 1 and (tmp_path / "rank0.error").read_text() == "RuntimeError: a bug", said[-3000:]
    assert root_cause(said) == (0, 1) and not (tmp_path / "rank1.error").exists(), said[-3000:]  # stopped by torchrun
    assert time.monotonic() - started < MAIN_ERROR_GRACE_S  # not after the grace


def can_run_in_a_pid_namespace() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not can_run_in_a_pid_namespace(),
                    reason="needs unshare and the right to make a PID namespace")
def test_ranks_run_when_torchrun_is_pid_1_as_in_a_container(tmp_path):
    """A parent of pid 1 is torchrun itself there, not a sign that the launcher died."""
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(torchrun), "--standalone", "--nproc-per-node", "2",
                             str(REPO / "tests" / "torchrun_probe.py"), str(tmp_path), "exit"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "rank0.pid").read_text() and (tmp_path / "rank1.pid").read_text()


@pytest.mark.parametrize("fails", [False, True])
def test_a_stages_process_group_is_destroyed_when_its_work_ends_well_and_left_to_the_exit_after_an_error(monkeypatch, fails):
    from pipeline import distributed

    joined, destroyed = [], []
    monkeypatch.setattr(distributed, "init_distributed", lambda device: joined.append(device) or distributed.Ranks(1, 2))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with distributed.torchrun_ranks("cpu") as ranks:
            assert ranks == distributed.Ranks(1, 2) and joined == ["cpu"]
            if fails:
                raise RuntimeError("a rank's own error")
    assert destroyed == ([] if fails else [True])
