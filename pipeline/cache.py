"""The feature cache: one zarr v3 store of per-take token features, sharded, resumable, crash-safe.

Layout of a cache folder:
    cache.json                  CacheSpec: fingerprint + array geometry (written once)
    features.zarr/<split>/tokens  (N, V, 1 + T, D) float16; row r = r-th take of the split by take_uid;
                                [:, :, 0] = CLS token, [:, :, 1 + t] = mean of frame t's patch tokens
    splits/<split>.json         the split's take_uids in row order, fixed when the split is planned
    shards/<split>/NNNNN.json   commit marker of shard NNNNN: its takes' index records + failures
    failures.json               every failed view so far, take_uid -> view -> reason
    locks/<split>.lock          held by the ranks of the extract run writing the split (pipeline.writer_lock)
    locks/failures.lock         held while failures.json is rebuilt (runs of several splits may end together)

A shard holds `shard_size` consecutive rows and is written whole by one writer, then committed by
atomically writing its marker. Readers and resumed runs trust only committed shards, so a crash
at any moment loses at most the shards in flight and never exposes half-written data.

Committed data damaged afterwards (a cache copied in part, a file emptied or deleted, flipped bits)
is refused, never read as zeros or noise: each marker records its shard file's size and each take's
chunk carries a CRC32C checksum (zarr's own codec), which every read checks. A rerun of extract
extracts such shards again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import Crc32cCodec

from pipeline import decoder_crashes
from pipeline.files import fsync_path, read_json, write_json_atomic

CACHE_FORMAT = 1
STORE_NAME = "features.zarr"


def written_by_the_cache(root: Path, path: Path) -> bool:
    """Whether `path` is the cache folder `root` itself or lies under one of the entries that the cache and its extract
    runs write there (anything else, such as fit-head runs kept in the cache folder, is the user's)."""
    root, path = Path(root).resolve(), Path(path).resolve()
    if not path.is_relative_to(root):
        return False
    parts = path.relative_to(root).parts
    return not parts or parts[0] in {"cache.json", STORE_NAME, "shards", "splits", "locks", "failures.json",
                                     *decoder_crashes.FOLDERS} or parts[0].startswith("extract-")


class CacheError(Exception):
    """A cache that cannot be used as asked: missing, unfinished, or built differently."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds. `fingerprint` must match exactly for features to be added to a cache."""

    fingerprint: dict
    views: tuple[str, ...]
    frames: int
    num_patches: int
    hidden_size: int
    shard_size: int = 16
    format: int = CACHE_FORMAT

    @property
    def tokens_per_view(self) -> int:
        return 1 + self.frames


@dataclass(frozen=True)
class TakeRecord:
    """The per-take index entry stored with each committed shard."""

    take_uid: str
    take_name: str
    split: str
    label: int
    scenario: str
    present: tuple[bool, ...]  # one flag per cache view: False = view absent or failed

    @classmethod
    def from_json(cls, data: dict) -> TakeRecord:
        return cls(**{**data, "present": tuple(data["present"])})


@dataclass
class CachedSplit:
    """The committed part of one split, loaded into memory."""

    tokens: np.ndarray  # (N, V, 1 + T, D) float16; rows of absent views are zero
    records: list[TakeRecord] = field(default_factory=list)

    @property
    def present(self) -> np.ndarray:  # (N, V) bool
        return np.array([r.present for r in self.records], dtype=bool).reshape(len(self.records), self.tokens.shape[1])

    @property
    def labels(self) -> np.ndarray:  # (N,) int64
        return np.array([r.label for r in self.records], dtype=np.int64)


class FeatureCache:
    def __init__(self, root: Path, spec: CacheSpec):
        self.root, self.spec = Path(root), spec

    @classmethod
    def open(cls, root: Path) -> FeatureCache:
        """An existing cache, for reading or adding to."""
        path = Path(root) / "cache.json"
        if not path.is_file():
            raise CacheError(f"{root}: not a skillpipe feature cache (no cache.json); run `skillpipe extract` first")
        try:
            data = read_json(path)
        except ValueError as err:
            raise CacheError(f"{path}: not JSON ({err}); was it replaced by another file?") from None
        if not isinstance(data, dict) or "format" not in data:
            raise CacheError(f"{path}: not a skillpipe cache description (no \"format\"); was it replaced by another file?")
        if data["format"] != CACHE_FORMAT:
            raise CacheError(f"{root}: cache format {data['format']} is not supported (expected {CACHE_FORMAT})")
        try:
            return cls(root, CacheSpec(**{**data, "views": tuple(data["views"])}))
        except (KeyError, TypeError) as err:  # a field missing or unknown
            raise CacheError(f"{path}: not a complete skillpipe cache description ({err})") from None

    @classmethod
    def open_or_create(cls, root: Path, spec: CacheSpec) -> FeatureCache:
        """Open the cache at `root` if it was built with the same fingerprint, else refuse; create it if absent."""
        if (Path(root) / "cache.json").is_file():
            cache = cls.open(root)
            differences = _differences(cache.spec, spec)
            if differences:
                listing = "\n".join(f"  - {d}" for d in differences)
                hint = ("shard_size does not change the features: leave --shard-size out to use the cache's. "
                        if any(d.startswith("shard_size") for d in differences) else "")
                raise CacheError(
                    f"{root}: this cache was built differently; refusing to mix features:\n{listing}\n"
                    f"{hint}Use another --cache folder (or delete this one)."
                )
            return cache
        Path(root).mkdir(parents=True, exist_ok=True)
        try:  # runs of two splits may create one cache at the same moment: the first wins, the other compares
            write_json_atomic(Path(root) / "cache.json", asdict(spec), create_only=True)
        except FileExistsError:
            return cls.open_or_create(root, spec)
        return cls(root, spec)

    # ---- planning and writing -------------------------------------------------------------

    def plan_split(self, split: str, take_uids: list[str], create: bool = True) -> list[list[str]]:
        """Fix the split's row order (first call) and return its shards as lists of take_uids.

        With `create` False (torchrun's other ranks, after rank 0 planned) a missing plan is an error:
        such a rank must never create the array, which would wipe what other ranks committed.
        """
        plan_path = self.root / "splits" / f"{split}.json"
        if plan_path.is_file():
            planned = read_json(plan_path)
            if planned != list(take_uids):
                raise CacheError(
                    f"{self.root}: split {split!r} was planned with a different set of takes "
                    f"({len(planned)} takes, now {len(take_uids)}); the annotation file changed. "
                    f"Use another --cache folder, with `--reuse {self.root}` to copy the features of the takes "
                    "they share instead of extracting them again."
                )
            # never recreate a planned split's array: a rank that cannot see it yet (a shared
            # filesystem's attribute cache) would wipe the shards that other ranks committed
            if not (self._array_path(split) / "zarr.json").is_file():
                raise CacheError(
                    f"{self.root}: the cache's array for split {split!r} is missing ({self._array_path(split)}) "
                    "although the split is planned; if the cache is on a shared filesystem, check that every "
                    "node sees the same files, else use another --cache folder (or delete this one)."
                )
        else:
            if not create:
                raise CacheError(
                    f"{self.root}: split {split!r} has no plan ({plan_path}) visible to this process although rank 0 "
                    "planned it; if the cache is on a shared filesystem, check that every node sees the same files."
                )
            if self.committed_shards(split):
                raise CacheError(
                    f"{self.root}: split {split!r} has committed shards but no plan ({plan_path}); refusing to recreate "
                    "its array. Restore the plan file, or use another --cache folder."
                )
            # nothing committed yet: an array left by a crash before its plan was written is safe to recreate
            zarr.create_array(
                store=self.root / STORE_NAME,
                name=f"{split}/tokens",
                shape=(len(take_uids), len(self.spec.views), self.spec.tokens_per_view, self.spec.hidden_size),
                # one take per inner chunk: reading a split is ~3x faster than with one chunk per view
                chunks=(1, len(self.spec.views), self.spec.tokens_per_view, self.spec.hidden_size),
                shards=(self.spec.shard_size, len(self.spec.views), self.spec.tokens_per_view, self.spec.hidden_size),
                dtype="float16",
                fill_value=0,
                # no compression (float16 features barely compress: zstd 1.09x), but a checksum per take, so that
                # damaged data is refused, not read (a chunk zarr finds no bytes for reads as zeros)
                compressors=[Crc32cCodec()],
                overwrite=True,
            )
            store = self.root / STORE_NAME
            # zarr renames its metadata into place without fsync: flush it before the plan commits the split
            _flush_up_to(self.root, store / "zarr.json", store / split / "zarr.json", self._array_path(split) / "zarr.json")
            write_json_atomic(plan_path, list(take_uids))
        size = self.spec.shard_size
        return [list(take_uids[start : start + size]) for start in range(0, len(take_uids), size)]

    def remove_leftovers(self, split: str) -> list[Path]:
        """Delete the temporary files that killed writers left (markers' `.*.tmp`, zarr's `*.partial`); returns them.

        Only while no writer of this split runs: extract's rank 0, before the other ranks start."""
        leftovers = [*(self.root / "shards" / split).glob(".*.tmp"), *self._array_path(split).rglob("*.partial")]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def committed_shards(self, split: str) -> set[int]:
        folder = self.root / "shards" / split
        return {int(p.stem) for p in folder.glob("[0-9]*.json")} if folder.is_dir() else set()

    def write_shard(
        self, split: str, shard: int, tokens: np.ndarray, records: list[TakeRecord], failures: dict,
        videos: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Write shard `shard` whole (tokens: (k, V, 1 + T, D)), then commit it with its marker.

        `videos`: take_uid -> view -> the video file its features came from, kept in the marker (extract compares it
        with the annotations on a rerun)."""
        start = shard * self.spec.shard_size
        array = zarr.open_array(store=self.root / STORE_NAME, path=f"{split}/tokens", mode="r+")
        expected = (min(self.spec.shard_size, array.shape[0] - start), *array.shape[1:])
        if tokens.shape != expected or len(records) != expected[0]:
            raise ValueError(f"shard {shard} of {split}: got tokens {tokens.shape}, {len(records)} records; expected {expected}")
        shard_file = self._shard_file(array, split, shard)
        # the shard is uncommitted, so its stored bytes may be torn by a crash; zarr would read
        # them back to merge the new chunks and fail its checksum on every retry
        shard_file.unlink(missing_ok=True)
        array[start : start + expected[0]] = tokens.astype(np.float16)
        _flush_up_to(self.root, shard_file)  # a committed marker must never point at data still in the page cache
        # `commit`: every commit's own, so a reader can tell a rewrite from the marker it read (FeatureCache.read);
        # `data_bytes`: the file's size (0: zarr wrote none, every value being the fill value), checked by readers
        marker = {"records": [asdict(r) for r in records], "failures": failures, "commit": uuid.uuid4().hex,
                  "data_bytes": shard_file.stat().st_size if shard_file.is_file() else 0}
        if videos is not None:
            marker["videos"] = videos
        write_json_atomic(self._marker_path(split, shard), marker)

    def shard_marker(self, split: str, shard: int) -> dict:
        """A committed shard's marker: `records`, `failures`, and since 2026-12-05 `data_bytes` and `videos`."""
        return self._marker(split, shard)

    def update_records(self, split: str, shard: int, records: list[TakeRecord]) -> None:
        """Commit new index records (labels, scenarios, names) for a committed shard's takes; its data stays."""
        marker = self._marker(split, shard)
        if [r["take_uid"] for r in marker["records"]] != [r.take_uid for r in records]:
            raise ValueError(f"shard {shard} of {split}: records of other takes")
        marker.update(records=[asdict(r) for r in records], commit=uuid.uuid4().hex)
        write_json_atomic(self._marker_path(split, shard), marker)

    def shard_failures(self, split: str, shard: int) -> dict:
        """take_uid -> view -> reason of one committed shard."""
        return self._marker(split, shard)["failures"]

    def uncommit_shard(self, split: str, shard: int) -> None:
        """Make a committed shard pending again (its marker goes; the data is rewritten by the next write_shard)."""
        marker = self._marker_path(split, shard)
        marker.unlink(missing_ok=True)
        fsync_path(marker.parent)

    def write_failures_summary(self) -> dict:
        """Rewrite failures.json from every committed marker; returns take_uid -> view -> reason.

        Runs extracting other splits of the cache may end at the same moment: one at a time (a lock held for the
        read and the write), so that the last to write has read every other's commits."""
        lock = self.root / "locks" / "failures.lock"
        lock.parent.mkdir(exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # a filesystem without flock: as before
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits: a summary takes milliseconds
            failures = self.read_failures()
            write_json_atomic(self.root / "failures.json", failures)
        finally:
            os.close(fd)  # releases the lock
        return failures

    def read_failures(self) -> dict:
        """take_uid -> view -> reason over every committed shard (the markers are the truth)."""
        failures = {}
        for split in self.splits():
            for shard in sorted(self.committed_shards(split)):
                try:
                    failures.update(self.shard_failures(split, shard))
                except CacheError as err:  # another split's damage must not fail the run that finished this one
                    warnings.warn(f"{err} (its failures are left out of {self.root / 'failures.json'})", stacklevel=2)
        return failures

    # ---- reading ----------------------------------------------------------------------------

    def splits(self) -> list[str]:
        folder = self.root / "splits"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def planned_takes(self, split: str) -> list[str]:
        path = self.root / "splits" / f"{split}.json"
        return read_json(path) if path.is_file() else []

    def planned_shards(self, split: str) -> int:
        return -(-len(self.planned_takes(split)) // self.spec.shard_size)

    def is_complete(self, split: str) -> bool:
        shards = self.planned_shards(split)
        return shards > 0 and self.committed_shards(split) == set(range(shards))

    def progress(self, split: str) -> str:
        """`committed/planned shards committed`, for messages about an unfinished split."""
        return f"{len(self.committed_shards(split))}/{self.planned_shards(split)} shards committed"

    def read(self, split: str, complete: bool = False) -> CachedSplit:
        """Every committed take of `split`, in row order; with `complete`, every planned take or a CacheError.

        Safe beside a run that rewrites committed shards (`extract --retry-failed` uncommits a shard, then rewrites
        its data, then commits it anew): a read that overlapped such a rewrite sees a marker vanish or change, and
        raises instead of returning a shard's old records over its new (or deleted: zero) data."""
        shards = sorted(self.committed_shards(split))
        if complete and shards != list(range(self.planned_shards(split))):
            raise CacheError(f"{self.root}: split {split} is unfinished ({self.progress(split)}); rerun the same "
                             "`skillpipe extract` command to finish it, or wait for the run writing it to end")
        shape = (len(self.spec.views), self.spec.tokens_per_view, self.spec.hidden_size)
        if not shards:
            return CachedSplit(np.zeros((0, *shape), np.float16), [])
        array = zarr.open_array(store=self.root / STORE_NAME, path=f"{split}/tokens", mode="r")
        try:
            markers = [(shard, self._marker(split, shard)) for shard in shards]
        except FileNotFoundError:
            raise self.changed_while_read(split) from None
        tokens = np.empty((sum(len(m["records"]) for _, m in markers), *shape), np.float16)
        records = []
        for shard, marker in markers:
            data, problem = self._checked_shard(array, split, shard, marker)
            if problem:  # damaged, or a rewrite began after the markers were read
                if not self._unchanged(split, [(shard, marker)]):
                    raise self.changed_while_read(split)
                raise self._damaged(array, split, shard, marker, problem)
            tokens[len(records) : len(records) + len(data)] = data
            records += [TakeRecord.from_json(r) for r in marker["records"]]
        if not self._unchanged(split, markers):
            raise self.changed_while_read(split)
        return CachedSplit(tokens, records)

    def read_committed_shard(self, split: str, shard: int) -> tuple[np.ndarray, dict]:
        """One committed shard's data ((k, V, 1 + T, D) float16) and marker; a CacheError if the data is damaged.

        For its writer (extract --retry-failed keeps the views that had not failed), which holds the split's lock."""
        array = zarr.open_array(store=self.root / STORE_NAME, path=f"{split}/tokens", mode="r")
        marker = self._marker(split, shard)
        data, problem = self._checked_shard(array, split, shard, marker)
        if problem:
            raise self._damaged(array, split, shard, marker, problem)
        return data, marker

    def _unchanged(self, split: str, markers: list[tuple[int, dict]]) -> bool:
        """Whether these committed markers are still the ones read: a rewrite removes a shard's marker first and
        commits a new one (its own `commit`) last."""
        try:
            return all(self._marker(split, shard) == marker for shard, marker in markers)
        except FileNotFoundError:
            return False

    def damaged_shards(self, split: str) -> dict[int, str]:
        """Committed shards of `split` whose data is not what was committed: shard -> what is wrong.

        Reads every committed shard (its checksums): extract checks before resuming, and extracts them again."""
        committed = sorted(self.committed_shards(split))
        if not committed:
            return {}
        try:
            array = zarr.open_array(store=self.root / STORE_NAME, path=f"{split}/tokens", mode="r")
        except zarr.errors.NodeNotFoundError:  # the store or the split's array was deleted: no shard of it can be read
            return {shard: f"the split's array {self._array_path(split)} is missing" for shard in committed}
        damaged = {}
        for shard in committed:
            try:
                marker = self._marker(split, shard)
            except FileNotFoundError:  # uncommitted since it was listed, by a run rewriting it (status, --reuse)
                continue
            except CacheError:
                damaged[shard] = "its commit marker is unreadable"
                continue
            # a shard whose marker went or changed while its data was read is being rewritten, not damaged
            if (problem := self._checked_shard(array, split, shard, marker)[1]) and self._unchanged(split, [(shard, marker)]):
                damaged[shard] = problem
        return damaged

    def _checked_shard(self, array: zarr.Array, split: str, shard: int, marker: dict) -> tuple[np.ndarray | None, str | None]:
        """A committed shard's data as committed, or what is wrong with it."""
        if problem := self._size_problem(array, split, shard, marker):  # first: zarr reads a missing file as zeros
            return None, problem
        start = shard * self.spec.shard_size
        try:
            return array[start : start + len(marker["records"])], None
        except ValueError as err:  # zarr's checksums: a take's chunk, the shard's index
            return None, f"its checksum fails ({err})"

    def _size_problem(self, array: zarr.Array, split: str, shard: int, marker: dict) -> str | None:
        """What is wrong with the size of a committed shard's file; None if it is as committed (or unrecorded: a
        marker written before 2026-12-05)."""
        if "data_bytes" not in marker:
            return None
        file = self._shard_file(array, split, shard)
        size = file.stat().st_size if file.is_file() else None
        if size == marker["data_bytes"] or (size is None and marker["data_bytes"] == 0):
            return None
        found = "it is missing" if size is None else f"it has {size} bytes"
        return f"{found} where {marker['data_bytes']} were committed"

    def _damaged(self, array: zarr.Array, split: str, shard: int, marker: dict, problem: str) -> CacheError:
        uids = [r["take_uid"] for r in marker["records"]]
        takes = uids[0] if len(uids) == 1 else f"{uids[0]} .. {uids[-1]}"
        return CacheError(f"{self._shard_file(array, split, shard)}: the data of committed shard {shard} of split {split} "
                          f"(takes {takes}) is damaged: {problem}. Rerun the `skillpipe extract` command that wrote "
                          "it: it extracts damaged shards again.")

    def _shard_file(self, array: zarr.Array, split: str, shard: int) -> Path:
        """The file zarr keeps shard `shard` of the split's array in."""
        return self._array_path(split) / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))

    def changed_while_read(self, split: str) -> CacheError:
        return CacheError(f"{self.root}: split {split} changed while it was read: an extract run is rewriting committed "
                          "shards (--retry-failed, or a rerun updating them to the annotations or replacing damaged "
                          "data); read it again once that run has ended")

    def commits_sha256(self, splits: tuple[str, ...]) -> str:
        """A hash of what the splits' committed shards hold now: every marker's own commit id (a rewrite, or records
        updated in place, makes a new one; a marker from before commit ids counts by its whole content)."""
        try:
            listing = [[split, shard, marker.get("commit") or marker] for split in splits
                       for shard in sorted(self.committed_shards(split)) for marker in [self._marker(split, shard)]]
        except FileNotFoundError:  # uncommitted between the listing and the read, by a run rewriting it
            raise self.changed_while_read(" or ".join(splits)) from None
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()

    def read_records(self, split: str) -> list[TakeRecord]:
        return [
            TakeRecord.from_json(r)
            for shard in sorted(self.committed_shards(split))
            for r in self._marker(split, shard)["records"]
        ]

    def _marker(self, split: str, shard: int) -> dict:
        path = self._marker_path(split, shard)
        try:
            marker = read_json(path)
            problem = None if isinstance(marker, dict) and isinstance(marker.get("records"), list) and isinstance(
                marker.get("failures"), dict) else "not a commit marker's JSON"
        except ValueError as err:  # not JSON (or not UTF-8): overwritten by something else since it was committed
            problem = str(err)
        if problem:
            raise CacheError(f"{path}: the commit marker of shard {shard} of split {split} is unreadable ({problem}); "
                             "rerun the `skillpipe extract` command that wrote it: it extracts that shard again")
        return marker

    def _marker_path(self, split: str, shard: int) -> Path:
        return self.root / "shards" / split / f"{shard:05d}.json"

    def _array_path(self, split: str) -> Path:
        return self.root / STORE_NAME / split / "tokens"


def _flush_up_to(root: Path, *files: Path) -> None:
    """fsync `files` and every folder from theirs up to `root` (zarr may have just created them).

    A missing file is skipped: zarr writes none for a shard that is all fill value."""
    folders = set()
    for file in files:
        if file.is_file():
            fsync_path(file)
        for folder in file.parents:
            folders.add(folder)
            if folder == root:
                break
    for folder in sorted(folders, key=lambda f: -len(f.parts)):  # deepest first: a folder's entry after its contents
        if folder.is_dir():
            fsync_path(folder)


# where the weights came from: another spelling or a moved folder of the same weights (same
# fingerprint.weights_sha256) makes the same features
DESCRIPTIVE_KEYS = frozenset({"fingerprint.backbone"})


def _differences(old: CacheSpec, new: CacheSpec) -> list[str]:
    """Human-readable differences between a cache's spec and the one a run would write."""
    return spec_differences(asdict(old), asdict(new))


# fingerprint keys that caches written before them lack: such a cache is not compared on them (it cannot be)
ADDED_FINGERPRINT_KEYS = ("backbone_architecture",)


def spec_differences(old: dict, new: dict, old_name: str = "cache has", new_name: str = "this run has") -> list[str]:
    """Human-readable differences between two cache specs (or their fingerprints, under `fingerprint.` keys)."""
    unrecorded = [key for key in ADDED_FINGERPRINT_KEYS if key not in old.get("fingerprint", {})]
    if "fingerprint" in new:
        new = {**new, "fingerprint": {k: v for k, v in new["fingerprint"].items() if k not in unrecorded}}
    old_flat, new_flat = _flatten(old), _flatten(new)
    changed = [key for key in sorted(set(old_flat) | set(new_flat))
               if key not in DESCRIPTIVE_KEYS and _normalise(old_flat.get(key)) != _normalise(new_flat.get(key))]
    if "fingerprint.frames" in changed:
        # the geometry's frames repeat the fingerprint's, and the weights hash is taken after the time embeddings
        # are resized to T, so it follows the frame count: listing it would suggest the weights changed
        changed = [key for key in changed if key not in ("frames", "fingerprint.weights_sha256")]
    return [f"{key}: {old_name} {json.dumps(old_flat.get(key))}, {new_name} {json.dumps(new_flat.get(key))}"
            + (" (the weights were not compared: their hash is taken with the time embeddings resized to T)"
               if key == "fingerprint.frames" else "")
            for key in changed]


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalise(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
