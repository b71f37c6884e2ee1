"""Export a feature cache to one HDF5 file that plain h5py (or any HDF5 reader) can use.

Layout: `/<split>/tokens` (N, V, 1 + T, D) float16 chunked one take per chunk, `/<split>/present`
(N, V) bool, `/<split>/label` (N,) int64, `/<split>/take_uid`, `/<split>/take_name`,
`/<split>/scenario` (N,) UTF-8 strings; file attributes `views`, `label_names`, `frames`,
`num_patches`, `hidden_size`, `fingerprint` (JSON).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache import CacheError, FeatureCache, written_by_the_cache
from pipeline.config import ConfigError
from pipeline.files import commit_file
from pipeline.takes import LABEL_NAMES


def _remove_dead_partials(out: Path) -> None:
    """Delete partial files that exports killed on this host left beside `out` (others may still be writing)."""
    host = socket.gethostname()
    for leftover in out.parent.glob(f".{out.name}.*.partial"):
        writer_host, _, pid = leftover.name[len(out.name) + 2 : -len(".partial")].rpartition("-")
        if writer_host == host and pid.isdigit() and not _running(int(pid)):
            leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    return True


def export_hdf5(cache: FeatureCache, out: Path, splits: list[str] | None = None) -> dict[str, int]:
    """Write every take of `splits` (default: all; each must be finished) to `out` atomically; returns takes per split."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is an existing directory; give the output file's path, e.g. {out / 'features.h5'}")
    if written_by_the_cache(cache.root, out):
        raise ConfigError(f"--out {out} is among the files of the cache it exports ({cache.root}); write it elsewhere")
    if out.exists() and not _is_an_export(out):
        raise ConfigError(f"--out {out} exists and is not an export of a skillpipe cache: it is left as it is; give "
                          "another file name, or delete it first")
    splits = _finished_splits(cache, splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    partial = out.with_name(f".{out.name}.{socket.gethostname()}-{os.getpid()}.partial")  # one per writing process
    try:
        counts = _write(cache, splits, partial)
        commit_file(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return counts


def _is_an_export(path: Path) -> bool:
    """Whether `path` is an HDF5 file that export wrote (it carries the cache's fingerprint): one a rerun may replace."""
    try:
        with h5py.File(path, "r") as file:
            return "fingerprint" in file.attrs
    except OSError:  # not HDF5 at all
        return False


def _finished_splits(cache: FeatureCache, splits: list[str] | None) -> list[str]:
    """The splits to export, refusing unknown and unfinished ones: a partial split would pass for a whole one."""
    known = cache.splits()
    if not known:
        raise CacheError(f"{cache.root}: no committed takes to export")
    splits = known if splits is None else list(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in known]
    if unknown:
        raise CacheError(f"{cache.root}: the cache has no split {', '.join(unknown)} (it has: {', '.join(known)})")
    for split in splits:
        if not cache.is_complete(split):
            finished = [s for s in known if cache.is_complete(s)]
            raise CacheError(
                f"{cache.root}: split {split} is unfinished ({cache.progress(split)}); rerun the same "
                "`skillpipe extract` command to finish it, or export only the finished splits with --split "
                f"(finished: {', '.join(finished) or 'none'})"
            )
    return splits


def _write(cache: FeatureCache, splits: list[str], path: Path) -> dict[str, int]:
    counts = {}
    with h5py.File(path, "w") as h5:
        h5.attrs["views"] = list(cache.spec.views)
        h5.attrs["label_names"] = list(LABEL_NAMES)
        h5.attrs["frames"] = cache.spec.frames
        h5.attrs["num_patches"] = cache.spec.num_patches
        h5.attrs["hidden_size"] = cache.spec.hidden_size
        h5.attrs["fingerprint"] = json.dumps(cache.spec.fingerprint, sort_keys=True)
        for split in splits:
            data = cache.read(split, complete=True)
            group = h5.create_group(split)
            group.create_dataset("tokens", data=data.tokens, chunks=(1, *data.tokens.shape[1:]))
            group.create_dataset("present", data=data.present)
            group.create_dataset("label", data=data.labels)
            for name in ("take_uid", "take_name", "scenario"):
                values = [getattr(r, name) for r in data.records]
                group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            counts[split] = len(data.records)
    return counts
