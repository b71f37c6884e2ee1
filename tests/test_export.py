import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cache import CacheError, FeatureCache
from pipeline.export import export_hdf5
from stages.cli import app
from tests.test_cache import fill, spec


def test_hdf5_export_round_trips_every_value(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "train", [f"t{i}" for i in range(7)], present=(True, False))  # not symmetric: a view swap would show
    fill(cache, "val", ["v0", "v1"])
    result = CliRunner().invoke(app, ["export", "--cache", str(tmp_path / "cache"), "--format", "hdf5", "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "f.h5", "r") as h5:
        assert list(h5.attrs["views"]) == ["ego", "exo1"] and h5.attrs["frames"] == 4
        for split in ("train", "val"):
            want = cache.read(split)
            group = h5[split]
            assert group["tokens"].chunks == (1, 2, 5, 8) and group["tokens"].dtype == np.float16  # as stored
            assert group["present"][:].tolist() == [list(r.present) for r in want.records]
            np.testing.assert_array_equal(group["tokens"][:], want.tokens)
            np.testing.assert_array_equal(group["present"][:], want.present)
            np.testing.assert_array_equal(group["label"][:], want.labels)
            for name in ("take_uid", "take_name", "scenario"):
                assert [s.decode() for s in group[name][:]] == [getattr(r, name) for r in want.records]
    assert not list(tmp_path.glob(".f.h5.*partial"))


def test_exporting_an_empty_cache_is_an_error(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path, spec())
    with pytest.raises(CacheError, match="no committed takes"):
        export_hdf5(cache, tmp_path / "x.h5")


def test_unknown_format_exits_2(tmp_path):
    FeatureCache.open_or_create(tmp_path, spec())
    result = CliRunner().invoke(app, ["export", "--cache", str(tmp_path), "--format", "parquet", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "parquet" in result.output


def export_cli(tmp_path, *args):
    return CliRunner().invoke(app, ["export", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "f.h5"), *args])


def test_an_unfinished_split_is_refused_and_finished_ones_export_with_split(tmp_path):
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "train", [f"t{i}" for i in range(7)], skip={1})
    fill(cache, "val", ["v0", "v1"])
    result = export_cli(tmp_path)
    assert result.exit_code == 2
    assert "split train is unfinished (2/3 shards committed)" in result.output
    assert "rerun the same `skillpipe extract`" in result.output and "--split (finished: val)" in result.output
    assert not (tmp_path / "f.h5").exists()
    result = export_cli(tmp_path, "--split", "val", "--split", "val")  # named twice: exported once
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "f.h5", "r") as h5:
        assert list(h5) == ["val"] and h5["val/tokens"].shape == (2, 2, 5, 8)


def test_an_unknown_split_exits_2(tmp_path):
    fill(FeatureCache.open_or_create(tmp_path / "cache", spec()), "val", ["v0"])
    result = export_cli(tmp_path, "--split", "val", "--split", "test")
    assert result.exit_code == 2 and "the cache has no split test (it has: val)" in result.output


def test_an_existing_directory_as_out_exits_2(tmp_path):
    fill(FeatureCache.open_or_create(tmp_path / "cache", spec()), "val", ["v0"])
    (tmp_path / "f.h5").mkdir()
    result = export_cli(tmp_path)
    assert result.exit_code == 2 and "is an existing directory" in result.output
    assert not list(tmp_path.glob(".f.h5.*partial"))


@pytest.mark.parametrize("existing", ["the cache's own cache.json", "a new file among the cache's", "another file",
                                      "an earlier export"])
def test_an_existing_out_file_is_replaced_only_if_it_is_an_earlier_export(tmp_path, existing):
    """It replaced any file: the exported cache's cache.json (the cache could not be opened after) or a user's."""
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "train", ["t0", "t1"])
    out = {"the cache's own cache.json": tmp_path / "cache" / "cache.json", "another file": tmp_path / "notes.h5",
           "a new file among the cache's": tmp_path / "cache" / "shards" / "train" / "00009.json",  # read as a marker
           "an earlier export": tmp_path / "f.h5"}[existing]
    if existing == "another file":
        out.write_text("a user's notes")
    elif existing == "an earlier export":
        assert export_cli(tmp_path, "--out", out).exit_code == 0
    before = out.read_bytes() if out.exists() else None
    result = export_cli(tmp_path, "--out", out)
    if existing == "an earlier export":
        assert result.exit_code == 0 and h5py.is_hdf5(out)
    else:
        assert result.exit_code == 2 and str(out) in " ".join(result.output.split())
        assert (out.read_bytes() if out.exists() else None) == before
    FeatureCache.open(tmp_path / "cache").read("train")  # the cache still reads


@pytest.mark.parametrize("failing", ["pipeline.export.os.replace", "pipeline.cache.FeatureCache.read"])
def test_a_failed_export_leaves_no_partial_file(tmp_path, monkeypatch, failing):
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "val", ["v0"])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(failing, fail)
    with pytest.raises(OSError, match="disk full"):
        export_hdf5(cache, tmp_path / "f.h5")
    assert not list(tmp_path.glob("*f.h5*"))


def test_a_killed_exports_partial_file_is_removed_and_a_running_ones_is_kept(tmp_path):
    fill(FeatureCache.open_or_create(tmp_path / "cache", spec()), "val", ["v0"])
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid no longer runs: an export killed on this host
    dead = tmp_path / f".f.h5.{socket.gethostname()}-{finished.pid}.partial"
    running = tmp_path / f".f.h5.{socket.gethostname()}-{os.getppid()}.partial"  # an export still writing
    for leftover in (dead, running):
        leftover.write_bytes(b"partial")
    export_hdf5(FeatureCache.open(tmp_path / "cache"), tmp_path / "f.h5")
    assert not dead.exists() and running.exists() and (tmp_path / "f.h5").is_file()


@pytest.mark.parametrize("reader", ["export", "fit-head"])
def test_a_shard_uncommitted_after_the_finished_check_is_refused_not_read_as_a_smaller_split(tmp_path, monkeypatch,
                                                                                            reader):
    """extract --retry-failed uncommits a shard just after a reader found the split finished: the reader must not go on
    with the takes that are left, as if they were the whole split."""
    from pipeline.head_training import load_complete_split
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec())
    fill(cache, "train", [f"t{i}" for i in range(7)])
    cache.uncommit_shard("train", 1)
    monkeypatch.setattr(FeatureCache, "is_complete", lambda self, split: True)  # it was, at the check
    with pytest.raises(CacheError, match=r"split train is unfinished \(2/3 shards committed\)"):
        if reader == "export":
            export_hdf5(cache, tmp_path / "f.h5")
        else:
            load_complete_split(cache, "train")
    assert not (tmp_path / "f.h5").exists()


def test_the_success_message_names_paths_with_brackets_as_they_are(tmp_path):
    folder = tmp_path / "runs [v2]"
    cache = FeatureCache.open_or_create(folder / "cache[exp1]", spec())
    fill(cache, "val", ["v0"])
    result = CliRunner().invoke(app, ["export", "--cache", str(cache.root), "--out", str(folder / "feat[red].h5")])
    assert result.exit_code == 0, result.output
    said = "".join(result.output.split())  # the console wraps long lines
    assert "".join(f"{cache.root}->{folder / 'feat[red].h5'}".split()) in said
