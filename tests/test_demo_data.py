"""The demo dataset: egoexo layout and annotation schema, decodable videos, cues split across views."""

import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
from decord._ffi.base import DECORDError
from typer.testing import CliRunner

from pipeline.demo_data import render_scene, write_demo_dataset, write_video
from pipeline.takes import LABEL_NAMES, SCENARIOS, VIEWS, load_takes, resolve_view_files
from stages.cli import app
from tests import videos

FRAMES = 6
RECORD_FIELDS = {
    "task_id", "task_name", "scenario_name", "university_id", "origin_participant_id", "take_uid", "video_paths",
    "proficiency_score",
}
EGO_NAMES = {"aria01_214-1.mp4", "aria02_214-1.mp4", "aria04_214-1.mp4", "aria_214-1.mp4", "aria1_214-1.mp4"}
CAM_NAMES = {f"cam0{i}.mp4" for i in range(1, 5)}
GOPRO_NAMES = {f"gp0{i}.mp4" for i in range(1, 5)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egoexo")
    write_demo_dataset(root, takes=8, seed=3, frames=FRAMES)
    return root


def annotations(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"proficiency_demonstrator_{split}.json").read_text())


def records(root: Path) -> list[dict]:
    return annotations(root, "train")["annotations"] + annotations(root, "val")["annotations"]


def test_annotation_files_follow_the_egoexo_schema(dataset):
    for split in ("train", "val"):
        document = annotations(dataset, split)
        assert set(document) == {"ds", "annotations"} and document["annotations"]
    all_records = records(dataset)
    for record in all_records:
        assert set(record) == RECORD_FIELDS
        assert isinstance(record["task_id"], int) and record["scenario_name"] in SCENARIOS
        assert record["proficiency_score"] in LABEL_NAMES
        assert str(uuid.UUID(record["take_uid"])) == record["take_uid"]
        assert list(record["video_paths"]) == list(VIEWS)
        take_names = set()
        for path in record["video_paths"].values():
            match = re.fullmatch(r"takes/([a-z]+_[a-z]+_\d{3}_\d)/frame_aligned_videos/([a-z0-9_-]+\.mp4)", path)
            assert match, path
            take_names.add(match.group(1))
        assert len(take_names) == 1
    assert len({r["take_uid"] for r in all_records}) == len(all_records) == 8
    # the project's own loader accepts every record
    assert sum(len(load_takes(dataset, split)) for split in ("train", "val")) == 8


def test_every_view_is_a_file_under_downscaled_448_and_nothing_else(dataset):
    for record in records(dataset):
        take_dir = dataset / Path(record["video_paths"]["ego"]).parent
        folder = take_dir / "downscaled" / "448"
        names = [Path(p).name for p in record["video_paths"].values()]
        assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temp files left over
        assert [p.name for p in take_dir.iterdir()] == ["downscaled"]  # not at the annotation path
        # camera names map back to the annotated views
        assert {v: p.name for v, p in resolve_view_files(take_dir.parent).items()} == dict(zip(VIEWS, names))


def test_decord_reads_every_video_with_the_frame_count_and_448_short_side(dataset):
    for take in load_takes(dataset, "train") + load_takes(dataset, "val"):
        for view, path in take.videos.items():
            reader = decord.VideoReader(str(path))
            height, width, _ = reader[0].shape
            assert len(reader) == FRAMES and min(height, width) == 448
            assert (height == width) if view == "ego" else (width > height)


def centre_median(frame: np.ndarray) -> np.ndarray:
    """Median colour of a central box that lies inside the cue, wherever the blob is: (3,)."""
    height, width, _ = frame.shape
    box = frame[height // 2 - 60 : height // 2 + 60, width // 2 - 60 : width // 2 + 60]
    return np.median(box.reshape(-1, 3).astype(np.float32), axis=0)


def test_label_is_twice_the_exo_cue_plus_the_ego_cue(dataset):
    for take in load_takes(dataset, "train") + load_takes(dataset, "val"):
        for t in (0, FRAMES - 1):
            red, _, blue = centre_median(decord.VideoReader(str(take.videos["ego"]))[t].asnumpy())
            assert abs(red - blue) > 80  # warm or cool, never ambiguous
            ego_cue = int(red > blue)
            greens = [centre_median(decord.VideoReader(str(take.videos[v]))[t].asnumpy())[1] for v in VIEWS[1:]]
            assert all(abs(g - 128) > 60 for g in greens)  # bright green or dark magenta
            exo_cues = {int(g > 128) for g in greens}
            assert len(exo_cues) == 1  # all four exos agree
            assert take.label == 2 * exo_cues.pop() + ego_cue


@pytest.mark.parametrize("shape,size", [("panel", (448, 448)), ("disc", (448, 598))])
def test_written_scene_decodes_to_its_rendered_frames(tmp_path, shape, size):
    # the blob is painted straight into the yuv420p planes: it must land where the RGB frames have it
    scene = render_scene(size, np.random.default_rng(5), shape, cue=1)
    scene.write(tmp_path / "v.mp4", frames=4)
    decoded = decord.VideoReader(str(tmp_path / "v.mp4")).get_batch([0, 1, 2, 3]).asnumpy().astype(np.float32)
    expected = scene.frames(4).astype(np.float32)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 4
    for t in range(4):
        left = scene.blob_left(t)
        inner = decoded[t, scene.blob_y + 4 : scene.blob_y + scene.blob_size - 4, left + 4 : left + scene.blob_size - 4]
        assert np.abs(np.median(inner.reshape(-1, 3), axis=0) - scene.blob_colour).max() < 8, t


def test_camera_names_cover_every_variant_at_40_takes(tmp_path):
    summary = write_demo_dataset(tmp_path, takes=40, write_videos=False)
    assert not (tmp_path / "takes").exists()
    ego, exo = set(), Counter()
    for record in records(tmp_path):
        names = [Path(p).name for p in record["video_paths"].values()]
        ego.add(names[0])
        exo.update(names[1:])
        if set(names[1:]) & GOPRO_NAMES:
            assert set(names[1:]) == GOPRO_NAMES and record["scenario_name"] in ("Cooking", "Dance", "Music")
        if "cam05.mp4" in names:
            assert names[4] == "cam05.mp4" and record["scenario_name"] in ("Cooking", "Soccer")
    assert ego == EGO_NAMES
    assert set(exo) == CAM_NAMES | GOPRO_NAMES | {"cam05.mp4"}
    assert summary.takes == {"train": 28, "val": 12}


def test_splits_are_balanced_over_labels_and_scenarios(tmp_path):
    summary = write_demo_dataset(tmp_path, takes=40, val_fraction=0.3, write_videos=False)
    assert summary.labels == {"train": dict.fromkeys(LABEL_NAMES, 7), "val": dict.fromkeys(LABEL_NAMES, 3)}
    for split in ("train", "val"):
        assert all(summary.scenarios[split][s] >= 1 for s in SCENARIOS), summary.scenarios
        written = Counter(r["proficiency_score"] for r in annotations(tmp_path, split)["annotations"])
        assert written == summary.labels[split]
    # no scenario gives a cue away: each shows both values of both cues
    for scenario in SCENARIOS:
        scenario_records = [r for r in records(tmp_path) if r["scenario_name"] == scenario]
        labels = {LABEL_NAMES.index(r["proficiency_score"]) for r in scenario_records}
        assert {label & 1 for label in labels} == {0, 1} and {label >> 1 for label in labels} == {0, 1}


def test_the_same_seed_writes_the_same_dataset(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_demo_dataset(tmp_path / name, takes=2, seed=seed, frames=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * len(VIEWS)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    uids = lambda root: {r["take_uid"] for r in records(root)}  # noqa: E731
    assert uids(tmp_path / "a").isdisjoint(uids(tmp_path / "c"))


@pytest.mark.parametrize("faststart", [False, True])
def test_write_video_round_trips_and_places_moov(tmp_path, faststart):
    # not 48 px wide: decord 0.6 decodes widths 16, 24, 48 and 72 with the wrong channel count
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 64, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "v.mp4"
    write_video(path, frames, faststart=faststart)
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]
    reader = decord.VideoReader(str(path))
    assert len(reader) == 5 and reader[0].shape == (32, 64, 3)
    data = path.read_bytes()
    assert (data.find(b"moov") < data.find(b"mdat")) == faststart


def test_a_video_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    from pipeline import demo_data, files
    events = []
    monkeypatch.setattr(files, "fsync_path", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(demo_data.os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or os.rename(a, b))
    write_video(tmp_path / "v.mp4", np.zeros((2, 32, 64, 3), dtype=np.uint8))
    assert events[-3:-1] == [("fsync", events[-3][1]), ("rename", "v.mp4")] and events[-3][1] != "v.mp4"
    assert events[-1] == ("fsync", tmp_path.name)  # the folder, for the rename


@pytest.mark.parametrize("frames", [
    np.zeros((2, 31, 64, 3), np.uint8),  # odd height: no yuv420p
    np.zeros((2, 32, 64, 3), np.float32),
    np.zeros((0, 32, 64, 3), np.uint8),
    np.zeros((32, 64, 3), np.uint8),
])
def test_write_video_refuses_bad_frames_and_writes_nothing(tmp_path, frames):
    with pytest.raises(ValueError):
        write_video(tmp_path / "v.mp4", frames)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,error", [
    (videos.truncated_video, RuntimeError),
    (videos.random_bytes_video, RuntimeError),
    (videos.empty_video, RuntimeError),
    (videos.missing_video, RuntimeError),
    (videos.half_truncated_faststart_video, DECORDError),
])
@pytest.mark.parametrize("start", ["nothing", "demo view"])
def test_each_bad_video_raises_the_documented_error_in_decord(tmp_path, dataset, make, error, start):
    path = tmp_path / "bad.mp4"
    if start == "demo view":  # as the extractor tests do: break a real demo view in place
        shutil.copy(next(dataset.rglob("cam01.mp4")), path)
    make(path)
    with pytest.raises(Exception) as info:
        decord.VideoReader(str(path))
    assert type(info.value) is error  # exactly: DECORDError is not a RuntimeError, nor the reverse
    assert error.__name__ in make.__doc__


def test_a_short_video_opens_with_its_few_frames(tmp_path):
    assert len(decord.VideoReader(str(videos.short_video(tmp_path / "short.mp4", 2)))) == 2


def test_the_demo_refuses_a_dataset_it_wrote_with_another_number_of_takes(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    write_demo_dataset(tmp_path / "demo" / "data", takes=8, seed=0, frames=12)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--takes", "80"])
    assert result.exit_code == 2 and "holds a demo dataset of 8 takes, not --takes 80" in " ".join(result.output.split())
    assert not (tmp_path / "demo" / "cache").exists()


def test_the_demo_data_command_says_what_it_wrote_per_split(tmp_path):
    """It printed the summary's dataclass repr."""
    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "data"), "--takes", "8", "--frames", "2"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "DemoSummary" not in said, said
    counts = {split: len(load_takes(tmp_path / "data", split)) for split in ("train", "val")}
    assert f"train {counts['train']} takes (Novice" in said and f"val {counts['val']} takes (" in said
