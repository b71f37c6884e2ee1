"""`extract --reuse OTHER`: features another cache holds are copied, not extracted again."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import extraction
from pipeline.backbone import save_tiny_backbone
from pipeline.cache import CacheError, FeatureCache
from pipeline.config import ConfigError
from pipeline.demo_data import write_demo_dataset
from pipeline.extraction import ExtractConfig, run_extraction
from pipeline.feature_reuse import FeatureDonor
from pipeline.takes import annotation_path, load_takes
from pipeline.video import decode_clip
from stages.cli import app
from tests.interrupts import killed_at_shard_write

FRAMES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egoexo")
    write_demo_dataset(root, takes=10, val_fraction=0.3, seed=3, frames=12)
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny", seed=0)


@pytest.fixture
def config(dataset, backbone_dir, tmp_path):
    return ExtractConfig(root=dataset, cache=tmp_path / "full", backbone=str(backbone_dir), frames=FRAMES,
                         views=("ego", "exo2"), workers=0, shard_size=2)


@pytest.fixture
def decoded(monkeypatch):
    """The video files decoded from now on, in order."""
    files = []

    def recording(path, sampling):
        files.append(Path(path))
        return decode_clip(path, sampling)

    monkeypatch.setattr(extraction, "decode_clip", recording)
    return files


def without_takes(dataset: Path, root: Path, uids: set[str]) -> Path:
    """A copy of the download whose train annotations leave out `uids` (an older or newer release)."""
    shutil.copytree(dataset, root)
    path = annotation_path(root, "train")
    document = json.loads(path.read_text())
    document["annotations"] = [a for a in document["annotations"] if a["take_uid"] not in uids]
    path.write_text(json.dumps(document))
    return root


def rows(cache: Path) -> dict[str, np.ndarray]:
    split = FeatureCache.open(cache).read("train")
    return {record.take_uid: tokens for record, tokens in zip(split.records, split.tokens)}


def test_a_release_with_a_new_take_extracts_only_that_take_and_equals_a_clean_run(config, dataset, tmp_path, decoded):
    takes = load_takes(dataset, "train")
    new = takes[3]  # in the middle: the shards of the new plan hold other takes than the old plan's
    old_root = without_takes(dataset, tmp_path / "old", {new.take_uid})
    run_extraction(dataclasses.replace(config, root=old_root, cache=tmp_path / "old-cache"))
    refused = CliRunner().invoke(app, ["extract", "--root", str(dataset), "--cache", str(tmp_path / "old-cache"),
                                       "--backbone", config.backbone, "--frames", str(FRAMES), "--views", "ego,exo2"])
    assert refused.exit_code == 2 and f"--reuse {tmp_path / 'old-cache'}" in " ".join(refused.output.split())
    decoded.clear()
    started = []
    summary = run_extraction(dataclasses.replace(config, reuse=tmp_path / "old-cache"),
                             on_start=lambda total, done: started.append((total, done)))
    assert decoded == [new.videos["ego"], new.videos["exo2"]]  # no other take is decoded
    assert started == [(len(takes), len(takes) - 1)]  # the progress bar starts past the copied takes
    assert (summary.computed_takes, summary.reused_takes, summary.clips) == (1, len(takes) - 1, 2)
    clean = run_extraction(dataclasses.replace(config, cache=tmp_path / "clean"))
    assert clean.failures == {} and summary.failures == {}
    reused, expected = rows(config.cache), rows(tmp_path / "clean")
    assert list(reused) == list(expected)
    for uid in expected:
        np.testing.assert_array_equal(reused[uid], expected[uid])


def test_fewer_or_other_views_copy_the_views_the_other_cache_holds(config, dataset, tmp_path, decoded):
    run_extraction(config)
    decoded.clear()
    other = dataclasses.replace(config, cache=tmp_path / "other", views=("exo2", "exo1"), reuse=config.cache)
    summary = run_extraction(other)
    takes = load_takes(dataset, "train")
    assert decoded == [take.videos["exo1"] for take in takes]  # exo2 is copied
    assert (summary.computed_takes, summary.reused_takes) == (len(takes), 0)  # each take decoded a view
    full, copied = FeatureCache.open(config.cache).read("train"), FeatureCache.open(other.cache).read("train")
    np.testing.assert_array_equal(copied.tokens[:, 0], full.tokens[:, 1])  # matched by name, not by position
    assert copied.present.all()
    decoded.clear()
    result = CliRunner().invoke(app, ["extract", "--root", str(dataset), "--cache", str(tmp_path / "ego"), "--backbone",
                                      config.backbone, "--frames", str(FRAMES), "--views", "ego", "--workers", "0",
                                      "--reuse", str(config.cache)])  # and another shard size
    assert result.exit_code == 0, result.output
    assert f"computed 0, already cached 0, copied from --reuse {len(takes)};" in " ".join(result.output.split())
    assert decoded == []


def test_views_that_failed_or_came_from_other_files_are_decoded_again(config, dataset, tmp_path, decoded):
    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    takes = load_takes(root, "train")
    good = takes[0].videos["exo2"].read_bytes()
    takes[0].videos["exo2"].write_bytes(b"")
    run_extraction(dataclasses.replace(config, root=root))
    takes[0].videos["exo2"].write_bytes(good)  # fetched again
    path = annotation_path(root, "train")
    document = json.loads(path.read_text())
    by_uid = {record["take_uid"]: record for record in document["annotations"]}
    paths = by_uid[takes[1].take_uid]["video_paths"]
    paths["ego"], paths["exo2"] = paths["exo2"], paths["ego"]  # corrected: the files were swapped
    path.write_text(json.dumps(document))
    decoded.clear()
    summary = run_extraction(dataclasses.replace(config, root=root, cache=tmp_path / "new", reuse=config.cache))
    takes = load_takes(root, "train")
    assert decoded == [takes[0].videos["exo2"], takes[1].videos["ego"], takes[1].videos["exo2"]]
    assert summary.failures == {} and summary.reused_takes == len(takes) - 2
    assert FeatureCache.open(tmp_path / "new").read("train").present.all()


def test_a_cache_made_otherwise_is_refused_before_anything_is_written(config, tmp_path):
    run_extraction(dataclasses.replace(config, frames=2))
    with pytest.raises(CacheError, match=r"(?s)made differently.*fingerprint\.frames: --reuse cache has 2, this run has 4"):
        run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
    assert not (tmp_path / "new").exists()
    with pytest.raises(CacheError, match="--reuse: .* not a skillpipe feature cache"):
        run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=tmp_path))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="reuse must be another cache"):
        dataclasses.replace(config, reuse=config.cache)


def test_damaged_data_in_the_other_cache_is_left_out_and_its_takes_extracted(config, tmp_path, decoded):
    run_extraction(config)
    shard_file = sorted(p for p in (config.cache / "features.zarr" / "train" / "tokens").rglob("*") if p.is_file()
                        and p.name != "zarr.json")[0]  # shard 0: the first two takes
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    decoded.clear()
    with pytest.warns(UserWarning, match=r"the data of shard 0 of split train is damaged \(its checksum fails"):
        summary = run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
    takes = load_takes(config.root, "train")
    assert decoded == [take.videos[view] for take in takes[:2] for view in ("ego", "exo2")]
    assert (summary.computed_takes, summary.reused_takes) == (2, len(takes) - 2)
    run_extraction(dataclasses.replace(config, cache=tmp_path / "clean"))
    np.testing.assert_array_equal(FeatureCache.open(tmp_path / "new").read("train").tokens,
                                  FeatureCache.open(tmp_path / "clean").read("train").tokens)


def test_the_other_cache_rewritten_while_it_is_read_stops_the_run(config, tmp_path):
    """Its rerun extracted a take again from corrected files (same row, all present): copying would take the new
    features under the old index."""
    root = tmp_path / "root"
    shutil.copytree(config.root, root)
    donor_config = dataclasses.replace(config, root=root)
    run_extraction(donor_config)
    takes = load_takes(root, "train")
    donor = FeatureDonor(config.cache, FeatureCache.open(config.cache).spec)
    path = annotation_path(root, "train")
    document = json.loads(path.read_text())
    paths = next(a for a in document["annotations"] if a["take_uid"] == takes[1].take_uid)["video_paths"]
    paths["ego"], paths["exo2"] = paths["exo2"], paths["ego"]
    path.write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="other video files"):
        run_extraction(donor_config)
    with pytest.raises(CacheError, match="changed while this run read it"):
        donor.features(takes[1].take_uid, {"ego"})
    for marker in (config.cache / "shards" / "train").glob("*.json"):
        marker.unlink()  # uncommitted by a run rewriting it
    with pytest.raises(CacheError, match="changed while this run read it"):
        donor.features(takes[4].take_uid, {"ego"})


def test_reuse_is_left_out_of_the_saved_config(config, tmp_path):
    run_extraction(config)
    run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
    saved = json.loads((tmp_path / "new" / "extract-train.json").read_text())
    assert saved["reuse"] is None and saved["cache"] == str((tmp_path / "new").resolve())


def test_torchrun_ranks_copy_and_extract_their_own_shards(config, dataset, tmp_path):
    takes = load_takes(dataset, "train")
    old_root = without_takes(dataset, tmp_path / "old", {takes[2].take_uid})
    run_extraction(dataclasses.replace(config, root=old_root, cache=tmp_path / "old-cache", shard_size=3))
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli", "extract", "--root", str(dataset),
         "--cache", str(config.cache), "--backbone", config.backbone, "--frames", str(FRAMES), "--views", "ego,exo2",
         "--workers", "0", "--shard-size", "1", "--reuse", str(tmp_path / "old-cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    counts = re.findall(r"rank \d/2 train: \d+ takes; computed (\d+), already cached 0, copied from --reuse (\d+)",
                        " ".join(launched.stdout.split()))
    assert len(counts) == 2 and [sum(int(c[i]) for c in counts) for i in (0, 1)] == [1, len(takes) - 1]
    run_extraction(dataclasses.replace(config, cache=tmp_path / "clean"))
    np.testing.assert_array_equal(FeatureCache.open(config.cache).read("train").tokens,
                                  FeatureCache.open(tmp_path / "clean").read("train").tokens)


def test_a_split_of_the_other_cache_whose_array_was_deleted_is_left_out_with_one_warning(config, tmp_path, decoded):
    run_extraction(config)
    run_extraction(dataclasses.replace(config, split="val"))
    shutil.rmtree(config.cache / "features.zarr" / "val")
    decoded.clear()
    with pytest.warns(UserWarning, match=r"the data of \d+ shards of split val is damaged \(shard 0: the split's array "
                                         r".* is missing\)") as warned:
        summary = run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
    assert len([w for w in warned if "--reuse" in str(w.message)]) == 1
    assert decoded == [] and summary.reused_takes == len(load_takes(config.root, "train"))  # train copied as ever


def test_damage_after_the_index_stops_the_copy_naming_the_file(config, tmp_path):
    run_extraction(config)
    donor = FeatureDonor(config.cache, FeatureCache.open(config.cache).spec)
    shard_file = sorted(p for p in (config.cache / "features.zarr" / "train" / "tokens").rglob("*") if p.is_file()
                        and p.name != "zarr.json")[0]
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"--reuse: {shard_file}: the data of committed shard 0 .* is damaged"):
        donor.features(load_takes(config.root, "train")[0].take_uid, {"ego"})


def test_a_marker_gone_while_the_other_cache_is_indexed_stops_the_run(config, tmp_path, monkeypatch):
    run_extraction(config)
    shard_marker = FeatureCache.shard_marker

    def uncommitted_meanwhile(self, split, shard):
        if shard == 1:
            raise FileNotFoundError(shard)
        return shard_marker(self, split, shard)

    monkeypatch.setattr(FeatureCache, "shard_marker", uncommitted_meanwhile)
    with pytest.raises(CacheError, match="changed while this run read it"):
        FeatureDonor(config.cache, FeatureCache.open(config.cache).spec)


def test_an_other_cache_from_before_video_files_were_recorded_gives_nothing_to_copy(config, tmp_path, decoded):
    run_extraction(config)
    for path in (config.cache / "shards" / "train").glob("*.json"):
        marker = json.loads(path.read_text())
        del marker["videos"]
        path.write_text(json.dumps(marker))
    decoded.clear()
    summary = run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
    takes = load_takes(config.root, "train")
    assert summary.reused_takes == 0 and len(decoded) == 2 * len(takes)


def test_a_rerun_with_reuse_goes_on_from_the_shards_committed_and_reports_its_progress(config, dataset, tmp_path,
                                                                                       decoded):
    run_extraction(dataclasses.replace(config, views=("ego",)))  # the other cache: ego only
    new = dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache)
    with killed_at_shard_write(2):
        run_extraction(new)
    takes = load_takes(dataset, "train")
    decoded.clear()
    started = []
    summary = run_extraction(new, on_start=lambda total, done: started.append((total, done)))
    assert decoded == [take.videos["exo2"] for take in takes[2:]]  # shard 0 (2 takes) was committed: not again
    assert (summary.skipped_takes, summary.reused_takes, summary.computed_takes) == (2, 0, len(takes) - 2)
    assert started == [(len(takes), 2)]
    retried = run_extraction(dataclasses.replace(new, reuse=None, retry_failed=True),
                             on_start=lambda total, done: started.append((total, done)))
    assert (retried.skipped_takes, retried.reused_takes, started[-1]) == (len(takes), 0, (len(takes), len(takes)))
