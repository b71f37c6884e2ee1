import json
from dataclasses import asdict

import numpy as np
import pytest
import zarr

from pipeline import cache as cache_module
from pipeline.cache import STORE_NAME, CacheError, CacheSpec, FeatureCache, TakeRecord

VIEWS = ("ego", "exo1")


def spec(**fingerprint) -> CacheSpec:
    return CacheSpec(
        fingerprint={"backbone": "tiny", "frames": 4, **fingerprint}, views=VIEWS, frames=4,
        num_patches=196, hidden_size=8, shard_size=3,
    )


def records(uids, present=(True, True)):
    return [TakeRecord(u, f"name_{u}", "train", i % 4, "Dance", present) for i, u in enumerate(uids)]


def fill(cache, split, uids, skip=(), present=(True, True)):
    rng = np.random.default_rng(0)
    written = {}
    for shard, shard_uids in enumerate(cache.plan_split(split, uids)):
        tokens = rng.standard_normal((len(shard_uids), 2, 5, 8)).astype(np.float16)
        if shard not in skip:
            cache.write_shard(split, shard, tokens, records(shard_uids, present), {})
            written.update(zip(shard_uids, tokens))
    return written


def test_round_trip_of_committed_shards_in_row_order(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    uids = [f"t{i}" for i in range(7)]  # shards of 3, 3, 1: the last one is partial
    written = fill(cache, "train", uids)
    loaded = FeatureCache.open(tmp_path).read("train")
    assert [r.take_uid for r in loaded.records] == uids
    assert loaded.tokens.dtype == np.float16 and loaded.tokens.shape == (7, 2, 5, 8)
    np.testing.assert_array_equal(loaded.tokens, np.stack([written[u] for u in uids]))
    assert loaded.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert FeatureCache.open(tmp_path).is_complete("train")
    stored = zarr.open_array(store=tmp_path / STORE_NAME, path="train/tokens")
    assert stored.chunks == (1, 2, 5, 8) and stored.dtype == np.float16  # one take per chunk, half the bytes of float32


def test_a_cache_with_the_earlier_one_chunk_per_view_layout_still_reads_and_resumes(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    uids = [f"t{i}" for i in range(7)]
    cache.plan_split("train", uids)
    zarr.create_array(store=tmp_path / STORE_NAME, name="train/tokens", shape=(7, 2, 5, 8), chunks=(1, 1, 5, 8),
                      shards=(3, 2, 5, 8), dtype="float16", fill_value=0, compressors=None, overwrite=True)
    written = fill(FeatureCache.open(tmp_path), "train", uids)  # plan_split keeps the existing array
    loaded = FeatureCache.open(tmp_path).read("train")
    assert zarr.open_array(store=tmp_path / STORE_NAME, path="train/tokens").chunks == (1, 1, 5, 8)
    np.testing.assert_array_equal(loaded.tokens, np.stack([written[u] for u in uids]))


def test_uncommitted_shards_are_invisible(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    written = fill(cache, "train", [f"t{i}" for i in range(7)], skip={1})
    loaded = cache.read("train")
    assert [r.take_uid for r in loaded.records] == ["t0", "t1", "t2", "t6"]
    np.testing.assert_array_equal(loaded.tokens[3], written["t6"])
    assert cache.committed_shards("train") == {0, 2} and not cache.is_complete("train")


def test_a_complete_read_refuses_a_split_with_a_shard_not_committed(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", [f"t{i}" for i in range(7)], skip=(1,))
    assert len(cache.read("train").records) == 4
    with pytest.raises(CacheError, match=r"split train is unfinished \(2/3 shards committed\)"):
        cache.read("train", complete=True)


@pytest.mark.parametrize("rewrite", ["uncommitted", "rewritten", "marker gone before its read", "data deleted"])
def test_a_read_that_overlaps_a_rewrite_of_a_committed_shard_raises_rather_than_mixing(tmp_path, monkeypatch, rewrite):
    """extract --retry-failed uncommits a shard, deletes and rewrites its data, then commits it anew: a reader that
    read the old markers must not pair them with the new (or zero) data."""
    cache = FeatureCache.open_or_create(tmp_path, spec())
    uids = [f"t{i}" for i in range(6)]
    fill(cache, "train", uids)
    read_marker = FeatureCache._marker

    def rewrite_while_reading(self, split, shard):
        if rewrite == "marker gone before its read" and shard == 1:
            cache.uncommit_shard(split, 1)
        marker = read_marker(self, split, shard)
        if shard == 1 and rewrite != "marker gone before its read":  # the old markers are read; now the retry runs
            cache.uncommit_shard(split, 1)
            if rewrite == "rewritten":
                cache.write_shard(split, 1, np.ones((3, 2, 5, 8), np.float16), records(uids[3:]), {})
            if rewrite == "data deleted":  # as write_shard does first: not damage, though its size check fails
                _shard_file(tmp_path, split, 1).unlink(missing_ok=True)
        return marker

    monkeypatch.setattr(FeatureCache, "_marker", rewrite_while_reading)
    with pytest.raises(CacheError, match="split train changed while it was read.*read it again"):
        FeatureCache.open(tmp_path).read("train")
    if rewrite != "uncommitted":  # the rewrite again, now under a damage check (status --check, --reuse's index)
        fill(cache, "train", uids)
        assert FeatureCache.open(tmp_path).damaged_shards("train") == {}  # neither damaged nor a FileNotFoundError


def test_a_different_fingerprint_is_refused_with_the_differences_named(tmp_path):
    FeatureCache.open_or_create(tmp_path, spec())
    with pytest.raises(CacheError) as info:
        FeatureCache.open_or_create(tmp_path, spec(frames=8, adapter_sha256="abc"))
    message = str(info.value)
    assert "refusing to mix" in message
    assert "fingerprint.frames: cache has 4, this run has 8" in message
    assert "fingerprint.adapter_sha256" in message
    FeatureCache.open_or_create(tmp_path, spec())  # the same fingerprint opens fine
    # the same weights named another way (a relative path, a moved folder): the same features
    FeatureCache.open_or_create(tmp_path, spec(backbone="/elsewhere/tiny"))


def test_a_changed_take_list_is_refused(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    cache.plan_split("train", ["a", "b"])
    with pytest.raises(CacheError, match="different set of takes"):
        cache.plan_split("train", ["a", "b", "c"])


def test_opening_a_folder_that_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not a skillpipe feature cache"):
        FeatureCache.open(tmp_path)


def test_wrong_shard_shape_is_rejected(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    cache.plan_split("train", ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="shard 1 of train"):
        cache.write_shard("train", 1, np.zeros((3, 2, 5, 8)), records(["d", "e", "f"]), {})
    assert cache.committed_shards("train") == set()


def test_failures_summary_collects_every_split(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    for split in ("train", "val"):
        cache.plan_split(split, [f"{split}0"])
        cache.write_shard(split, 0, np.zeros((1, 2, 5, 8)), records([f"{split}0"], (True, False)), {f"{split}0": {"exo1": "x"}})
    assert cache.write_failures_summary() == {"train0": {"exo1": "x"}, "val0": {"exo1": "x"}}
    assert cache.read("val").present.tolist() == [[True, False]]


def test_two_runs_ending_together_leave_a_failures_summary_with_both_splits(tmp_path, monkeypatch):
    """Run A (train) reads the markers; run B (val) commits a failure and rebuilds the summary; A writes last. A's
    stale read must not win: B waits for A's write, then reads everything."""
    import threading
    import time

    cache = FeatureCache.open_or_create(tmp_path, spec())
    for split in ("train", "val"):
        cache.plan_split(split, [f"{split}0"])
    cache.write_shard("train", 0, np.zeros((1, 2, 5, 8)), records(["train0"], (True, False)), {"train0": {"exo1": "x"}})
    read = FeatureCache.read_failures
    runs = []

    def read_then_the_other_run_ends(self):
        seen = read(self)
        if not runs:  # run A, between its read and its write
            cache.write_shard("val", 0, np.zeros((1, 2, 5, 8)), records(["val0"], (True, False)), {"val0": {"exo1": "y"}})
            runs.append(threading.Thread(target=FeatureCache.open(tmp_path).write_failures_summary))
            runs[0].start()
            time.sleep(0.5)  # B runs now, unless it waits for A
        return seen

    monkeypatch.setattr(FeatureCache, "read_failures", read_then_the_other_run_ends)
    cache.write_failures_summary()
    runs[0].join()
    assert json.loads((tmp_path / "failures.json").read_text()) == {"train0": {"exo1": "x"}, "val0": {"exo1": "y"}}


def test_a_torn_uncommitted_shard_is_rewritten(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    written = fill(cache, "train", [f"t{i}" for i in range(7)])
    shard_file = tmp_path / STORE_NAME / "train" / "tokens" / "c" / "1" / "0" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[: shard_file.stat().st_size // 2])  # a crash mid-write
    (tmp_path / "shards" / "train" / "00001.json").unlink()
    tokens = np.stack([written[u] for u in ("t3", "t4", "t5")])
    cache.write_shard("train", 1, tokens, records(["t3", "t4", "t5"]), {})
    np.testing.assert_array_equal(cache.read("train").tokens[3:6], tokens)


def test_present_of_a_split_without_committed_takes_has_one_column_per_view(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    cache.plan_split("train", ["a", "b"])
    assert cache.read("train").present.shape == (0, 2)


def test_a_planned_split_whose_array_is_missing_is_refused_not_recreated(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", [f"t{i}" for i in range(7)])
    metadata = tmp_path / STORE_NAME / "train" / "tokens" / "zarr.json"
    metadata.rename(tmp_path / "hidden.json")  # what a rank behind a stale shared-filesystem cache sees
    with pytest.raises(CacheError, match="array for split 'train' is missing"):
        cache.plan_split("train", [f"t{i}" for i in range(7)])
    assert (tmp_path / STORE_NAME / "train" / "tokens" / "c" / "0" / "0" / "0" / "0").is_file()  # shards kept


def test_a_split_whose_plan_is_not_visible_is_refused_not_recreated(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    uids = [f"t{i}" for i in range(7)]
    written = fill(cache, "train", uids)
    plan = tmp_path / "splits" / "train.json"
    plan.rename(tmp_path / "hidden.json")  # a rank behind a stale shared-filesystem cache, or a lost plan
    with pytest.raises(CacheError, match="has no plan .* visible to this process"):
        cache.plan_split("train", uids, create=False)
    with pytest.raises(CacheError, match="has committed shards but no plan"):
        cache.plan_split("train", uids)
    (tmp_path / "hidden.json").rename(plan)
    read = cache.read("train")
    np.testing.assert_array_equal(read.tokens, np.stack([written[u] for u in uids]))  # nothing was wiped


def test_two_runs_creating_one_cache_at_once_keep_the_first_spec_and_the_second_is_refused(tmp_path, monkeypatch):
    """Extract runs of two splits may both find no cache.json; the second must not overwrite the first's."""
    first, second = spec(weights_sha256="a"), spec(weights_sha256="b")
    real_write = cache_module.write_json_atomic

    def the_other_run_wins_the_race(path, obj, create_only=False):
        real_write(path, asdict(first), create_only=True)  # between this run's check and its write
        real_write(path, obj, create_only)

    monkeypatch.setattr(cache_module, "write_json_atomic", the_other_run_wins_the_race)
    with pytest.raises(CacheError, match="built differently"):
        FeatureCache.open_or_create(tmp_path, second)
    monkeypatch.undo()
    assert FeatureCache.open(tmp_path).spec == first
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left


def _shard_file(root, split, shard):
    return root / STORE_NAME / split / "tokens" / "c" / str(shard) / "0" / "0" / "0"


DAMAGES = {
    "deleted": (lambda file: file.unlink(), "it is missing where"),
    "emptied": (lambda file: file.write_bytes(b""), "it has 0 bytes where"),  # zarr alone would read zeros
    "bit flipped": (lambda file: file.write_bytes(bytes([file.read_bytes()[0] ^ 1]) + file.read_bytes()[1:]),
                    "its checksum fails"),  # same size: zarr alone would read the wrong value
    "cut short": (lambda file: file.write_bytes(file.read_bytes()[:-5]), "bytes where"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_committed_data_is_refused_naming_the_file_and_its_takes_never_read(tmp_path, damage):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", [f"t{i}" for i in range(7)])
    harm, problem = DAMAGES[damage]
    harm(_shard_file(tmp_path, "train", 1))
    with pytest.raises(CacheError) as raised:
        FeatureCache.open(tmp_path).read("train")
    message = str(raised.value)
    assert str(_shard_file(tmp_path, "train", 1)) in message and "takes t3 .. t5" in message and problem in message
    assert "Rerun the `skillpipe extract` command" in message
    assert list(FeatureCache.open(tmp_path).damaged_shards("train")) == [1]


def test_a_shard_whose_takes_all_failed_has_no_file_and_is_not_damaged(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    cache.plan_split("train", ["t0", "t1"])
    cache.write_shard("train", 0, np.zeros((2, 2, 5, 8), np.float16), records(["t0", "t1"], (False, False)), {})
    assert not _shard_file(tmp_path, "train", 0).exists()  # zarr writes no file for fill values only
    assert cache.damaged_shards("train") == {} and not cache.read("train").tokens.any()


def test_a_marker_from_before_sizes_were_recorded_is_read_without_the_size_check(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    written = fill(cache, "train", ["t0", "t1"])
    marker = tmp_path / "shards" / "train" / "00000.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "data_bytes"}))
    np.testing.assert_array_equal(cache.read("train").tokens, np.stack([written["t0"], written["t1"]]))
    assert cache.damaged_shards("train") == {}


def test_new_records_for_a_committed_shard_must_name_its_own_takes(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", ["a", "b", "c"])
    marker = (tmp_path / "shards" / "train" / "00000.json").read_bytes()
    with pytest.raises(ValueError, match="records of other takes"):
        cache.update_records("train", 0, records(["a", "c", "b"]))  # the same takes in another order: other rows
    assert (tmp_path / "shards" / "train" / "00000.json").read_bytes() == marker
    relabelled = [TakeRecord(r.take_uid, r.take_name, r.split, 3, r.scenario, r.present) for r in records(["a", "b", "c"])]
    cache.update_records("train", 0, relabelled)
    assert [r.label for r in cache.read("train").records] == [3, 3, 3]


@pytest.mark.parametrize("content", [b"\x89HDF\r\n", b"{}", b"[]", b"null"])
def test_a_commit_marker_overwritten_by_another_file_is_named_as_unreadable(tmp_path, content):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    fill(cache, "train", ["a", "b", "c", "d"])
    (tmp_path / "shards" / "train" / "00000.json").write_bytes(content)
    with pytest.raises(CacheError, match="00000.json: the commit marker of shard 0 of split train is unreadable"):
        cache.read("train")
    assert cache.damaged_shards("train") == {0: "its commit marker is unreadable"}
    fill(cache, "val", ["v0"])  # a run ending on another split still writes the summary, and says what it left out
    with pytest.warns(UserWarning, match="00000.json: the commit marker .* is unreadable .*left out of"):
        cache.write_failures_summary()


def test_read_committed_shard_returns_its_data_and_marker_or_names_the_damage(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    uids = [f"t{i}" for i in range(6)]
    written = fill(cache, "train", uids)
    data, marker = cache.read_committed_shard("train", 1)
    np.testing.assert_array_equal(data, np.stack([written[u] for u in uids[3:]]))
    assert [r["take_uid"] for r in marker["records"]] == uids[3:]
    file = _shard_file(tmp_path, "train", 1)
    damaged = bytearray(file.read_bytes())
    damaged[40] ^= 0xFF
    file.write_bytes(bytes(damaged))
    with pytest.raises(CacheError, match=r"committed shard 1 of split train \(takes t3 .. t5\) is damaged: its checksum"):
        cache.read_committed_shard("train", 1)
