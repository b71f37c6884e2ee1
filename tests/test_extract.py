"""`skillpipe extract` end to end on generated takes with a tiny random TimeSformer."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline import backbone as bb
from pipeline import decoder_crashes, extraction, writer_lock
from pipeline.backbone import encode_clips, load_backbone, save_tiny_backbone
from pipeline.cache import CacheError, FeatureCache
from pipeline.demo_data import write_demo_dataset
from pipeline.extraction import ExtractConfig, run_extraction
from pipeline.files import read_json, write_json_atomic
from pipeline.takes import VIEWS, load_takes
from pipeline.video import ClipSampling, decode_clip, preprocess
from stages.cli import app
from tests import videos
from tests.interrupts import killed_at_shard_write
from tests.torchrun_output import root_cause

FRAMES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egoexo")
    write_demo_dataset(root, takes=10, val_fraction=0.3, seed=1, frames=12)
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny", seed=0)


def extract_args(root, cache, backbone, *extra, frames=FRAMES, shard_size=2):
    return [
        "extract", "--root", str(root), "--split", "train", "--cache", str(cache), "--backbone", str(backbone),
        "--frames", str(frames), "--workers", "0", "--shard-size", str(shard_size), *extra,
    ]


def run_cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def markers(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((cache / "shards" / "train").glob("*.json"))}


def test_extract_writes_every_take_and_view_and_a_rerun_does_no_work(dataset, backbone_dir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    result = run_cli(*extract_args(dataset, cache_dir, backbone_dir, "--precision", "fp32"))
    assert result.exit_code == 0, result.output
    takes = load_takes(dataset, "train")
    cache = FeatureCache.open(cache_dir)
    split = cache.read("train")
    assert [r.take_uid for r in split.records] == [t.take_uid for t in takes]
    assert [(r.label, r.scenario, r.take_name) for r in split.records] == [(int(t.label), t.scenario, t.take_name)
                                                                          for t in takes]
    assert len({r.label for r in split.records}) > 1
    assert split.tokens.shape == (len(takes), len(VIEWS), 1 + FRAMES, cache.spec.hidden_size)
    assert split.present.all() and json.loads((cache_dir / "failures.json").read_text()) == {}
    saved = json.loads((cache_dir / "extract-train.json").read_text())
    assert saved["frames"] == FRAMES
    # evaluate and predict read these back from other folders
    assert (saved["root"], saved["backbone"]) == (str(dataset.resolve()), str(backbone_dir.resolve()))

    # the cached tokens are the backbone's pooled tokens of the sampled, preprocessed frames
    model = load_backbone(str(backbone_dir), FRAMES)
    take = takes[-1]
    clips = torch.stack([preprocess(decode_clip(take.videos[v], ClipSampling(FRAMES))[0]) for v in VIEWS])
    with torch.inference_mode():
        expected = encode_clips(model, clips).numpy()
    np.testing.assert_allclose(split.tokens[-1].astype(np.float32), expected, rtol=2e-3, atol=2e-3)

    before = markers(cache_dir)
    monkeypatch.chdir(tmp_path)  # the same folders, spelled relative to here: the same cache
    killed_writers = [cache_dir / "shards" / "train" / ".00001.json.k1ll3d.tmp",  # a marker's temp file, as a kill leaves it
                      cache_dir / "features.zarr" / "train" / "tokens" / "c" / "0.1234.partial"]  # and zarr's own
    for leftover in killed_writers:
        leftover.write_bytes(b"torn")
    again = run_cli(*extract_args(os.path.relpath(dataset), "cache", os.path.relpath(backbone_dir), "--precision", "fp32"))
    assert again.exit_code == 0 and "computed 0" in again.output
    assert not any(leftover.exists() for leftover in killed_writers)
    assert markers(cache_dir) == before  # nothing rewritten


def test_a_different_fingerprint_is_refused_with_exit_2(dataset, backbone_dir, tmp_path):
    assert run_cli(*extract_args(dataset, tmp_path, backbone_dir, "--views", "ego")).exit_code == 0
    result = CliRunner().invoke(app, extract_args(dataset, tmp_path, backbone_dir, "--views", "ego", frames=8))
    assert result.exit_code == 2
    assert "refusing to mix" in result.output and "fingerprint.frames: cache has 4, this run has 8" in result.output
    # listed once, and the weights hash (which follows T) is not named as if the backbone had changed
    assert "weights_sha256" not in result.output and "\n  - frames:" not in result.output
    assert "takes" not in result.output  # no progress bar before the work begins ("extract train 0/? takes")
    other_precision = CliRunner().invoke(app, extract_args(dataset, tmp_path, backbone_dir, "--views", "ego",
                                                           "--precision", "fp32"))
    assert other_precision.exit_code == 2  # bf16 and fp32 features never mix in one cache
    assert 'fingerprint.precision: cache has "bf16", this run has "fp32"' in other_precision.output


def test_a_backbone_with_the_same_weights_and_another_architecture_is_refused_but_an_older_cache_is_not(
        dataset, backbone_dir, tmp_path):
    relu = shutil.copytree(backbone_dir, tmp_path / "relu")  # hidden_act changes the features, not a weight
    (relu / "config.json").write_text(json.dumps({**json.loads((relu / "config.json").read_text()), "hidden_act": "relu"}))
    assert run_cli(*extract_args(dataset, tmp_path / "cache", backbone_dir, "--views", "ego")).exit_code == 0
    result = CliRunner().invoke(app, extract_args(dataset, tmp_path / "cache", relu, "--views", "ego"))
    assert result.exit_code == 2
    assert 'fingerprint.backbone_architecture.hidden_act: cache has "gelu", this run has "relu"' in result.output
    spec = json.loads((tmp_path / "cache" / "cache.json").read_text())  # a cache from before the architecture was kept
    del spec["fingerprint"]["backbone_architecture"]
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(spec))
    again = run_cli(*extract_args(dataset, tmp_path / "cache", backbone_dir, "--views", "ego"))
    assert again.exit_code == 0 and "computed 0" in again.output


def test_a_first_run_refused_for_its_backbone_leaves_no_cache_folder(dataset, tmp_path):
    result = CliRunner().invoke(app, extract_args(dataset, tmp_path / "new-cache", tmp_path / "no-such-backbone"))
    assert result.exit_code == 2 and "no-such-backbone" in result.output
    assert not (tmp_path / "new-cache").exists()


def test_invalid_annotations_exit_2_before_any_compute(dataset, backbone_dir, tmp_path):
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    document = json.loads((dataset / "annotations" / "proficiency_demonstrator_train.json").read_text())
    document["annotations"][0]["proficiency_score"] = "Grandmaster"
    (root / "annotations" / "proficiency_demonstrator_train.json").write_text(json.dumps(document))
    result = CliRunner().invoke(app, extract_args(root, tmp_path / "cache", backbone_dir))
    assert result.exit_code == 2 and "Grandmaster" in result.output
    assert not (tmp_path / "cache").exists()


BAD_VIEWS = {
    "exo1": ("truncated", lambda p: videos.truncated_video(p)),
    "exo2": ("random bytes", lambda p: videos.random_bytes_video(p)),
    "exo3": ("empty", lambda p: videos.empty_video(p)),
    "exo4": ("missing", lambda p: p.unlink()),
    "ego": ("too short", lambda p: videos.short_video(p, 2)),
}


def test_retry_failed_re_extracts_only_the_shards_with_failed_views_once_the_files_are_fixed(dataset, backbone_dir, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(dataset), str(root)], check=True)
    take = load_takes(root, "train")[-1]  # the last shard (of 2 takes each) holds it
    good = take.videos["exo2"].read_bytes()
    take.videos["exo2"].write_bytes(b"")
    args = extract_args(root, tmp_path / "cache", backbone_dir, "--views", "ego,exo2")
    assert run_cli(*args).exit_code == 3
    take.videos["exo2"].write_bytes(good)  # fetched again
    crash_record = tmp_path / "cache" / decoder_crashes.CRASHES / f"{take.take_uid}.exo2.json"
    write_json_atomic(crash_record, {"take_uid": take.take_uid, "view": "exo2", "path": str(take.videos["exo2"]),
                                     "frames": FRAMES, "reason": "crashed the decoder"})  # as if it had, once
    before = markers(tmp_path / "cache")
    rerun = run_cli(*args)
    assert rerun.exit_code == 3 and "rerun with --retry-failed" in rerun.output  # still absent: said, with the way out
    assert markers(tmp_path / "cache") == before
    retried = run_cli(*args, "--retry-failed")
    assert retried.exit_code == 0, retried.output
    takes = len(load_takes(root, "train"))
    # the take with the failed view; its shard's other take keeps its features
    assert f"computed 1, already cached {takes - 1};" in " ".join(retried.output.split())
    after = markers(tmp_path / "cache")
    last = max(after)
    assert after[last] != before[last] and {k: v for k, v in after.items() if k != last} == {
        k: v for k, v in before.items() if k != last}  # only the shard with the failed view was written again
    assert json.loads((tmp_path / "cache" / "failures.json").read_text()) == {}
    assert not crash_record.exists()  # the retried take's files are decoded again, guarded as ever
    clean = tmp_path / "clean"
    assert run_cli(*extract_args(root, clean, backbone_dir, "--views", "ego,exo2")).exit_code == 0
    retried_split, clean_split = FeatureCache.open(tmp_path / "cache").read("train"), FeatureCache.open(clean).read("train")
    assert retried_split.present.all()
    np.testing.assert_array_equal(retried_split.tokens, clean_split.tokens)


def test_retry_failed_decodes_only_the_failed_views_and_keeps_the_others_even_if_their_files_broke_since(
        dataset, backbone_dir, tmp_path, monkeypatch):
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(dataset), str(root)], check=True)
    first, second = load_takes(root, "train")[:2]  # shard 0 (of 2 takes)
    good = first.videos["exo2"].read_bytes()
    first.videos["exo2"].write_bytes(b"")
    config = ExtractConfig(root=root, cache=tmp_path / "cache", backbone=str(backbone_dir), frames=FRAMES,
                           views=("ego", "exo2"), workers=0, shard_size=2)
    assert set(run_extraction(config).failures) == {first.take_uid}
    before = FeatureCache.open(tmp_path / "cache").read("train")
    first.videos["exo2"].write_bytes(good)  # fetched again
    first.videos["ego"].write_bytes(b"")  # while files that had decoded broke since (a disk, a sync)
    second.videos["exo2"].unlink()
    decoded = []

    def recording(path, sampling):
        decoded.append(Path(path))
        return decode_clip(path, sampling)

    monkeypatch.setattr(extraction, "decode_clip", recording)
    summary = run_extraction(dataclasses.replace(config, retry_failed=True))
    assert decoded == [first.videos["exo2"]]  # nothing else, in any shard
    assert summary.failures == {} and (summary.computed_takes, summary.clips) == (1, 1)
    after = FeatureCache.open(tmp_path / "cache").read("train")
    assert after.present.all() and [r.take_uid for r in after.records] == [r.take_uid for r in before.records]
    kept = np.ones_like(before.present)
    kept[0, 1] = False  # the first take's exo2: decoded now
    np.testing.assert_array_equal(after.tokens[kept], before.tokens[kept])
    clean = run_extraction(dataclasses.replace(config, cache=tmp_path / "clean", root=dataset))
    assert clean.failures == {}
    np.testing.assert_array_equal(after.tokens, FeatureCache.open(tmp_path / "clean").read("train").tokens)


def test_an_interrupted_retry_keeps_the_commits_of_the_shards_it_had_not_reached(dataset, backbone_dir, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(dataset), str(root)], check=True)
    takes = load_takes(root, "train")
    broken = [takes[i].videos["exo2"] for i in (0, 2, 4)]  # one failed view in each of the shards 0, 1, 2
    good = [path.read_bytes() for path in broken]
    for path in broken:
        path.write_bytes(b"")
    config = ExtractConfig(root=root, cache=tmp_path / "cache", backbone=str(backbone_dir), frames=FRAMES,
                           views=("ego", "exo2"), workers=0, shard_size=2)
    run_extraction(config)
    for path, data in zip(broken, good):
        path.write_bytes(data)
    with killed_at_shard_write(2) as written:
        run_extraction(dataclasses.replace(config, retry_failed=True))
    shards = len(FeatureCache.open(tmp_path / "cache").plan_split("train", [t.take_uid for t in takes]))
    assert FeatureCache.open(tmp_path / "cache").committed_shards("train") == set(range(shards)) - {written[1]}


def test_bad_views_are_recorded_marked_absent_and_exit_3(dataset, backbone_dir, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(dataset), str(root)], check=True)
    takes = load_takes(root, "train")
    broken = {take.take_uid: view for take, view in zip(takes, BAD_VIEWS)}
    for take in takes:
        if take.take_uid in broken:
            view = broken[take.take_uid]
            BAD_VIEWS[view][1](take.videos[view])
    videos.half_truncated_faststart_video(takes[-1].videos["exo1"])
    broken[takes[-1].take_uid] = "exo1"

    result = run_cli(*extract_args(root, tmp_path / "cache", backbone_dir))
    assert result.exit_code == 3, result.output
    failures = json.loads((tmp_path / "cache" / "failures.json").read_text())
    assert {uid: set(reasons) for uid, reasons in failures.items()} == {uid: {v} for uid, v in broken.items()}
    assert "file not found" in str(failures) and "empty file" in str(failures) and "only" in str(failures)
    for uid, view in broken.items():
        assert uid in result.output
    split = FeatureCache.open(tmp_path / "cache").read("train")
    for record, tokens in zip(split.records, split.tokens):
        missing = broken.get(record.take_uid)
        assert record.present == tuple(v != missing for v in VIEWS)
        assert all(np.any(tokens[i] != 0) == present for i, present in enumerate(record.present))
    val = run_cli(*[("val" if arg == "train" else arg) for arg in extract_args(root, tmp_path / "cache", backbone_dir)])
    assert val.exit_code == 0, val.output  # another split's failures are not this run's: not listed, no exit 3
    assert not any(uid in val.output for uid in broken)
    assert set(json.loads((tmp_path / "cache" / "failures.json").read_text())) == set(broken)  # still summed up


def test_resume_after_sigkill_equals_an_uninterrupted_run(dataset, backbone_dir, tmp_path):
    command = [sys.executable, "-m", "stages.cli", *extract_args(dataset, "CACHE", backbone_dir, "--batch-size", "1", shard_size=1)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def with_cache(cache):
        return [str(cache) if part == "CACHE" else part for part in command]

    subprocess.run(with_cache(reference), check=True, env=env, capture_output=True)
    process = subprocess.Popen(with_cache(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(markers(resumed)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = markers(resumed)
    total = len(load_takes(dataset, "train"))
    assert 2 <= len(committed) < total, "the run should have been killed in the middle"

    finished = subprocess.run(with_cache(resumed), env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert f"computed {total - len(committed)}, already cached {len(committed)}" in " ".join(finished.stdout.split())
    assert {k: v for k, v in markers(resumed).items() if k in committed} == committed
    want, got = FeatureCache.open(reference).read("train"), FeatureCache.open(resumed).read("train")
    assert got.records == want.records
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_torchrun_two_ranks_write_disjoint_shards_equal_to_one_process(dataset, backbone_dir, tmp_path):
    single, distributed = tmp_path / "single", tmp_path / "distributed"
    assert run_cli(*extract_args(dataset, single, backbone_dir, shard_size=1)).exit_code == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
         *extract_args(dataset, distributed, backbone_dir, shard_size=1)],
        capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    computed = {int(rank): int(n) for rank, n in re.findall(r"rank (\d)/2 train: \d+ takes; computed (\d+)", launched.stdout)}
    total = len(FeatureCache.open(single).read("train").records)
    assert set(computed) == {0, 1} and sum(computed.values()) == total and min(computed.values()) > 0  # disjoint shares
    want, got = FeatureCache.open(single).read("train"), FeatureCache.open(distributed).read("train")
    assert got.records == want.records
    np.testing.assert_array_equal(got.tokens, want.tokens)


SLOW_FAILURES_SUMMARY = """
import time
from pipeline.cache import FeatureCache
from stages.cli import main

write = FeatureCache.write_failures_summary


def slow_write(self):
    time.sleep(3)
    return write(self)


FeatureCache.write_failures_summary = slow_write
main()
"""
SLOW_RANK_1_COMMIT = """
import os
import time
from pipeline.cache import FeatureCache
from stages.cli import main

write = FeatureCache.write_shard


def slow_write(self, *args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(3)
    return write(self, *args, **kwargs)


FeatureCache.write_shard = slow_write
main()
"""


@pytest.mark.parametrize("slowed", [SLOW_FAILURES_SUMMARY, SLOW_RANK_1_COMMIT], ids=["rank 0 summary", "rank 1 commit"])
def test_torchrun_with_a_failed_view_on_rank_1_reports_it_from_rank_0_and_exits_1(dataset, backbone_dir, tmp_path, slowed):
    """Every rank used to exit 3, and torchrun stops all ranks at the first: rank 0 could be cut off before it wrote
    failures.json or printed the failed views (rank 0 slowed). Rank 0 sums up only after every rank has committed
    (rank 1 slowed)."""
    data = shutil.copytree(dataset, tmp_path / "data")
    take = load_takes(data, "train")[1]  # shard 1 (one take per shard): rank 1's
    take.videos["exo2"].write_bytes(take.videos["exo2"].read_bytes()[:300])  # truncated
    slow = tmp_path / "slowed_rank.py"
    slow.write_text(slowed)
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(slow),
         *map(str, extract_args(data, tmp_path / "cache", backbone_dir, shard_size=1))],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert launched.returncode == 1, launched.stderr[-3000:]  # torchrun's own code for a failed rank
    assert re.search(r"rank\s*:\s*0\b.*\n\s*exitcode\s*:\s*3", launched.stderr)  # rank 0 ended by itself, with 3
    if slowed is SLOW_FAILURES_SUMMARY:  # rank 1 was done first: not stopped by torchrun either
        assert "-15" not in launched.stderr
    assert f"{take.take_uid} exo2: " in launched.stdout  # rank 0 printed the list
    failures = json.loads((tmp_path / "cache" / "failures.json").read_text())
    assert set(failures) == {take.take_uid} and set(failures[take.take_uid]) == {"exo2"}


@pytest.mark.parametrize("kind", ["FinetuneConfig", "FitHeadConfig"])
def test_extract_into_a_run_folder_is_refused_before_it_writes(dataset, backbone_dir, tmp_path, kind):
    """A finetune run's or a fit-head grid's folder was taken as a new cache: the cache's files mixed with the run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": kind}))
    result = CliRunner().invoke(app, extract_args(dataset, run, backbone_dir))
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"holds another kind of output (a config.json of {kind})" in said, said
    assert [path.name for path in run.iterdir()] == ["config.json"]



def test_a_cache_whose_folder_also_holds_a_fit_head_grid_is_still_extracted_into(dataset, backbone_dir, tmp_path):
    """A grid once written into the cache's own folder (allowed until the fifteenth session) must not lock the cache."""
    assert run_cli(*extract_args(dataset, tmp_path / "cache", backbone_dir, "--views", "ego")).exit_code == 0
    (tmp_path / "cache" / "grid.json").write_text("{}")
    (tmp_path / "cache" / "config.json").write_text(json.dumps({"kind": "FitHeadConfig"}))
    val = run_cli(*[a if a != "train" else "val" for a in extract_args(dataset, tmp_path / "cache", backbone_dir, "--views", "ego")])
    assert val.exit_code == 0 and "computed" in val.output


def test_a_torchrun_refused_by_rank_0_stops_every_rank_with_its_message(dataset, backbone_dir, tmp_path):
    """The other ranks used to wait for rank 0 at a barrier, then die in gloo ('Connection closed by peer'). Now they
    wait for torchrun to stop them once rank 0 has exited (it is the root cause), raising its error only after
    MAIN_ERROR_GRACE_S."""
    (tmp_path / "cache").mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    with writer_lock.first_writer(writer_lock.split_lock_path(tmp_path / "cache", "train"), "that split"):  # another run
        launched = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
             *map(str, extract_args(dataset, tmp_path / "cache", backbone_dir))],
            capture_output=True, text=True, timeout=300,
        )
    said = " ".join((launched.stdout + launched.stderr).split())
    assert launched.returncode == 1 and "Connection closed" not in said, said[-3000:]
    assert said.count("is being written by another run") == 1 and root_cause(said) == (0, 2), said[-3000:]


def test_a_torchrun_whose_rank_0_fails_in_its_own_set_up_step_stops_every_rank_without_a_gloo_error(dataset, backbone_dir,
                                                                                                 tmp_path):
    """Rank 0 alone saves the run's config. An error there outside the user-facing kinds (here an OSError: the
    config's path is a folder) used to leave rank 1 waiting at the barrier, then dying in gloo; now torchrun stops it
    once rank 0 has exited."""
    (tmp_path / "cache" / "extract-train.json").mkdir(parents=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
                               *map(str, extract_args(dataset, tmp_path / "cache", backbone_dir))],
                              capture_output=True, text=True, timeout=300)
    said = " ".join((launched.stdout + launched.stderr).split())
    assert launched.returncode == 1 and "Connection closed" not in said, said[-3000:]
    assert "IsADirectoryError: [Errno 21]" in said and root_cause(said) == (0, 1), said[-3000:]  # rank 0's traceback


def test_compiled_extract_matches_eager_and_has_its_own_fingerprint(dataset, backbone_dir, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli(*extract_args(dataset, eager, backbone_dir)).exit_code == 0
    result = run_cli(*extract_args(dataset, compiled, backbone_dir, "--compile"))
    assert result.exit_code == 0, result.output
    want, got = FeatureCache.open(eager).read("train").tokens, FeatureCache.open(compiled).read("train").tokens
    assert np.abs(got.astype(np.float32) - want).max() < 0.05 * np.abs(want).max()  # bf16 rounding, not another model
    assert FeatureCache.open(compiled).spec.fingerprint["backbone_forward"] == "fused-attention+torch.compile+frozen-weights"
    assert "backbone_forward" not in FeatureCache.open(eager).spec.fingerprint  # older eager caches stay valid
    refused = CliRunner().invoke(app, extract_args(dataset, compiled, backbone_dir))
    assert refused.exit_code == 2 and "backbone_forward" in refused.output


def test_a_cache_extracted_in_fp16_autocast_is_fingerprinted_as_fp16(tmp_path, monkeypatch):
    """On GPUs without bf16 (pre-Ampere) `--precision bf16` autocasts to fp16: other numbers, another fingerprint."""
    from pipeline.extraction import ExtractConfig, fingerprint

    def precision(value):
        return fingerprint(ExtractConfig(root=tmp_path, frames=4, sampling="uniform", precision=value), "ab", {})["precision"]

    assert (precision("bf16"), precision("fp32")) == ("bf16", "fp32")
    monkeypatch.setattr(bb, "autocast_dtype", lambda device: torch.float16)
    assert (precision("bf16"), precision("fp32")) == ("fp16", "fp32")


def test_a_compiled_cache_begun_without_frozen_weights_is_continued_without_them(dataset, backbone_dir, tmp_path):
    cache = tmp_path / "cache"  # as caches from before frozen weights were begun
    result = run_cli(*extract_args(dataset, cache, backbone_dir, "--compile", "--no-frozen-weights"))
    assert result.exit_code == 0, result.output
    assert FeatureCache.open(cache).spec.fingerprint["backbone_forward"] == "fused-attention+torch.compile"
    val = [arg if arg != "train" else "val" for arg in extract_args(dataset, cache, backbone_dir, "--compile")]
    result = run_cli(*val)  # the other split follows the cache, rather than being refused for another forward
    assert result.exit_code == 0, result.output
    assert read_json(cache / "extract-val.json")["frozen_weights"] is False
    refused = CliRunner().invoke(app, extract_args(dataset, cache, backbone_dir, "--compile", "--frozen-weights"))
    assert refused.exit_code == 2 and "backbone_forward" in refused.output


def test_frozen_weights_without_compile_is_refused_but_a_compiled_runs_saved_config_can_run_eagerly(dataset, backbone_dir,
                                                                                                    tmp_path):
    refused = CliRunner().invoke(app, extract_args(dataset, tmp_path / "cache", backbone_dir, "--frozen-weights"))
    assert refused.exit_code == 2 and "--compile" in refused.output and not (tmp_path / "cache").exists()
    saved = tmp_path / "extract-train.json"  # as a compiled run saves its resolved config
    write_json_atomic(saved, {"root": str(dataset), "split": "train", "backbone": str(backbone_dir), "frames": FRAMES,
                              "workers": 0, "shard_size": 2, "compile": True, "frozen_weights": True})
    result = run_cli("extract", "--config", str(saved), "--no-compile", "--cache", str(tmp_path / "eager"))
    assert result.exit_code == 0, result.output
    assert "backbone_forward" not in FeatureCache.open(tmp_path / "eager").spec.fingerprint


SPAWNED_CLI = "import multiprocessing; multiprocessing.set_start_method('spawn'); from stages.cli import main; main()"


def test_decoding_workers_also_run_when_spawned(dataset, backbone_dir, tmp_path):
    """macOS and Python >= 3.14 start DataLoader workers without fork: what they get must pickle."""
    reference, spawned = tmp_path / "reference", tmp_path / "spawned"
    assert run_cli(*extract_args(dataset, reference, backbone_dir)).exit_code == 0
    args = extract_args(dataset, spawned, backbone_dir)
    args[args.index("--workers") + 1] = "1"
    result = subprocess.run([sys.executable, "-c", SPAWNED_CLI, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(FeatureCache.open(spawned).read("train").tokens,
                                  FeatureCache.open(reference).read("train").tokens)


def test_errors_print_paths_with_brackets_as_they_are(backbone_dir, tmp_path):
    root = tmp_path / "takes[old]" / "x[/y]"
    result = CliRunner().invoke(app, extract_args(root, tmp_path / "cache", backbone_dir))
    assert result.exit_code == 2 and str(root) in result.output


def test_a_second_split_follows_the_caches_shard_size_and_an_explicit_other_one_is_explained(dataset, backbone_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    assert run_cli(*extract_args(dataset, cache_dir, backbone_dir, "--views", "ego", shard_size=3)).exit_code == 0
    val = ["extract", "--root", str(dataset), "--split", "val", "--cache", str(cache_dir), "--backbone", str(backbone_dir),
           "--frames", str(FRAMES), "--workers", "0", "--views", "ego"]  # no --shard-size
    result = run_cli(*val)
    assert result.exit_code == 0, result.output
    assert json.loads((cache_dir / "extract-val.json").read_text())["shard_size"] == 3
    explicit = CliRunner().invoke(app, [*val, "--shard-size", "5"])
    assert explicit.exit_code == 2
    assert "shard_size: cache has 3, this run has 5" in explicit.output and "leave --shard-size out" in explicit.output


def test_a_shard_another_writer_committed_meanwhile_is_not_rewritten_under_its_marker(dataset, backbone_dir, tmp_path,
                                                                                     monkeypatch):
    config = ExtractConfig(root=dataset, cache=tmp_path / "cache", backbone=str(backbone_dir), frames=FRAMES,
                           views=("ego",), workers=0, shard_size=2)
    written, write_shard = [], FeatureCache.write_shard

    def with_a_second_writer(self, split, shard, tokens, records, failures, videos=None):
        if not written:  # while this run writes its first shard, another writer commits the last one
            last = max(records_of)
            other = np.ones((len(records_of[last]), *tokens.shape[1:]), np.float16)
            write_shard(self, split, last, other, records_of[last], {})
            written.append(("other", last))
        written.append(("this run", shard))
        return write_shard(self, split, shard, tokens, records, failures, videos)

    clean = tmp_path / "clean"
    run_extraction(dataclasses.replace(config, cache=clean))
    records = FeatureCache.open(clean).read_records("train")
    records_of = {k: records[2 * k: 2 * k + 2] for k in range((len(records) + 1) // 2)}
    monkeypatch.setattr(FeatureCache, "write_shard", with_a_second_writer)
    run_extraction(config)
    last = max(records_of)
    assert ("other", last) in written and ("this run", last) not in written
    assert (FeatureCache.open(tmp_path / "cache").read("train").tokens[2 * last:] == 1).all()  # the other writer's data stands


def test_a_second_run_on_a_split_being_written_is_refused_naming_the_holder_and_touches_nothing(
        dataset, backbone_dir, tmp_path, monkeypatch):
    config = ExtractConfig(root=dataset, cache=tmp_path / "cache", backbone=str(backbone_dir), frames=FRAMES,
                           views=("ego",), workers=0, shard_size=2)
    run_extraction(config)
    leftover = tmp_path / "cache" / "shards" / "train" / ".00001.json.in-flight.tmp"  # the running writer's temp file
    leftover.write_text("{}")
    held = writer_lock.split_lock_path(tmp_path / "cache", "train")
    with writer_lock.first_writer(held, "that split"):  # another run, its rank 0 still alive
        with pytest.raises(CacheError, match=rf"split 'train' of the cache .* is being written by another run \(pid {os.getpid()} "):
            run_extraction(dataclasses.replace(config, retry_failed=True))
        assert leftover.exists()  # its temporary files are not "leftovers" while it runs
        with monkeypatch.context() as patched:  # in an existing cache, refused before the model is even loaded
            patched.setattr(extraction, "load_extraction_model", lambda config: pytest.fail("loaded the model"))
            with pytest.raises(CacheError, match="is being written by another run"):
                run_extraction(config)
        result = CliRunner().invoke(app, extract_args(dataset, tmp_path / "cache", backbone_dir, "--views", "ego"))
        assert result.exit_code == 2 and "only one run may write it at a time" in result.output
        run_extraction(dataclasses.replace(config, split="val"))  # another split of the cache is not held
    run_extraction(config)  # the lock goes with its holder
    assert not leftover.exists()


def test_window_sampling_caches_the_references_clips_under_its_own_fingerprint(dataset, backbone_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    result = run_cli(*extract_args(dataset, cache_dir, backbone_dir, "--precision", "fp32", "--sampling", "window"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(cache_dir)
    assert cache.spec.fingerprint["preprocessing"]["sampling"] == "centred-window-stride-4"
    take = load_takes(dataset, "train")[0]
    model = load_backbone(str(backbone_dir), FRAMES)
    expected = {}
    for method in ("window", "uniform"):
        clips = torch.stack([preprocess(decode_clip(take.videos[v], ClipSampling(FRAMES, method))[0]) for v in VIEWS])
        with torch.inference_mode():
            expected[method] = encode_clips(model, clips).numpy()
    tokens = cache.read("train").tokens[0].astype(np.float32)
    np.testing.assert_allclose(tokens, expected["window"], rtol=2e-3, atol=2e-3)
    assert np.abs(tokens - expected["uniform"]).max() > 1e-2  # the two samplings see other frames of these videos
    mixed = run_cli(*extract_args(dataset, cache_dir, backbone_dir, "--precision", "fp32", "--split", "val"))
    assert mixed.exit_code == 2
    assert 'preprocessing.sampling: cache has "centred-window-stride-4", this run has "uniform-segment-centres"' in mixed.output


def test_a_rerun_extracts_again_only_the_committed_shards_whose_data_was_damaged(dataset, backbone_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    assert run_cli(*extract_args(dataset, cache_dir, backbone_dir)).exit_code == 0
    first = FeatureCache.open(cache_dir).read("train").tokens
    before = markers(cache_dir)
    shard_file = cache_dir / "features.zarr" / "train" / "tokens" / "c"
    (shard_file / "0" / "0" / "0" / "0").unlink()  # a copy that missed a file
    flipped = shard_file / "2" / "0" / "0" / "0"
    flipped.write_bytes(bytes([flipped.read_bytes()[0] ^ 1]) + flipped.read_bytes()[1:])
    with pytest.raises(CacheError, match="damaged"):
        FeatureCache.open(cache_dir).read("train")
    overwritten = cache_dir / "shards" / "train" / "00001.json"
    overwritten.write_bytes(b"\x89HDF\r\n")  # another tool's file written over a commit marker
    with pytest.raises(CacheError, match="00001.json: the commit marker of shard 1 of split train is unreadable"):
        FeatureCache.open(cache_dir).read("train")
    with pytest.warns(UserWarning) as warned:
        rerun = run_cli(*extract_args(dataset, cache_dir, backbone_dir))
    assert rerun.exit_code == 0, rerun.output
    said = " ".join(str(w.message) for w in warned)
    assert "shard 0 of split train is damaged (it is missing" in said and "shard 2 of split train is damaged (its checksum" in said
    assert "shard 1 of split train is damaged (its commit marker is unreadable)" in said
    after = markers(cache_dir)
    assert {name for name in before if after[name] != before[name]} == {"00000.json", "00001.json", "00002.json"}
    np.testing.assert_array_equal(FeatureCache.open(cache_dir).read("train").tokens, first)


def test_a_rerun_after_the_annotations_changed_updates_labels_in_place_and_extracts_again_takes_whose_files_changed(
        dataset, backbone_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    cache_dir = tmp_path / "cache"
    assert run_cli(*extract_args(root, cache_dir, backbone_dir)).exit_code == 0
    first = FeatureCache.open(cache_dir).read("train")
    before = markers(cache_dir)
    annotations = root / "annotations" / "proficiency_demonstrator_train.json"
    document = json.loads(annotations.read_text())
    by_uid = {record["take_uid"]: record for record in document["annotations"]}
    relabelled, moved = first.records[0].take_uid, first.records[-1].take_uid  # in the first and the last shard
    by_uid[relabelled]["proficiency_score"] = "Late Expert" if first.records[0].label != 3 else "Novice"
    by_uid[relabelled]["scenario_name"] = "Soccer" if first.records[0].scenario != "Soccer" else "Dance"
    paths = by_uid[moved]["video_paths"]
    paths["exo1"], paths["exo2"] = paths["exo2"], paths["exo1"]  # a corrected camera order
    by_uid[moved]["proficiency_score"] = "Late Expert" if first.records[-1].label != 3 else "Novice"  # and its label
    annotations.write_text(json.dumps(document))

    with pytest.warns(UserWarning) as warned:
        rerun = run_cli(*extract_args(root, cache_dir, backbone_dir))
    assert rerun.exit_code == 0, rerun.output
    said = " ".join(str(w.message) for w in warned)
    assert "1 cached take(s) of split train have another label" in said and relabelled in said
    assert f"other video files for {moved}" in said
    after = markers(cache_dir)
    last = max(before)
    assert {name for name in before if after[name] != before[name]} == {"00000.json", last}
    second = FeatureCache.open(cache_dir).read("train")
    takes = {take.take_uid: take for take in load_takes(root, "train")}
    assert [(r.label, r.scenario) for r in second.records] == [(int(takes[r.take_uid].label), takes[r.take_uid].scenario)
                                                               for r in second.records]
    assert second.records[0] != first.records[0] and second.records[-1].label != first.records[-1].label
    np.testing.assert_array_equal(second.tokens[:-1], first.tokens[:-1])  # relabelled in place, not extracted again
    exo1, exo2 = VIEWS.index("exo1"), VIEWS.index("exo2")
    np.testing.assert_array_equal(second.tokens[-1][[exo1, exo2]], first.tokens[-1][[exo2, exo1]])  # extracted again
    again = run_cli(*extract_args(root, cache_dir, backbone_dir))
    assert again.exit_code == 0 and markers(cache_dir) == after  # now in line: nothing to do


def test_a_marker_written_before_video_files_were_recorded_takes_a_renamed_folder_as_a_new_name(dataset, backbone_dir,
                                                                                                tmp_path):
    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    cache_dir = tmp_path / "cache"
    config = ExtractConfig(root=root, cache=cache_dir, backbone=str(backbone_dir), frames=FRAMES, views=("ego",),
                           workers=0, shard_size=2)
    run_extraction(config)
    for path in (cache_dir / "shards" / "train").glob("*.json"):  # as the markers of before the twelfth session
        marker = read_json(path)
        del marker["videos"], marker["data_bytes"]
        write_json_atomic(path, marker)
    first = FeatureCache.open(cache_dir).read("train")
    renamed = first.records[0].take_uid
    annotations = root / "annotations" / "proficiency_demonstrator_train.json"
    document = json.loads(annotations.read_text())
    record = next(r for r in document["annotations"] if r["take_uid"] == renamed)
    old_name = record["video_paths"]["ego"].split("/")[1]
    (root / "takes" / old_name).rename(root / "takes" / f"{old_name}_v2")
    record["video_paths"] = {view: path.replace(f"takes/{old_name}/", f"takes/{old_name}_v2/")
                             for view, path in record["video_paths"].items()}
    annotations.write_text(json.dumps(document))
    before = markers(cache_dir)
    with pytest.warns(UserWarning, match="another label, scenario or folder"):
        summary = run_extraction(config)
    assert summary.computed_takes == 0  # the files are not compared: the name is updated in place
    after = markers(cache_dir)
    assert {name for name in before if after[name] != before[name]} == {"00000.json"}
    second = FeatureCache.open(cache_dir).read("train")
    assert second.records[0].take_name == f"{old_name}_v2" and second.records[1:] == first.records[1:]
    np.testing.assert_array_equal(second.tokens, first.tokens)
