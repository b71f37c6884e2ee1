"""Survive a video file that crashes the decoder (decord can abort in C++ on some corrupt H.264).

A Python-level decode error is just a failed view (pipeline.video.VideoError). A crash kills the
decoding process instead, so extract guards every decode with a marker file naming the video,
`<cache>/decoding/<host>-<pid>.json`, written before and removed after (also on any Python
exception). A marker whose process is gone names a *suspect*: the file that killed it, or a file
that was being decoded when the whole job was killed from outside. `triage` tells the two apart by
decoding each suspect once more in a child process: if the child dies too, the file is recorded
in `<cache>/decoder_crashes/` and not decoded again while it stays unchanged (its view is absent, with
the reason, like any failed view); otherwise the marker is simply dropped. A record keeps the file's size
and modification time: a file replaced since (fixed, fetched again) is decoded again, guarded as ever.

finetune and evaluate decode under the same guard, in their run or output folder (CrashGuard). They
do not go on in the same run: a crash stops it with the file named and recorded, and the rerun
(`finetune --resume`, or the same evaluate command) goes on with that view absent.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.files import commit_file, read_json, write_json_atomic
from pipeline.video import ClipSampling

MARKERS, CRASHES = "decoding", "decoder_crashes"
FOLDERS = (MARKERS, CRASHES)  # what a run writes in its output folder
DECODE_TIMEOUT_S = 600  # a take's decode that hangs this long counts as a crash too (worker and child)
# errors fetching a batch's shared memory from the worker that sent it, when that worker is dying; and how long to
# wait for it to be seen dead (its exit takes milliseconds; a live worker costs this wait, once, on an error path)
HANDOVER_ERRORS = (ConnectionError, EOFError, FileNotFoundError)
WORKER_EXIT_WAIT_S = 5.0

# exit 0 when the file decodes or is refused with a VideoError; any other exit status means the
# child itself could not run (a broken environment), which must not pass for "decodes fine"
_CHILD = """
import sys
from pipeline.video import ClipSampling, VideoError, decode_clip
try:
    decode_clip(sys.argv[1], ClipSampling(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if sys.argv[4] else None))
except VideoError:
    pass
"""


@dataclass(frozen=True)
class CrashGuard:
    """Decodes marked under `root` (a cache, run or output folder); the (take_uid, view) files in `crashes`
    are known to crash the decoder and are not decoded again."""

    root: Path
    crashes: dict[tuple[str, str], str]

    def known_crash(self, take_uid: str, view: str, path: Path) -> str | None:
        """Why `path` is known to crash the decoder; None if it is not. A record made for another file of the
        take's view (a run from another download root into the same folder) does not apply: `path` is decoded,
        guarded as ever."""
        reason = self.crashes.get((take_uid, view))
        if reason is None:
            return None
        record = _read_record(record_path(self.root, take_uid, view))
        return reason if record is None or record.get("path") == os.path.abspath(path) else None


def loader_timeout(decodes_per_item: int, workers: int) -> float:
    """A DataLoader's wait for one item whose decodes are guarded: a worker stuck in the decoder then fails
    the wait like a dead one, and triage names the file (recorded as hung by its child's own limit)."""
    return DECODE_TIMEOUT_S * decodes_per_item if workers else 0


@contextlib.contextmanager
def worker_batches(loader) -> Iterator[Iterator]:
    """The batches of a DataLoader whose workers decode under a guard; on leaving the block, the workers are stopped
    (_stop_workers). A worker that died while its batch was handed over is reported as torch reports a dead worker
    ("DataLoader worker (pid(s) N) exited unexpectedly"), so that triage runs.

    A batch's tensors travel as file descriptors that the main process fetches from their worker. A worker that
    puts a batch on the queue and then dies (the decoder crashing on its next file) can close that connection
    while it is still exiting: the fetch fails (ConnectionResetError), torch finds every worker still alive and
    raises the connection error as it is, and the crash went unexplained (seen once in the test suite, on a busy
    host). Here such an error waits a moment for a worker to be seen dead; if none dies, it is raised as it is.
    """
    batches = iter(loader)
    try:
        yield _handed_over(batches)
    finally:
        _stop_workers(batches)


def _handed_over(batches) -> Iterator:
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except HANDOVER_ERRORS as err:
            if "in DataLoader worker process" in str(err):  # the worker's own exception, re-raised: not a handover
                raise
            dead = _dead_workers(batches)
            if not dead:
                raise
            raise RuntimeError(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly while its "
                               f"batch was handed over ({type(err).__name__}: {err})") from err
        yield item


def _dead_workers(batches) -> list[int]:
    """The pids of a DataLoader iterator's workers that are dead, or die within WORKER_EXIT_WAIT_S; [] without any."""
    workers = getattr(batches, "_workers", [])
    deadline = time.monotonic() + WORKER_EXIT_WAIT_S
    while True:
        dead = [worker.pid for worker in workers if not worker.is_alive()]
        if dead or not workers or time.monotonic() >= deadline:
            return dead
        time.sleep(0.02)


def _stop_workers(batches) -> None:
    """Stop a DataLoader iterator's workers now (its own, private, join-then-terminate), not when a traceback
    lets it go: triage must not see a worker stuck in the decoder alive."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent without workers
    if shutdown:
        shutdown()


def worker_died(err: RuntimeError) -> bool:
    """Whether `err` is a DataLoader's news of a dead (or stuck, past its timeout) worker.

    Only then may a marker left behind name the cause: after any other error, the loader's shutdown
    kills workers mid-decode too, and their markers stay."""
    # "DataLoader worker (pid(s) N) exited unexpectedly", "DataLoader worker (pid N) is killed by signal: ...",
    # "DataLoader timed out after N seconds"; not "Caught RuntimeError in DataLoader worker process 0": an
    # exception the worker raised, after which the shutdown may kill the other workers mid-decode
    return "DataLoader worker (pid" in str(err) or "DataLoader timed out" in str(err)


def explained_worker_death(root: Path, err: RuntimeError, rerun: str) -> RuntimeError | None:
    """After `err` stopped a run that decodes under `root`'s guard: if a decoding worker died, the error
    naming the file (recorded when it crashes the decoder alone too, so that `rerun` goes on without its
    view); None when `err` has another cause."""
    if not worker_died(err):
        return None
    before = known_crashes(root)
    cleared: list[str] = []
    # new, or recorded anew for another file of the take's view (another root): the reason names the file
    new = {key: reason for key, reason in triage(root, cleared).items() if before.get(key) != reason}
    if new:
        lines = "\n".join(f"take {uid}, view {view}: {reason}" for (uid, view), reason in new.items())
        return RuntimeError(f"{err}\n{lines}\nRecorded in {Path(root) / CRASHES}: {rerun} goes on with "
                            f"{'this view' if len(new) == 1 else 'these views'} absent.")
    return outside_the_file(err, cleared, f"{rerun} decodes it again.") if cleared else None


def outside_the_file(err: RuntimeError, cleared: list[str], then: str) -> RuntimeError:
    """`err`, a worker's death while it decoded the `cleared` files, which triage found to decode fine alone."""
    return RuntimeError(f"{err}\nA decoding process died while decoding {', '.join(cleared)}, which decodes fine alone "
                        f"in a child process: the cause is outside the file (out of memory?). {then}")


@contextlib.contextmanager
def decoding(cache_root: Path, take_uid: str, view: str, path: Path, sampling: ClipSampling) -> Iterator[None]:
    """Mark `path` as being decoded by this process for the duration of the block."""
    marker = Path(cache_root) / MARKERS / f"{socket.gethostname()}-{os.getpid()}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")  # no fsync: the marker only has to survive the process, not the OS
    # absolute: the record it may become is checked against the file from whatever folder a later run starts in
    tmp.write_text(json.dumps({"take_uid": take_uid, "view": view, "path": os.path.abspath(path), "frames": sampling.frames,
                               "sampling": sampling.method, "position": sampling.position,
                               "started": _start_time(os.getpid()), "file": file_identity(path)}))
    os.replace(tmp, marker)
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def known_crashes(cache_root: Path) -> dict[tuple[str, str], str]:
    """(take_uid, view) -> reason, for every file recorded as crashing the decoder that is still the file it
    was (same size and modification time; records written before they were kept always apply)."""
    folder = Path(cache_root) / CRASHES
    records = [_read_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return {(r["take_uid"], r["view"]): r["reason"] for r in records if r and _unchanged(r)}


def record_path(cache_root: Path, take_uid: str, view: str) -> Path:
    """Where the crash record of a take's view is kept: `<root>/decoder_crashes/<take_uid>.<view>.json`."""
    return Path(cache_root) / CRASHES / f"{_file_stem(take_uid)}.{view}.json"


def _file_stem(take_uid: str) -> str:
    """The take uid itself where it can be a file name (EgoExo4D's are UUIDs); else (predict's take folders, which are
    paths; a name too long for a file system) a hash of it. A record holds the uid itself, which is what it is read by."""
    unusable = take_uid in ("", ".", "..") or "/" in take_uid or "\0" in take_uid or len(take_uid.encode()) > 128
    if not unusable:
        return take_uid
    return "uid-" + hashlib.sha256(take_uid.encode()).hexdigest()[:32]


def _read_record(path: Path) -> dict | None:
    try:
        return read_json(path)
    except FileNotFoundError:  # forgotten meanwhile by another rank's --retry-failed
        return None


def file_identity(path: Path) -> dict[str, int] | None:
    """What tells a replaced video file from the one a crash was recorded for; None for a missing file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _unchanged(record: dict) -> bool:
    return "file" not in record or file_identity(Path(record["path"])) == record["file"]


def forget(cache_root: Path, take_uids: list[str]) -> None:
    """Drop the crash records of these takes' files, so that they are decoded again (guarded as ever)."""
    for uid in take_uids:
        for record in (Path(cache_root) / CRASHES).glob(f"{glob.escape(_file_stem(uid))}.*.json"):
            record.unlink(missing_ok=True)


def triage(cache_root: Path, cleared: list[str] | None = None) -> dict[tuple[str, str], str]:
    """Re-decode every suspect of this host in a child process, record the crashes; returns known_crashes.

    Suspects that decode fine alone are appended to `cleared` when given. A process claims each marker
    (renamed `<marker>.triaging-<pid>-<start time>`) before decoding it, so ranks sharing a host decode it
    once; a claim whose process died is taken over.
    """
    folder = Path(cache_root) / MARKERS
    # `<host>-<pid>.json`, or claimed: `….triaging-<pid>[-<start time>]`; exactly this host's (not `<host>-2-…`'s)
    names = re.compile(rf"{re.escape(socket.gethostname())}-(\d+)\.json(?:\.triaging-(\d+)(?:-(\d+))?)?")
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (match := names.fullmatch(path.name)):
            continue
        try:
            suspect = read_json(path)
            # the frames that were being decoded: markers written before sampling methods (or finetune's moved
            # windows) existed lack the keys, and were uniform (or centred)
            sampling = ClipSampling(suspect["frames"], suspect.get("sampling", "uniform"), suspect.get("position"))
            video, record = Path(suspect["path"]), record_path(cache_root, suspect["take_uid"], suspect["view"])
        except FileNotFoundError:  # claimed meanwhile by another process on this host
            continue
        except (ValueError, KeyError, TypeError) as err:  # written whole and renamed in: only an OS crash cuts one
            warnings.warn(f"{path}: an unreadable decode marker ({err!r}); removed. If it named a file that crashes "
                          "the decoder, the next crash names it again.", stacklevel=2)
            path.unlink(missing_ok=True)
            continue
        decoder, triager, triager_started = match.groups()
        if triager and _alive(int(triager), int(triager_started) if triager_started else None):
            continue  # being triaged
        if not triager and _alive(int(decoder), suspect.get("started")):
            continue  # a decode in progress (another worker or rank on this host)
        marker = folder / path.name.split(".triaging-")[0]
        started = _start_time(os.getpid())
        claim = marker.with_name(f"{marker.name}.triaging-{os.getpid()}" + ("" if started is None else f"-{started}"))
        try:
            os.rename(path, claim)
        except FileNotFoundError:
            continue
        try:
            reason = _crash_in_child(video, sampling)
        except BaseException:  # a child that could not run, or this process stopped: the marker waits for a rerun
            with contextlib.suppress(FileExistsError):  # unless a new decode took its name: then the claim waits
                commit_file(claim, marker, create_only=True)
            raise
        if reason:
            write_json_atomic(record, suspect | {"reason": reason})
        elif cleared is not None:
            cleared.append(suspect["path"])
        claim.unlink(missing_ok=True)
    return known_crashes(cache_root)


def _crash_in_child(path: Path, sampling: ClipSampling) -> str | None:
    """The reason if decoding `path` kills (or hangs) a fresh process; None if it returns or raises."""
    position = "" if sampling.position is None else repr(sampling.position)
    command = [sys.executable, "-c", _CHILD, str(path), str(sampling.frames), sampling.method, position]
    try:
        result = subprocess.run(command, capture_output=True, timeout=DECODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{path}: the decoder hung (> {DECODE_TIMEOUT_S} s) on this file"
    if result.returncode > 0:
        raise RuntimeError(f"{path}: could not re-decode it in a child process to check for a decoder crash "
                           f"(exit {result.returncode}): {result.stderr.decode(errors='replace')[-1000:]}")
    if result.returncode == 0:
        return None
    return f"{path}: the decoder crashed on this file ({signal.Signals(-result.returncode).name})"


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` still runs; with `started` (its start time, _start_time), that very process.

    A marker bearing this process's own pid was written by an earlier process: in a container, a rerun often
    gets the pid of the run that crashed."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return started is None or _start_time(pid) in (None, started)


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22); None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])  # after the name, which may hold spaces
    except (OSError, IndexError, ValueError):
        return None
