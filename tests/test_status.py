"""`skillpipe status`: a cache's progress, failures, writer and damage, read without writing."""

import dataclasses
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from pipeline import writer_lock
from pipeline.backbone import save_tiny_backbone
from pipeline.cache import CacheError, FeatureCache
from pipeline.demo_data import write_demo_dataset
from pipeline.extraction import ExtractConfig, run_extraction
from pipeline.takes import load_takes
from stages.cli import app
from tests.interrupts import killed_at_shard_write


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """train complete with a failed view in each of its first two takes (shard 0), val with one of its two shards
    committed."""
    folder = tmp_path_factory.mktemp("status")
    root = folder / "data"
    write_demo_dataset(root, takes=10, val_fraction=0.3, seed=5, frames=12)
    for take in load_takes(root, "train")[:2]:
        take.videos["exo2"].write_bytes(b"")
    config = ExtractConfig(root=root, cache=folder / "cache", backbone=str(save_tiny_backbone(folder / "tiny", seed=0)),
                           frames=4, views=("ego", "exo2"), workers=0, shard_size=2)
    run_extraction(config)
    with killed_at_shard_write(2):
        run_extraction(dataclasses.replace(config, split="val"))
    return folder / "cache", len(load_takes(root, "train")), len(load_takes(root, "val"))


def status(*args):
    return CliRunner().invoke(app, ["status", *map(str, args)], catch_exceptions=False)


def test_status_reports_each_splits_progress_failures_and_how_the_features_were_made(cache):
    cache, num_train, num_val = cache
    result = status("--cache", cache, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    train, val = report["splits"]
    shards = -(-num_train // 2)
    assert (train["split"], train["committed_takes"], train["planned_takes"], train["complete"]) == (
        "train", num_train, num_train, True)
    assert (train["committed_shards"], train["planned_shards"], train["takes_with_failed_views"]) == (shards, shards, 2)
    assert (val["committed_takes"], val["planned_takes"], val["committed_shards"], val["complete"]) == (2, num_val, 1, False)
    assert train["writer"] is None and train["damaged"] is None
    assert report["made_with"]["frames"] == 4 and report["made_with"]["views"] == ["ego", "exo2"]
    shown = " ".join(status("--cache", cache).output.split())
    assert "complete" in shown and "unfinished" in shown and "no run" in shown and "--retry-failed" in shown


def test_status_names_the_run_writing_a_split_and_leaves_its_lock_held(cache):
    cache = cache[0]
    lock = writer_lock.split_lock_path(cache, "val")
    with writer_lock.first_writer(lock, "split 'val'"):
        report = json.loads(status("--cache", cache, "--json").output)
        assert f"pid {os.getpid()}" in report["splits"][1]["writer"] and report["splits"][0]["writer"] is None
        with pytest.raises(CacheError, match="is being written by another run"):  # still held after the probe
            with writer_lock.first_writer(lock, "split 'val'"):
                pass
    assert json.loads(status("--cache", cache, "--json").output)["splits"][1]["writer"] is None


def test_status_check_names_damaged_shards(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache[0], copy)
    intact = status("--cache", copy, "--json", "--check")
    assert intact.exit_code == 0 and json.loads(intact.output)["splits"][0]["damaged"] == {}
    marker = copy / "shards" / "train" / "00001.json"
    marker.write_text("{")
    shard_file = copy / "features.zarr" / "train" / "tokens" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    checked = status("--cache", copy, "--json", "--check")
    assert checked.exit_code == 3  # for scripts: it exited 0 whatever it found
    report = json.loads(checked.output)
    damaged = report["splits"][0]["damaged"]
    assert set(damaged) == {"1", "2"} and "unreadable" in damaged["1"] and "checksum" in damaged["2"]
    train = report["splits"][0]
    assert train["unreadable_markers"] == [1] and not train["complete"]
    assert train["committed_shards"] == train["planned_shards"] - 1 and train["committed_takes"] == train["planned_takes"] - 2
    table = status("--cache", copy, "--check")
    shown = " ".join(table.output.split())
    assert table.exit_code == 3 and "train shard 2: its checksum fails" in shown and "train shard 1: its commit marker is unreadable" in shown
    unchecked_run = status("--cache", copy)
    unchecked = " ".join(unchecked_run.output.split())
    assert "train shard 1: its commit marker is unreadable" in unchecked and "Rerun the `skillpipe extract`" in unchecked
    assert unchecked_run.exit_code == 3  # an unreadable marker alone, without --check
    (copy / "shards" / "train" / "00001.json").write_bytes((cache[0] / "shards" / "train" / "00001.json").read_bytes())
    checked_damage = status("--cache", copy, "--check")  # a damaged shard alone
    assert checked_damage.exit_code == 3 and "train shard 2: its checksum fails" in " ".join(checked_damage.output.split())
    assert status("--cache", copy).exit_code == 0  # unchecked: its data is not read


def test_status_of_a_folder_that_is_not_a_cache_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["status", "--cache", str(tmp_path)])
    assert result.exit_code == 2 and "not a skillpipe feature cache" in result.output


def test_a_marker_gone_while_status_reads_is_left_out_of_every_count(cache, monkeypatch):
    cache, num_train, _ = cache
    shard_marker = FeatureCache.shard_marker

    def uncommitted_meanwhile(self, split, shard):  # a retry uncommits shard 0 between the listing and the read
        if (split, shard) == ("train", 0):
            raise FileNotFoundError(shard)
        return shard_marker(self, split, shard)

    monkeypatch.setattr(FeatureCache, "shard_marker", uncommitted_meanwhile)
    train = json.loads(status("--cache", cache, "--json").output)["splits"][0]
    assert (train["committed_shards"], train["committed_takes"]) == (-(-num_train // 2) - 1, num_train - 2)
    assert train["takes_with_failed_views"] == 0 and not train["complete"]


@pytest.mark.parametrize("text, said", [
    ('{"videos": [], "ego_model_predictions": []}', 'not a skillpipe cache description (no "format")'),
    ("{", "not JSON"),
    ("[1, 2]", 'not a skillpipe cache description (no "format")'),
    ('{"format": 1, "views": ["ego"]}', "not a complete skillpipe cache description"),
])
def test_a_cache_json_replaced_by_another_file_is_a_clear_error(cache, tmp_path, text, said):
    """It read "cache format None is not supported", or raised a traceback for one that was not a JSON object."""
    copy = tmp_path / "cache"
    shutil.copytree(cache[0], copy)
    (copy / "cache.json").write_text(text)
    result = CliRunner().invoke(app, ["status", "--cache", str(copy)])
    assert result.exit_code == 2 and said in " ".join(result.output.split()) and "cache.json" in result.output, result.output


def test_status_says_which_split_fit_head_needs_is_missing_and_how_to_extract_it(cache, tmp_path):
    cache, _, _ = cache
    copy = shutil.copytree(cache, tmp_path / "train-only")
    (copy / "splits" / "val.json").unlink()  # as before `extract --split val` ran
    shown = " ".join(status("--cache", copy).output.split())
    command = f"skillpipe extract --config {copy / 'extract-train.json'} --cache {copy} --split val"
    assert f"no val split yet: fit-head needs one; `{command}`" in shown
    assert "split yet" not in " ".join(status("--cache", cache).output.split())  # both planned: nothing to say
