"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one intact.

Durable too: a file's bytes are flushed to disk before its rename, and the folder holding a
rename after it, so a power loss cannot leave a committed name pointing at empty or missing data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; results and caches are meant to be shared
# like any file the process writes: 0666 less the umask (read once, at import: setting it is process-wide)
NEW_FILE_MODE = 0o666 & ~_read_umask()


def write_bytes_atomic(path: Path, data: bytes, create_only: bool = False) -> None:
    """Write `path` whole; with `create_only`, FileExistsError if it exists (checked atomically, at the commit)."""
    path = Path(path)
    make_folders(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        commit_file(Path(tmp), path, create_only)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporary_files(folders: Iterable[Path]) -> list[Path]:
    """Delete the temporary files of write_bytes_atomic (`.NAME.*.tmp`) that killed writers left in `folders` (not
    their subfolders); returns them. Only while no other process writes there (a run holding its lock)."""
    leftovers = [path for folder in folders for path in Path(folder).glob(".*.????????.tmp") if path.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def commit_file(finished: Path, target: Path, create_only: bool = False) -> None:
    """Rename the complete file `finished` to `target` durably: its bytes, then the rename, reach the disk.

    With `create_only` an existing `target` is kept and FileExistsError raised (a hard link, which cannot
    replace; on a filesystem without hard links, a plain rename)."""
    fsync_path(finished)
    if create_only:
        try:
            os.link(finished, target)
            os.unlink(finished)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: rename, after a check (no longer atomic)
            if Path(target).exists():
                raise FileExistsError(target) from None
            os.replace(finished, target)
    else:
        os.replace(finished, target)
    fsync_path(Path(target).parent)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (creations, renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: Path) -> None:
    """`mkdir -p` whose new folders' entries reach the disk too (each new folder's parent is fsynced)."""
    folder, missing = Path(folder), []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_path(new.parent)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (writers like save_pretrained do not)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(parent) / name)
        fsync_path(Path(parent))


def write_json_atomic(path: Path, obj: object, create_only: bool = False) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), create_only)


def read_json(path: Path) -> object:
    return json.loads(Path(path).read_bytes())  # bytes: UTF-8 whatever the locale


def write_folder_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """`write(folder)` fills a staging folder beside `target`, which then replaces `target`: a reader
    never sees a half-written folder (HF's and peft's save_pretrained write in place)."""
    staging = Path(target).with_name(Path(target).name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    fsync_tree(staging)
    replace_folder(staging, target)


def replace_folder(finished: Path, target: Path) -> None:
    """Move the complete folder `finished` to `target`, replacing what is there.

    The old `target` waits as `<target>.old` between the two renames and is deleted after them, so a
    crash at any moment leaves the new folder, the old one, or both, never a mix of the two.
    """
    finished, target = Path(finished), Path(target)
    retired = target.with_name(target.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    finished.rename(target)
    fsync_path(target.parent)
    shutil.rmtree(retired, ignore_errors=True)
