"""`extract --reuse OTHER`: features another cache holds are copied, not extracted again."""

import dataclasses
import json
import shutil
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
from pipeline.takes import annotation_path, load_takes
from pipeline.video import decode_clip
from stages.cli import app

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
    summary = run_extraction(dataclasses.replace(config, reuse=tmp_path / "old-cache"))
    assert decoded == [new.videos["ego"], new.videos["exo2"]]  # no other take is decoded
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
    other = dataclasses.replace(config, cache=tmp_path / "other", views=("exo1", "exo2"), reuse=config.cache)
    summary = run_extraction(other)
    takes = load_takes(dataset, "train")
    assert decoded == [take.videos["exo1"] for take in takes]  # exo2 is copied
    assert (summary.computed_takes, summary.reused_takes) == (len(takes), 0)  # each take decoded a view
    full, copied = FeatureCache.open(config.cache).read("train"), FeatureCache.open(other.cache).read("train")
    np.testing.assert_array_equal(copied.tokens[:, 1], full.tokens[:, 1])
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
    with pytest.raises(CacheError, match="not a skillpipe feature cache"):
        run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=tmp_path))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="reuse must be another cache"):
        dataclasses.replace(config, reuse=config.cache)


def test_damaged_data_in_the_other_cache_is_refused_naming_it(config, tmp_path):
    run_extraction(config)
    shard_file = sorted(p for p in (config.cache / "features.zarr" / "train" / "tokens").rglob("*") if p.is_file()
                        and p.name != "zarr.json")[0]
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"data of committed shard \d+ of split train .* is damaged"):
        run_extraction(dataclasses.replace(config, cache=tmp_path / "new", reuse=config.cache))
