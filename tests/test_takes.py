import json
from pathlib import Path

import pytest

from pipeline.takes import (
    LABEL_NAMES, VIEWS, AnnotationError, ProficiencyLabel, downscaled_path, load_takes, resolve_view_files, shared_takes,
)

EGO_NAMES = ["aria01_214-1.mp4", "aria02_214-1.mp4", "aria04_214-1.mp4", "aria_214-1.mp4", "aria1_214-1.mp4"]
EXO_SETS = [
    ["cam01.mp4", "cam02.mp4", "cam03.mp4", "cam04.mp4"],
    ["gp01.mp4", "gp02.mp4", "gp03.mp4", "gp04.mp4"],
    ["cam01.mp4", "cam02.mp4", "cam03.mp4", "cam05.mp4"],
    ["CAM01.MP4", "cam02.Mp4", "GP03.mp4", "cam04.MP4"],  # copied from a camera or a case-blind filesystem
]


def record(uid="uid0", name=None, ego="aria01_214-1.mp4", exos=EXO_SETS[0], **fields):
    name, files = name or f"uniandes_bouldering_{uid}", [ego, *exos]
    base = {
        "task_id": 1, "task_name": "Bouldering", "scenario_name": "Rock Climbing", "university_id": "uniandes",
        "origin_participant_id": "p1", "take_uid": uid, "proficiency_score": "Late Expert",
        "video_paths": {view: f"takes/{name}/frame_aligned_videos/{f}" for view, f in zip(VIEWS, files)},
    }
    base.update(fields)
    return base


def write_annotations(root: Path, records, split="train") -> Path:
    path = root / "annotations" / f"proficiency_demonstrator_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ds": "20231211_15:13:34", "annotations": records}))
    return path


@pytest.mark.parametrize("ego", EGO_NAMES)
@pytest.mark.parametrize("exos", EXO_SETS)
def test_every_camera_naming_variant_resolves_to_the_448px_file(tmp_path, ego, exos):
    write_annotations(tmp_path, [record(name="uniandes_bouldering_028_7", ego=ego, exos=exos)])
    (take,) = load_takes(tmp_path, "train")
    folder = tmp_path / "takes" / "uniandes_bouldering_028_7" / "frame_aligned_videos" / "downscaled" / "448"
    assert take.videos == {view: folder / f for view, f in zip(VIEWS, [ego, *exos])}
    assert take.take_name == "uniandes_bouldering_028_7"
    assert take.label is ProficiencyLabel.LATE_EXPERT and take.split == "train"


@pytest.mark.parametrize("ego", EGO_NAMES)
@pytest.mark.parametrize("exos", EXO_SETS)
def test_take_folder_views_resolve_by_camera_name(tmp_path, ego, exos):
    for name in [*exos, ego]:
        (tmp_path / name).write_bytes(b"")
    views = resolve_view_files(tmp_path)
    assert views == {view: tmp_path / f for view, f in zip(VIEWS, [ego, *exos])}


@pytest.mark.parametrize("names, expected", [
    (["cam01", "cam03", "cam04"], {"exo1": "cam01", "exo3": "cam03", "exo4": "cam04"}),  # cam02 not downloaded
    (["gp02"], {"exo2": "gp02"}),
    (["cam01", "cam03", "cam04", "cam05"], {"exo1": "cam01", "exo2": "cam05", "exo3": "cam03", "exo4": "cam04"}),
])
def test_a_take_folder_missing_a_camera_leaves_its_slot_empty(tmp_path, names, expected):
    for name in ["aria01_214-1", *names]:
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    views = resolve_view_files(tmp_path)
    assert {view: path.stem for view, path in views.items() if view != "ego"} == expected


def test_a_partial_take_folder_leaves_out_a_camera_whose_slot_cannot_be_told(tmp_path):
    for name in ["aria01_214-1", "cam01", "cam03", "cam05"]:  # cam02 or cam04 missing: cam05 is exo4 or exo2
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"\['cam05.mp4'\] left out: with only 2 other exo files"):
        views = resolve_view_files(tmp_path)
    assert {view: path.stem for view, path in views.items()} == {"ego": "aria01_214-1", "exo1": "cam01", "exo3": "cam03"}


def test_a_second_file_for_one_camera_number_is_left_out_not_put_in_a_free_slot(tmp_path):
    for name in ["aria01_214-1", "cam01", "gp01", "cam02", "cam03"]:  # cam04 missing; gp01 is camera 1 again
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"\['gp01.mp4'\] left out: a second file for a camera number"):
        views = resolve_view_files(tmp_path)
    assert {view: path.stem for view, path in views.items() if view != "ego"} == {"exo1": "cam01", "exo2": "cam02",
                                                                                "exo3": "cam03"}


def test_aria_side_streams_are_never_the_ego_view(tmp_path):
    for name in ["aria01_1201-1.mp4", "aria01_1201-2.mp4", "aria01_211-1.mp4", "cam01.mp4"]:  # no RGB stream
        (tmp_path / name).write_bytes(b"")
    assert resolve_view_files(tmp_path) == {"exo1": tmp_path / "cam01.mp4"}


def test_take_folder_with_aria_side_streams_picks_the_rgb_one(tmp_path):
    for name in ["aria01_1201-1.mp4", "aria01_211-1.mp4", "aria01_214-1.mp4", "cam01.mp4", "cam02.mp4"]:
        (tmp_path / name).write_bytes(b"")
    assert resolve_view_files(tmp_path)["ego"] == tmp_path / "aria01_214-1.mp4"
    for name in ["cam03.mp4", "cam04.mp4", "cam05.mp4"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="more than four exo videos.*only the four it should see"):
        resolve_view_files(tmp_path)


def test_a_take_folder_without_an_ego_file_leaves_the_ego_slot_empty(tmp_path):
    with pytest.raises(ValueError, match="no ego .* or exo .* video here"):
        resolve_view_files(tmp_path)
    (tmp_path / "cam02.mp4").write_bytes(b"")
    assert resolve_view_files(tmp_path) == {"exo2": tmp_path / "cam02.mp4"}
    for name in ["aria01_214-1.mp4", "aria02_214-1.mp4"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="expected one ego"):
        resolve_view_files(tmp_path)


def test_label_order_and_parsing():
    assert [ProficiencyLabel.parse(n) for n in LABEL_NAMES] == list(ProficiencyLabel)
    assert LABEL_NAMES == ("Novice", "Early Expert", "Intermediate Expert", "Late Expert")
    with pytest.raises(ValueError, match="unknown proficiency_score 'Expert'"):
        ProficiencyLabel.parse("Expert")


def test_takes_are_sorted_and_split_recorded(tmp_path):
    write_annotations(tmp_path, [record(uid="b"), record(uid="a", proficiency_score="Novice")], "val")
    takes = load_takes(tmp_path, "val")
    assert [t.take_uid for t in takes] == ["a", "b"]
    assert [int(t.label) for t in takes] == [0, 3] and {t.split for t in takes} == {"val"}


BAD_RECORDS = {
    "unknown label": (record(proficiency_score="Expert"), "unknown proficiency_score 'Expert'"),
    "missing field": ({k: v for k, v in record().items() if k != "proficiency_score"}, "missing field 'proficiency_score'"),
    "missing view": (record(video_paths={"ego": "takes/x/frame_aligned_videos/a.mp4"}), "no 'exo1' entry"),
    "dotdot path": (record(video_paths={**record()["video_paths"], "exo2": "takes/x/../../../etc/passwd.mp4"}), "'..' escapes"),
    "absolute path": (record(video_paths={**record()["video_paths"], "exo3": "/etc/x/frame_aligned_videos/a.mp4"}), "absolute path"),
    "unknown scenario": (record(scenario_name="Chess"), "unknown scenario_name 'Chess'"),
    "take_uid with a slash": (record(uid="a/b"), "take_uid must not be a path, got 'a/b'"),
    "take_uid with a backslash": (record(uid="a\\b"), "take_uid must not be a path"),
    "take_uid dotdot": (record(uid=".."), "take_uid must not be a path, got '..'"),
    "views in two take folders": (record(video_paths={**record()["video_paths"],
                                                      "exo4": "takes/other_take/frame_aligned_videos/cam04.mp4"}),
                                  "video_paths point into several takes"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_each_invalid_record_is_named(tmp_path, case):
    bad, message = BAD_RECORDS[case]
    write_annotations(tmp_path, [record(uid="good"), bad])
    with pytest.raises(AnnotationError, match="record 1") as info:
        load_takes(tmp_path, "train")
    assert message in str(info.value)


def test_all_problems_are_listed_at_once_including_duplicates(tmp_path):
    records = [record(uid="a"), record(uid="a"), record(uid="b", proficiency_score="Pro"), record(uid="c", scenario_name="?")]
    path = write_annotations(tmp_path, records)
    with pytest.raises(AnnotationError) as info:
        load_takes(tmp_path, "train")
    assert len(info.value.problems) == 4
    text = str(info.value)
    assert str(path) in text and "duplicate take_uid" in text and "'Pro'" in text and "'?'" in text
    assert "record 1 (take_uid a): take folder 'uniandes_bouldering_a' also belongs to record 0" in text


def test_records_that_reuse_videos_are_refused(tmp_path):
    twice = record(uid="b")
    twice["video_paths"]["exo2"] = twice["video_paths"]["exo1"]
    write_annotations(tmp_path, [record(uid="a", name="shared"), record(uid="c", name="shared"), twice])
    with pytest.raises(AnnotationError) as info:
        load_takes(tmp_path, "train")
    text = str(info.value)
    assert "record 1 (take_uid c): take folder 'shared' also belongs to record 0" in text
    assert "record 2 (take_uid b): video_paths name one file for several views" in text


def test_an_annotation_file_that_is_not_utf8_is_named(tmp_path):
    path = write_annotations(tmp_path, [record()])
    path.write_bytes(path.read_bytes().replace(b"Late Expert", "Late Expért".encode("latin-1")))
    with pytest.raises(AnnotationError, match="not valid UTF-8 JSON") as info:
        load_takes(tmp_path, "train")
    assert str(path) in str(info.value)


def test_missing_annotation_file_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="proficiency_demonstrator_train.json"):
        load_takes(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_takes(tmp_path, "test")


def test_downscaled_path_inserts_the_448_folder(tmp_path):
    got = downscaled_path(tmp_path, "takes/t/frame_aligned_videos/cam01.mp4")
    assert got == tmp_path / "takes/t/frame_aligned_videos/downscaled/448/cam01.mp4"


def test_takes_shared_by_train_and_val_are_found_by_uid_or_folder(tmp_path):
    write_annotations(tmp_path, [record(uid="a"), record(uid="b"), record(uid="c", name="one_folder")], "train")
    write_annotations(tmp_path, [record(uid="a"), record(uid="d"), record(uid="e", name="one_folder")], "val")
    assert shared_takes(load_takes(tmp_path, "train"), load_takes(tmp_path, "val")) == ["a", "take folder one_folder"]


def test_a_take_folder_of_a_full_resolution_download_resolves_too(tmp_path):
    aligned = tmp_path / "frame_aligned_videos"
    aligned.mkdir()
    for name in ["aria01_214-1.mp4", "cam01.mp4"]:
        (aligned / name).write_bytes(b"")
    assert resolve_view_files(tmp_path) == {"ego": aligned / "aria01_214-1.mp4", "exo1": aligned / "cam01.mp4"}
    (aligned / "downscaled" / "448").mkdir(parents=True)  # the 448px files win where they exist
    (aligned / "downscaled" / "448" / "aria01_214-1.mp4").write_bytes(b"")
    assert resolve_view_files(tmp_path) == {"ego": aligned / "downscaled" / "448" / "aria01_214-1.mp4"}


def test_the_training_hash_of_takes_covers_labels_and_the_trained_views_files_only(tmp_path):
    from pipeline.takes import Take, takes_sha256

    def take(label=ProficiencyLabel.NOVICE, exo1="cam01.mp4", root=tmp_path):
        return Take("u1", "t1", "Dance", label, "train", {"ego": root / "t1" / "aria01.mp4", "exo1": root / "t1" / exo1})

    base = takes_sha256([take()], tmp_path, ("ego", "exo1"))
    assert takes_sha256([take(root=tmp_path / "moved")], tmp_path / "moved", ("ego", "exo1")) == base  # a moved root
    assert takes_sha256([take(label=ProficiencyLabel.LATE_EXPERT)], tmp_path, ("ego", "exo1")) != base
    assert takes_sha256([take(exo1="cam02.mp4")], tmp_path, ("ego", "exo1")) != base
    assert takes_sha256([take(exo1="cam02.mp4")], tmp_path, ("ego",)) == takes_sha256([take()], tmp_path, ("ego",))


def test_slots_filled_by_another_camera_are_named(tmp_path):
    from pipeline.takes import slots_by_another_camera

    for name in ["aria01_214-1", "cam01", "cam02", "cam03", "cam05"]:
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    assert slots_by_another_camera(resolve_view_files(tmp_path)) == ["cam05.mp4 as exo4"]
    (tmp_path / "cam05.mp4").rename(tmp_path / "gp04.mp4")
    assert slots_by_another_camera(resolve_view_files(tmp_path)) == []  # gp04 is exo4's own camera number
