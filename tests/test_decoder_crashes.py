"""A video that crashes the decoder process costs only its view: in extract in this run or after a crash of the whole
run, in finetune and evaluate in the rerun after the crash that names it."""

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import decord
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import decoder_crashes, evaluation
from pipeline.backbone import save_tiny_backbone
from pipeline.cache import FeatureCache
from pipeline.demo_data import write_demo_dataset
from pipeline.extraction import ExtractConfig, run_extraction
from pipeline.files import write_json_atomic
from pipeline.finetune import FinetuneConfig, run_finetune
from pipeline.takes import VIEWS, load_takes
from pipeline.video import ClipSampling
from pipeline.views import FAILURES_EXIT
from stages.cli import app
from tests import crashing_decoder

FRAMES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egoexo")
    write_demo_dataset(root, takes=6, val_fraction=0.0, seed=3, frames=12)
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny", seed=0)


@pytest.fixture(scope="module")
def clean(dataset, backbone_dir, tmp_path_factory):
    """The same extraction without any crash."""
    cache = tmp_path_factory.mktemp("clean") / "cache"
    run_extraction(config(dataset, backbone_dir, cache, workers=0))
    return FeatureCache.open(cache).read("train")


@pytest.fixture
def crash_on(monkeypatch):
    """crash_on(*paths, here=False, hang=False): those files kill (with `hang`: hang) their decoder in triage's
    child processes, and with `here` also in this process and its forks (DataLoader workers)."""
    monkeypatch.setattr(decoder_crashes, "_CHILD", "import tests.crashing_decoder as c; c.install(); " + decoder_crashes._CHILD)

    def crash(*paths, here=False, hang=False):
        monkeypatch.setenv(crashing_decoder.HANG_FILES if hang else crashing_decoder.CRASH_FILES,
                           ":".join(str(p) for p in paths))
        if here:
            monkeypatch.setattr(decord, "VideoReader", crashing_decoder.reader)

    return crash


def config(root, backbone, cache, workers):
    return ExtractConfig(root=root, split="train", cache=cache, backbone=str(backbone), frames=FRAMES, workers=workers,
                         shard_size=2, precision="fp32")


def assert_only_slot_missing(cache_dir, clean, take_index, view_index):
    split = FeatureCache.open(cache_dir).read("train")
    expected_present = np.ones_like(clean.present)
    expected_present[take_index, view_index] = False
    np.testing.assert_array_equal(split.present, expected_present)
    keep = expected_present.astype(bool)
    np.testing.assert_array_equal(split.tokens[keep], clean.tokens[keep])


def test_a_worker_killed_by_a_file_fails_that_view_and_the_run_goes_on(dataset, backbone_dir, clean, crash_on, tmp_path):
    take = load_takes(dataset, "train")[2]
    crash_on(take.videos[VIEWS[1]], here=True)
    cache_dir = tmp_path / "cache"
    summary = run_extraction(config(dataset, backbone_dir, cache_dir, workers=1))
    reason = summary.failures[take.take_uid][VIEWS[1]]
    assert "crashed" in reason and "SIGABRT" in reason and str(take.videos[VIEWS[1]]) in reason
    assert_only_slot_missing(cache_dir, clean, 2, 1)
    assert not list((cache_dir / decoder_crashes.MARKERS).glob("*.json"))  # no marker left behind
    again = run_extraction(config(dataset, backbone_dir, cache_dir, workers=1))  # never decoded again
    assert again.computed_takes == 0 and again.failures == summary.failures


def test_crashing_files_swapped_between_two_views_are_recorded_anew_and_the_rerun_goes_on(dataset, backbone_dir,
                                                                                        crash_on, tmp_path):
    root = shutil.copytree(dataset, tmp_path / "root")
    take = load_takes(root, "train")[2]
    crash_on(take.videos[VIEWS[1]], take.videos[VIEWS[2]], here=True)
    cache_dir = tmp_path / "cache"
    first = run_extraction(config(root, backbone_dir, cache_dir, workers=1))
    assert set(first.failures[take.take_uid]) == {VIEWS[1], VIEWS[2]}
    annotations = root / "annotations" / "proficiency_demonstrator_train.json"
    document = json.loads(annotations.read_text())
    paths = next(r for r in document["annotations"] if r["take_uid"] == take.take_uid)["video_paths"]
    paths[VIEWS[1]], paths[VIEWS[2]] = paths[VIEWS[2]], paths[VIEWS[1]]  # each view's record names the other file
    annotations.write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="other video files"):
        again = run_extraction(config(root, backbone_dir, cache_dir, workers=1))
    failures = again.failures[take.take_uid]
    assert set(failures) == {VIEWS[1], VIEWS[2]} and str(take.videos[VIEWS[2]]) in failures[VIEWS[1]]


def test_a_worker_stuck_in_the_decoder_fails_that_view_and_the_run_goes_on(dataset, backbone_dir, clean, crash_on,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setattr(decoder_crashes, "DECODE_TIMEOUT_S", 2)  # per view: the worker's wait is 5 x 2 s
    take = load_takes(dataset, "train")[2]
    crash_on(take.videos[VIEWS[1]], here=True, hang=True)
    cache_dir = tmp_path / "cache"
    summary = run_extraction(config(dataset, backbone_dir, cache_dir, workers=1))
    reason = summary.failures[take.take_uid][VIEWS[1]]
    assert "hung (> 2 s)" in reason and str(take.videos[VIEWS[1]]) in reason
    assert_only_slot_missing(cache_dir, clean, 2, 1)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leave_marker(folder, take, view, pid, **fields):
    marker = {"take_uid": take.take_uid, "view": view, "path": str(take.videos[view]), "frames": FRAMES, **fields}
    write_json_atomic(folder / decoder_crashes.MARKERS / f"{socket.gethostname()}-{pid}.json", marker)


def test_markers_left_by_a_killed_run_are_retried_in_a_child_before_the_rerun(dataset, backbone_dir, clean, crash_on,
                                                                               tmp_path):
    takes = load_takes(dataset, "train")
    crash_on(takes[4].videos[VIEWS[0]])  # only in triage's children: the run itself (workers=0) would decode it fine
    cache_dir = tmp_path / "cache"
    markers = cache_dir / decoder_crashes.MARKERS
    for take, view in ((takes[4], VIEWS[0]), (takes[1], VIEWS[2])):  # a crasher and an innocent file
        leave_marker(cache_dir, take, view, dead_pid())
    summary = run_extraction(config(dataset, backbone_dir, cache_dir, workers=0))
    assert set(summary.failures) == {takes[4].take_uid} and "SIGABRT" in summary.failures[takes[4].take_uid][VIEWS[0]]
    assert_only_slot_missing(cache_dir, clean, 4, 0)  # the innocent file was decoded as usual
    assert not list(markers.glob("*.json"))


def test_a_worker_death_that_the_file_alone_does_not_reproduce_names_the_file_and_keeps_the_work(dataset, backbone_dir,
                                                                                                tmp_path, monkeypatch):
    take = load_takes(dataset, "train")[3]  # in the second shard
    monkeypatch.setattr(decord, "VideoReader", crashing_decoder.reader)  # the worker dies, triage's child does not
    monkeypatch.setenv(crashing_decoder.CRASH_FILES, str(take.videos[VIEWS[1]]))
    cache_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="decodes fine alone") as raised:
        run_extraction(config(dataset, backbone_dir, cache_dir, workers=1))
    assert str(take.videos[VIEWS[1]]) in str(raised.value)
    assert not (cache_dir / decoder_crashes.CRASHES).exists()  # an innocent file is never recorded
    committed = FeatureCache.open(cache_dir).committed_shards("train")
    monkeypatch.delenv(crashing_decoder.CRASH_FILES)
    again = run_extraction(config(dataset, backbone_dir, cache_dir, workers=1))
    assert again.skipped_takes == 2 * len(committed) and not again.failures  # shards of 2: committed work kept
    assert FeatureCache.open(cache_dir).is_complete("train")


def test_a_triage_child_that_cannot_run_is_an_error_not_a_clean_decode(monkeypatch, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video")
    assert decoder_crashes._crash_in_child(garbage, ClipSampling(FRAMES, "window")) is None  # a VideoError: no crash
    monkeypatch.setattr(decoder_crashes, "_CHILD", "import a_module_that_is_not_installed")
    with pytest.raises(RuntimeError, match="(?s)garbage.mp4: could not re-decode it .*a_module_that_is_not_installed"):
        decoder_crashes._crash_in_child(garbage, ClipSampling(FRAMES))


def test_forget_drops_the_crash_records_of_the_named_takes_only(tmp_path):
    for uid, view in (("take-a", "ego"), ("take-a", "exo1"), ("take-b", "ego")):
        write_json_atomic(tmp_path / decoder_crashes.CRASHES / f"{uid}.{view}.json",
                          {"take_uid": uid, "view": view, "path": "x.mp4", "frames": 4, "reason": "crashed"})
    decoder_crashes.forget(tmp_path, ["take-a"])
    assert decoder_crashes.known_crashes(tmp_path) == {("take-b", "ego"): "crashed"}


def test_a_crash_record_made_from_a_relative_path_applies_from_any_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v.mp4").write_bytes(b"corrupt")
    monkeypatch.chdir(tmp_path)
    with decoder_crashes.decoding(tmp_path / "out", "take", "exo1", Path("data/v.mp4"), ClipSampling(FRAMES)):
        (marker,) = (tmp_path / "out" / decoder_crashes.MARKERS).glob("*.json")
        record = json.loads(marker.read_text()) | {"reason": "crashed"}  # as triage records it
    write_json_atomic(tmp_path / "out" / decoder_crashes.CRASHES / "take.exo1.json", record)
    monkeypatch.chdir(tmp_path / "data")  # evaluate run again from elsewhere, --root given relative to there
    assert decoder_crashes.known_crashes(tmp_path / "out") == {("take", "exo1"): "crashed"}


def test_a_crash_record_applies_to_its_own_file_not_to_the_same_view_under_another_root(tmp_path, monkeypatch):
    for root in ("first", "second"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "v.mp4").write_bytes(b"corrupt" if root == "first" else b"fine")
    write_json_atomic(tmp_path / "out" / decoder_crashes.CRASHES / "take.exo1.json",
                      {"take_uid": "take", "view": "exo1", "path": str(tmp_path / "first" / "v.mp4"), "reason": "crashed",
                       "file": decoder_crashes.file_identity(tmp_path / "first" / "v.mp4")})
    guard = decoder_crashes.CrashGuard(tmp_path / "out", decoder_crashes.known_crashes(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    assert guard.known_crash("take", "exo1", Path("first/v.mp4")) == "crashed"  # the same file, spelled relative
    assert guard.known_crash("take", "exo1", tmp_path / "second" / "v.mp4") is None  # evaluate --out reused, other --root
    assert guard.known_crash("take", "exo2", tmp_path / "first" / "v.mp4") is None
    (tmp_path / "out" / decoder_crashes.CRASHES / "take.exo1.json").unlink()  # forgotten by another rank's --retry-failed
    assert guard.known_crash("take", "exo1", tmp_path / "first" / "v.mp4") == "crashed"  # this run still skips it


def test_a_crash_record_forgotten_by_another_rank_while_being_read_is_skipped(tmp_path, monkeypatch):
    for uid in ("take-a", "take-b"):
        write_json_atomic(tmp_path / decoder_crashes.CRASHES / f"{uid}.ego.json",
                          {"take_uid": uid, "view": "ego", "path": "x.mp4", "frames": 4, "reason": "crashed"})
    read = decoder_crashes.read_json

    def forgotten_first(path):  # another rank's --retry-failed unlinks it between the listing and the read
        if path.name.startswith("take-a"):
            path.unlink()
        return read(path)

    monkeypatch.setattr(decoder_crashes, "read_json", forgotten_first)
    assert decoder_crashes.known_crashes(tmp_path) == {("take-b", "ego"): "crashed"}


def test_a_crash_record_applies_only_while_its_file_is_unchanged(tmp_path):
    video = tmp_path / "take.mp4"
    video.write_bytes(b"corrupt")
    for view, file in (("ego", decoder_crashes.file_identity(video)), ("exo1", None)):  # exo1: a record from before
        write_json_atomic(tmp_path / decoder_crashes.CRASHES / f"take.{view}.json",
                          {"take_uid": "take", "view": view, "path": str(video), "reason": "crashed"}
                          | ({"file": file} if file else {}))
    assert set(decoder_crashes.known_crashes(tmp_path)) == {("take", "ego"), ("take", "exo1")}
    video.write_bytes(b"fetched again")
    assert set(decoder_crashes.known_crashes(tmp_path)) == {("take", "exo1")}
    video.unlink()  # gone: decoding it again fails as a missing file, a plainer reason than the old crash
    assert set(decoder_crashes.known_crashes(tmp_path)) == {("take", "exo1")}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_demo_dataset(root, takes=8, val_fraction=0.25, seed=4, frames=12)
    return root


def finetune_config(root, backbone, out, workers=1):
    return FinetuneConfig(root=root, out=out, backbone=str(backbone), frames=FRAMES, hidden=16, heads=2, lora_r=2,
                          lora_alpha=4, epochs=1, batch_size=2, grad_accum=1, holdout=0.0, workers=workers)


def test_finetune_stops_on_a_decoder_crash_naming_the_file_and_resume_goes_on_without_it(labelled, backbone_dir,
                                                                                         crash_on, tmp_path):
    take = load_takes(labelled, "train")[1]
    crash_on(take.videos[VIEWS[2]], here=True)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="exited unexpectedly") as raised:
        run_finetune(finetune_config(labelled, backbone_dir, out))
    message = str(raised.value)
    assert f"take {take.take_uid}, view {VIEWS[2]}" in message and "SIGABRT" in message and "finetune --resume" in message
    assert set(decoder_crashes.known_crashes(out)) == {(take.take_uid, VIEWS[2])}
    events = []
    with pytest.warns(UserWarning, match=f"take {take.take_uid}, view {VIEWS[2]}: .*crashed.*treated as absent"):
        state = run_finetune(finetune_config(labelled, backbone_dir, out), resume=True, on_event=events.append)
    assert state["metrics"]["num_takes"] == len(load_takes(labelled, "val"))  # never decoded again: it would abort
    assert any("1 video file(s) recorded" in event for event in events)


def test_evaluate_from_another_root_whose_file_of_a_crashed_view_crashes_too_names_it_again(labelled, backbone_dir,
                                                                                           crash_on, tmp_path):
    run = tmp_path / "run"
    run_finetune(finetune_config(labelled, backbone_dir, run, workers=0))
    copy = shutil.copytree(labelled, tmp_path / "copy")
    take, copied = load_takes(labelled, "val")[0], load_takes(copy, "val")[0]
    crash_on(take.videos[VIEWS[0]], copied.videos[VIEWS[0]], here=True)
    command = ["evaluate", "--checkpoint", run, "--root", labelled, "--out", tmp_path / "eval", "--workers", 1]
    with pytest.raises(RuntimeError, match=f"(?s)take {take.take_uid}, view {VIEWS[0]}: .*SIGABRT"):
        CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    command[command.index("--root") + 1] = copy  # the same --out: its record is for the first root's file
    with pytest.raises(RuntimeError, match=f"(?s)take {take.take_uid}, view {VIEWS[0]}: {copied.videos[VIEWS[0]]}.*SIGABRT"):
        CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    result = CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    assert result.exit_code == 3  # the rerun goes on with that view absent


def test_finetune_stops_on_a_decode_stuck_past_its_limit_naming_the_file(labelled, backbone_dir, crash_on, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(decoder_crashes, "DECODE_TIMEOUT_S", 2)  # per decode: the loader waits 5 views x 2 s
    take = load_takes(labelled, "train")[0]
    crash_on(take.videos[VIEWS[3]], here=True, hang=True)
    config = dataclasses.replace(finetune_config(labelled, backbone_dir, tmp_path / "run"), batch_size=1)
    with pytest.raises(RuntimeError, match=f"(?s)DataLoader timed out.*take {take.take_uid}, view {VIEWS[3]}: .*hung"):
        run_finetune(config)


def test_evaluate_stops_on_a_decoder_crash_naming_the_file_and_the_rerun_goes_on_without_it(labelled, backbone_dir,
                                                                                          crash_on, tmp_path):
    run = tmp_path / "run"
    run_finetune(finetune_config(labelled, backbone_dir, run, workers=0))
    take = load_takes(labelled, "val")[0]
    crash_on(take.videos[VIEWS[0]], here=True)
    # evaluate's default: a decode worker (until the fifteenth session it decoded in its own process, which died)
    command = ["evaluate", "--checkpoint", run, "--root", labelled, "--out", tmp_path / "eval"]
    with pytest.raises(RuntimeError, match=f"(?s)take {take.take_uid}, view {VIEWS[0]}: .*SIGABRT.*the same command"):
        CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    result = CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    assert result.exit_code == FAILURES_EXIT, result.output
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["absent_views"] for row in rows if row["take_uid"] == take.take_uid] == [[VIEWS[0]]]
    assert not any(row["absent_views"] for row in rows if row["take_uid"] != take.take_uid)
    crash_on()  # the file is fixed: replaced by one that decodes, with a new modification time
    os.utime(take.videos[VIEWS[0]], ns=(os.stat(take.videos[VIEWS[0]]).st_atime_ns, time.time_ns() + 10**9))
    result = CliRunner().invoke(app, [str(a) for a in command], catch_exceptions=False)
    assert result.exit_code == 0, result.output  # decoded again: the record was for the file it replaced
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert not any(row["absent_views"] for row in rows)


def test_predict_names_a_file_that_crashes_the_decoder_and_predicts_that_take_without_its_view(labelled, backbone_dir,
                                                                                             crash_on, tmp_path,
                                                                                             monkeypatch):
    """predict has no output folder to record the crash for a rerun: it goes on at once, from the batch that crashed,
    without that view (until the seventeenth session it decoded in its own process, which the crash killed, naming
    nothing)."""
    run = tmp_path / "run"
    run_finetune(finetune_config(labelled, backbone_dir, run, workers=0))
    # batches of 2, the last take alone; a DataLoader worker is given a batch's takes once the batch two before it was
    # taken from it, so the first batch was received before the worker can reach the last take and crash
    takes = load_takes(labelled, "val")[:2] + load_takes(labelled, "train")[:3]
    folders = [take.videos[VIEWS[0]].parents[3] for take in takes]  # <take>/frame_aligned_videos/downscaled/448
    command = ["predict", "--checkpoint", str(run), "--json", *map(str, folders)]
    result = CliRunner().invoke(app, command, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    clean = json.loads(result.stdout[result.stdout.index("["):])
    predicted = []  # how many takes each pass over the takes was given
    passes = evaluation.logit_batches
    monkeypatch.setattr(evaluation, "logit_batches", lambda model, takes, *a: predicted.append(len(takes)) or passes(model, takes, *a))
    broken = takes[4].videos[VIEWS[1]]
    crash_on(broken, here=True)
    with pytest.warns(UserWarning, match=f"take {folders[4]}, view {VIEWS[1]}: {broken}: the decoder crashed .*treated as absent"):
        result = CliRunner().invoke(app, command, catch_exceptions=False)
    assert result.exit_code == FAILURES_EXIT, result.output
    assert predicted[0] == 5 and predicted[1] in (3, 1)  # the first batch (and maybe the second) not predicted again
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [row["take"] for row in rows] == [str(folder) for folder in folders]
    assert [row["absent_views"] for row in rows] == [[]] * 4 + [[VIEWS[1]]]
    assert rows[:4] == clean[:4]


def test_a_take_uid_that_cannot_be_a_file_name_gets_a_record_named_by_its_hash(tmp_path):
    for uid in ("/data/takes/basketball_1", "x" * 200, ".."):
        path = decoder_crashes.record_path(tmp_path, uid, "ego")
        assert path.parent == tmp_path / decoder_crashes.CRASHES and path.name.startswith("uid-") and len(path.name) < 100
    assert decoder_crashes.record_path(tmp_path, "0a1b-uuid", "exo2").name == "0a1b-uuid.exo2.json"  # as always


def test_a_stop_without_a_dead_worker_is_not_blamed_on_a_file(dataset, crash_on, tmp_path):
    assert decoder_crashes.explained_worker_death(tmp_path, RuntimeError("out of patience"), "rerun") is None
    take = load_takes(dataset, "train")[0]
    crash_on(take.videos[VIEWS[0]])
    # a worker killed by the loader's shutdown after some other error (here: out of memory in the model) leaves
    # its marker: the error is not about that file
    leave_marker(tmp_path, take, VIEWS[0], dead_pid())
    assert decoder_crashes.explained_worker_death(tmp_path, RuntimeError("CUDA out of memory"), "rerun") is None
    # an exception raised in a worker (by a bug, say) is re-raised in the loop with these words
    caught = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert decoder_crashes.explained_worker_death(tmp_path, caught, "rerun") is None
    assert not decoder_crashes.known_crashes(tmp_path)
    for death in ("DataLoader worker (pid(s) 12) exited unexpectedly", "DataLoader worker (pid 12) is killed by signal: "
                  "Aborted.", "DataLoader timed out after 10 seconds"):
        assert decoder_crashes.worker_died(RuntimeError(death)), death


def test_a_marker_of_a_reused_pid_is_a_suspect_and_a_live_decode_is_not(dataset, crash_on, tmp_path):
    takes = load_takes(dataset, "train")
    crash_on(*(take.videos[VIEWS[1]] for take in takes[:4]))
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        started = [decoder_crashes._start_time(sleeper.pid) for sleeper in sleepers]
        assert None not in started
        leave_marker(tmp_path, takes[0], VIEWS[1], os.getpid())  # a crashed run's pid, given again to this process
        leave_marker(tmp_path, takes[1], VIEWS[1], sleepers[0].pid, started=started[0] + 1)  # now another process's pid
        leave_marker(tmp_path, takes[2], VIEWS[1], sleepers[1].pid, started=started[1])  # a decode in progress
        leave_marker(tmp_path, takes[3], VIEWS[1], sleepers[2].pid)  # a marker from before start times were recorded
        assert set(decoder_crashes.triage(tmp_path)) == {(takes[0].take_uid, VIEWS[1]), (takes[1].take_uid, VIEWS[1])}
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    assert len(list((tmp_path / decoder_crashes.MARKERS).iterdir())) == 2  # the live ones wait


def test_triage_claims_each_marker_and_takes_over_a_dead_triages_claim(dataset, crash_on, tmp_path, monkeypatch):
    takes = load_takes(dataset, "train")
    crash_on(takes[0].videos[VIEWS[2]])
    leave_marker(tmp_path, takes[0], VIEWS[2], dead_pid())
    orphan = next((tmp_path / decoder_crashes.MARKERS).glob("*.json"))
    orphan.rename(orphan.with_name(f"{orphan.name}.triaging-{dead_pid()}"))  # its triage was killed
    leave_marker(tmp_path, takes[1], VIEWS[2], dead_pid())
    busy = next((tmp_path / decoder_crashes.MARKERS).glob("*.json"))
    busy.rename(busy.with_name(f"{busy.name}.triaging-{os.getppid()}"))  # another process is triaging it
    assert set(decoder_crashes.triage(tmp_path)) == {(takes[0].take_uid, VIEWS[2])}
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / decoder_crashes.MARKERS).iterdir()] == [str(os.getppid())]

    leave_marker(tmp_path, takes[2], VIEWS[2], dead_pid())
    children = []
    monkeypatch.setattr(decoder_crashes, "_crash_in_child", lambda path, sampling: children.append(path))
    real_rename = os.rename

    def claimed_first(source, target):  # another rank renames it away just before this one
        real_rename(source, str(target) + "-elsewhere")
        raise FileNotFoundError(source)

    monkeypatch.setattr(decoder_crashes.os, "rename", claimed_first)
    decoder_crashes.triage(tmp_path)
    assert children == []


def test_a_decode_cut_short_on_a_file_that_decodes_alone_is_named_but_not_recorded(dataset, tmp_path):
    take = load_takes(dataset, "train")[0]
    leave_marker(tmp_path, take, VIEWS[0], dead_pid())
    died = RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
    explained = decoder_crashes.explained_worker_death(tmp_path, died, "the rerun")
    assert f"decoding {take.videos[VIEWS[0]]}, which decodes fine alone" in str(explained)
    assert "the rerun decodes it again" in str(explained) and not decoder_crashes.known_crashes(tmp_path)


def test_a_finetune_killed_while_decoding_in_its_own_process_leaves_the_file_to_its_resume(labelled, backbone_dir,
                                                                                           crash_on, tmp_path):
    take = load_takes(labelled, "train")[3]
    crash_on(take.videos[VIEWS[4]])  # only in triage's child: as if this run (workers 0) had died on the file
    out = tmp_path / "run"
    leave_marker(out, take, VIEWS[4], dead_pid())
    with pytest.warns(UserWarning, match=f"take {take.take_uid}, view {VIEWS[4]}: .*crashed.*treated as absent"):
        run_finetune(finetune_config(labelled, backbone_dir, out, workers=0), resume=True)
    assert set(decoder_crashes.known_crashes(out)) == {(take.take_uid, VIEWS[4])}
    assert not list((out / decoder_crashes.MARKERS).glob("*.json"))


def test_triage_re_decodes_the_very_window_that_was_being_decoded(dataset, tmp_path, monkeypatch):
    take = load_takes(dataset, "train")[0]
    moved = ClipSampling(FRAMES, "window").moved_window(0, 3, take.take_uid)  # a finetune training clip's
    with decoder_crashes.decoding(tmp_path, take.take_uid, VIEWS[0], take.videos[VIEWS[0]], moved):
        left = json.loads(next((tmp_path / decoder_crashes.MARKERS).glob("*.json")).read_text())
    write_json_atomic(tmp_path / decoder_crashes.MARKERS / f"{socket.gethostname()}-{dead_pid()}.json", left)
    children, in_child = [], decoder_crashes._crash_in_child
    monkeypatch.setattr(decoder_crashes, "_crash_in_child", lambda path, sampling: children.append(sampling) or
                        in_child(path, sampling))  # the real child runs too: it must read the position
    assert decoder_crashes.triage(tmp_path) == {} and children == [moved] and moved.position is not None
    assert left["started"] == decoder_crashes._start_time(os.getpid()) is not None  # this very process, pid reuse aside


def test_triage_leaves_markers_of_a_host_whose_name_extends_this_ones(dataset, tmp_path, monkeypatch):
    take = load_takes(dataset, "train")[0]
    monkeypatch.setattr(decoder_crashes.socket, "gethostname", lambda: "node-2")
    leave_marker(tmp_path, take, VIEWS[0], dead_pid())  # node-2-<pid>.json, a cache shared by hosts node and node-2
    monkeypatch.setattr(decoder_crashes.socket, "gethostname", lambda: "node")
    children = []
    monkeypatch.setattr(decoder_crashes, "_crash_in_child", lambda path, sampling: children.append(path))
    decoder_crashes.triage(tmp_path)
    assert children == [] and len(list((tmp_path / decoder_crashes.MARKERS).iterdir())) == 1


def test_a_claim_of_a_reused_pid_is_taken_over_and_a_failed_triage_gives_its_claim_back(dataset, crash_on, tmp_path,
                                                                                         monkeypatch):
    takes = load_takes(dataset, "train")
    crash_on(takes[0].videos[VIEWS[3]])
    leave_marker(tmp_path, takes[0], VIEWS[3], dead_pid())
    marker = next((tmp_path / decoder_crashes.MARKERS).glob("*.json"))
    parent = os.getppid()  # alive, but not the triager that claimed it: another start time
    marker.rename(marker.with_name(f"{marker.name}.triaging-{parent}-{decoder_crashes._start_time(parent) + 1}"))
    assert set(decoder_crashes.triage(tmp_path)) == {(takes[0].take_uid, VIEWS[3])}

    leave_marker(tmp_path, takes[1], VIEWS[3], dead_pid())
    marker = next((tmp_path / decoder_crashes.MARKERS).glob("*.json"))

    def cannot_run(path, sampling):
        raise RuntimeError("could not re-decode it in a child process")

    monkeypatch.setattr(decoder_crashes, "_crash_in_child", cannot_run)
    with pytest.raises(RuntimeError, match="could not re-decode"):
        decoder_crashes.triage(tmp_path)
    assert list((tmp_path / decoder_crashes.MARKERS).iterdir()) == [marker]  # there again for the next triage


def test_an_unreadable_marker_is_removed_with_a_warning_not_an_error(dataset, tmp_path):
    folder = tmp_path / decoder_crashes.MARKERS
    folder.mkdir()
    for text in ("", '{"take_uid": "t", "vi', "{}", '{"path": "x.mp4", "frames": 4}', "[]"):  # cut by an OS crash, say
        path = folder / f"{socket.gethostname()}-{dead_pid()}.json"
        path.write_text(text)
        with pytest.warns(UserWarning, match=f"{path}: an unreadable decode marker"):
            assert decoder_crashes.triage(tmp_path) == {}
        assert not list(folder.iterdir())


def test_a_failed_triage_keeps_a_marker_written_meanwhile_under_the_same_name(dataset, tmp_path, monkeypatch):
    take = load_takes(dataset, "train")[0]
    pid = dead_pid()
    leave_marker(tmp_path, take, VIEWS[0], pid)
    marker = next((tmp_path / decoder_crashes.MARKERS).glob("*.json"))

    def new_decode_then_stop(path, sampling):  # a new process got the dead one's pid and began a decode
        marker.write_text(json.dumps({"take_uid": "live", "view": VIEWS[0], "path": "x.mp4", "frames": FRAMES}))
        raise KeyboardInterrupt

    monkeypatch.setattr(decoder_crashes, "_crash_in_child", new_decode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        decoder_crashes.triage(tmp_path)
    assert json.loads(marker.read_text())["take_uid"] == "live"
    claims = list((tmp_path / decoder_crashes.MARKERS).glob("*.triaging-*"))  # the suspect waits as a claim
    assert len(claims) == 1 and json.loads(claims[0].read_text())["take_uid"] == take.take_uid


def test_a_loaders_wait_covers_every_guarded_decode_of_an_item():
    from pipeline.decoder_crashes import DECODE_TIMEOUT_S, loader_timeout

    assert loader_timeout(5, workers=1) == 5 * DECODE_TIMEOUT_S  # a take's 5 views, each under the child's own limit
    assert loader_timeout(5, workers=0) == 0  # no workers: the DataLoader takes no timeout


def test_a_worker_killed_during_a_retry_goes_on_with_the_shards_left_to_rewrite_and_not_those_rewritten(
        dataset, backbone_dir, clean, crash_on, tmp_path):
    root = shutil.copytree(dataset, tmp_path / "root")
    takes = load_takes(root, "train")
    fixed, crashing = takes[0].videos[VIEWS[1]], takes[4].videos[VIEWS[1]]  # in shards 0 and 2
    good = {path: path.read_bytes() for path in (fixed, crashing)}
    for path in good:
        path.write_bytes(b"")
    cache_dir = tmp_path / "cache"
    assert set(run_extraction(config(root, backbone_dir, cache_dir, workers=0)).failures) == {t.take_uid for t in (takes[0], takes[4])}
    for path, data in good.items():
        path.write_bytes(data)  # fetched again; one of them now kills the decoder
    # shard 1 pending whole: the worker, two takes ahead at most, reaches the crash only after shard 0 is rewritten
    FeatureCache.open(cache_dir).uncommit_shard("train", 1)
    crash_on(crashing, here=True)
    summary = run_extraction(dataclasses.replace(config(root, backbone_dir, cache_dir, workers=1), retry_failed=True))
    assert list(summary.failures) == [takes[4].take_uid] and "crashed" in summary.failures[takes[4].take_uid][VIEWS[1]]
    # takes 0 (one view), 2 and 3 (every view), 4 (its crashing view): shard 0 is not rewritten again after the crash
    assert (summary.computed_takes, summary.clips) == (4, 1 + 2 * len(VIEWS))
    assert_only_slot_missing(cache_dir, clean, 4, 1)


class DiesAfterAHandover:
    """A map-style dataset for one DataLoader worker. Item 0 is a tensor, which reaches the main process as a file
    descriptor that it fetches from the worker; for item 1 the worker stops serving those descriptors (as a dying
    worker does), says so in the file `stopped`, and exits `linger_s` later: the main process's fetch of item 0
    fails while the worker is still alive, which torch reports as the bare connection error."""

    def __init__(self, stopped: Path, linger_s: float):
        self.stopped, self.linger_s = stopped, linger_s

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        import torch
        if index == 0:
            return torch.zeros(4)
        from multiprocessing import resource_sharer
        while not resource_sharer._resource_sharer._cache:  # item 0's descriptor registered (by the queue's thread)
            time.sleep(0.01)
        resource_sharer.stop()
        self.stopped.touch()
        time.sleep(self.linger_s)
        os._exit(1)


def fetch_after_the_handover_failed(tmp_path, linger_s: float) -> pytest.ExceptionInfo:
    from torch.utils.data import DataLoader
    stopped, raised = tmp_path / "stopped", None
    with contextlib.suppress(RuntimeError):  # torch's SIGCHLD handler, should the worker die only as it is stopped
        with decoder_crashes.worker_batches(DataLoader(DiesAfterAHandover(stopped, linger_s), batch_size=None,
                                                       num_workers=1)) as batches:
            deadline = time.monotonic() + 60
            while not stopped.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(Exception) as raised:
                list(batches)
    assert raised is not None
    return raised


def test_a_worker_that_dies_while_its_batch_is_handed_over_is_reported_as_a_dead_worker(tmp_path):
    # seen in the suite on a busy host: a ConnectionResetError instead of the decoder crash named and recorded
    raised = fetch_after_the_handover_failed(tmp_path, linger_s=2.0)  # ample: the main process must fetch before the exit
    assert isinstance(raised.value, RuntimeError) and decoder_crashes.worker_died(raised.value), repr(raised.value)
    # raised here, or by torch's SIGCHLD handler while this waited for the worker's exit
    assert isinstance(raised.value.__cause__ or raised.value.__context__, decoder_crashes.HANDOVER_ERRORS)


def test_a_handover_error_while_every_worker_lives_on_is_raised_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(decoder_crashes, "WORKER_EXIT_WAIT_S", 0.2)
    raised = fetch_after_the_handover_failed(tmp_path, linger_s=30)  # ended as the workers are stopped
    assert isinstance(raised.value, decoder_crashes.HANDOVER_ERRORS), repr(raised.value)
