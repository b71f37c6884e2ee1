"""Durability of committed files: data reaches the disk before the name that commits it, and the
folder's entry after the rename (a power loss must not leave a committed name over empty data)."""

import os
from pathlib import Path

import pytest

from pipeline.cache import FeatureCache
from pipeline.export import export_hdf5
from pipeline.files import write_bytes_atomic, write_folder_atomic
from tests.test_cache import fill, spec


@pytest.fixture
def disk_events(monkeypatch):
    """Every fsync (with the path of its descriptor), replace and rename, in order."""
    events = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def record_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def record_move(kind, move):
        def moved(src, dst, *args, **kwargs):
            events.append((kind, Path(src).resolve(), Path(dst).resolve()))
            return move(src, dst, *args, **kwargs)
        return moved

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_move("replace", replace))
    monkeypatch.setattr(os, "rename", record_move("rename", rename))
    return events


def position(events, event) -> int:
    assert event in events, f"{event} not in {events}"
    return events.index(event)


def assert_committed_durably(events, target: Path) -> None:
    """`target` was renamed into place from a file fsynced before, and its folder fsynced after."""
    target = target.resolve()
    moves = [e for e in events if e[0] in ("replace", "rename") and e[2] == target]
    assert len(moves) == 1, events
    source, moved = moves[0][1], events.index(moves[0])
    assert position(events, ("fsync", source)) < moved
    assert position(events[moved:], ("fsync", target.parent)) >= 0


def test_an_atomic_write_is_durable_with_the_folders_it_creates(tmp_path, disk_events):
    write_bytes_atomic(tmp_path / "a" / "b" / "result.json", b"{}")
    assert_committed_durably(disk_events, tmp_path / "a" / "b" / "result.json")
    for parent in (tmp_path, tmp_path / "a"):  # the new folders' own entries
        assert ("fsync", parent.resolve()) in disk_events


def test_a_folder_written_in_place_by_a_library_is_flushed_whole_before_its_rename(tmp_path, disk_events):
    def write(folder: Path):  # like save_pretrained: plain writes, no fsync
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "sub" / "weights.bin").write_bytes(b"\0" * 10)

    write_folder_atomic(tmp_path / "adapter", write)
    staging = (tmp_path / "adapter.staging").resolve()
    rename = position(disk_events, ("rename", staging, (tmp_path / "adapter").resolve()))
    for written in ("config.json", "sub/weights.bin", "sub", "."):
        assert position(disk_events, ("fsync", (staging / written).resolve())) < rename
    assert position(disk_events[rename:], ("fsync", tmp_path.resolve())) >= 0


def test_an_export_is_durable(tmp_path, disk_events):
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "train", ["t0", "t1"])
    export_hdf5(cache, tmp_path / "out" / "f.h5")
    assert_committed_durably(disk_events, tmp_path / "out" / "f.h5")


def test_a_shards_data_and_new_folders_reach_the_disk_before_its_marker(tmp_path, disk_events):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", ["t0", "t1", "t2", "t3"])  # shards of 3 and 1
    marker = tmp_path / "shards" / "train" / "00001.json"
    assert_committed_durably(disk_events, marker)
    commit = [i for i, e in enumerate(disk_events) if e[0] == "replace" and e[2] == marker.resolve()][0]
    shard_files = [p for p in (tmp_path / "features.zarr").rglob("*") if p.is_file() and "train" in p.parts and "c" in p.parts]
    assert len(shard_files) == 2
    newest = max(shard_files, key=lambda p: p.parts)
    fsynced_before = {e[1] for e in disk_events[:commit] if e[0] == "fsync"}
    assert newest.resolve() in fsynced_before
    for folder in newest.parents:  # every folder zarr may have created for it, up to the cache root
        assert folder.resolve() in fsynced_before
        if folder == tmp_path:
            break


def test_a_new_splits_array_metadata_reaches_the_disk_before_its_plan(tmp_path, disk_events):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    cache.plan_split("train", ["t0", "t1"])
    plan = position(disk_events, ("replace", *[e[1:] for e in disk_events if e[0] == "replace" and e[2].name == "train.json"][0]))
    store = (tmp_path / "features.zarr").resolve()
    fsynced_before = {e[1] for e in disk_events[:plan] if e[0] == "fsync"}
    for path in ("zarr.json", "train/zarr.json", "train/tokens/zarr.json", "train/tokens", "train", "."):
        assert (store / path).resolve() in fsynced_before, path


def test_a_folder_replaced_by_a_run_killed_between_its_renames_is_kept_as_old(tmp_path, monkeypatch):
    from pipeline.files import replace_folder

    for name, text in (("target", "old"), ("finished", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(text)
    rename = Path.rename

    def killed_at_the_second_rename(self, target):
        if self.name == "finished":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(tmp_path / "finished", tmp_path / "target")
    assert (tmp_path / "target.old" / "file").read_text() == "old"  # the old folder, whole, beside the new one
    assert (tmp_path / "finished" / "file").read_text() == "new"
    monkeypatch.undo()
    replace_folder(tmp_path / "finished", tmp_path / "target")
    assert (tmp_path / "target" / "file").read_text() == "new" and not (tmp_path / "target.old").exists()


def test_a_folder_written_atomically_holds_only_what_this_write_put_there(tmp_path):
    target = tmp_path / "adapter"
    (tmp_path / "adapter.staging").mkdir()
    (tmp_path / "adapter.staging" / "stale.bin").write_bytes(b"from a run killed mid-save")

    def write(folder):  # as save_pretrained: into the folder, made if missing
        folder.mkdir(exist_ok=True)
        (folder / "a.json").write_text("{}")

    write_folder_atomic(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["a.json"] and not (tmp_path / "adapter.staging").exists()
