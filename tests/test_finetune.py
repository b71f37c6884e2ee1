"""finetune / evaluate / predict on generated takes with a tiny random TimeSformer."""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import unittest.mock
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from pipeline import backbone as bb
from pipeline import evaluation
from pipeline import finetune as finetune_module
from pipeline import writer_lock
from pipeline.cache import FeatureCache
from pipeline.checkpoints import load_head
from pipeline.config import ConfigError
from pipeline.demo_data import write_demo_dataset
from pipeline.fusion import HeadConfig, build_head, head_inputs
from pipeline.head_training import stratified_holdout
from pipeline.clips import TakeClips, clip_loader
from pipeline.skill_model import SkillModel, load_skill_model, read_model_spec
from pipeline.takes import VIEWS, load_takes, takes_sha256
from pipeline.video import SAMPLING_NAMES, ClipSampling
from pipeline.writer_lock import first_writer
from stages.cli import app
from tests.torchrun_output import root_cause

FRAMES = 4
TINY_HEAD = ["--hidden", "32", "--heads", "4"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def finetune_args(root, backbone, out, *extra):
    return ["finetune", "--root", root, "--out", out, "--backbone", backbone, "--frames", FRAMES, "--views", "ego+exos",
            *TINY_HEAD, "--epochs", "3", "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1", "--lora-r", "4",
            "--lora-alpha", "8", "--workers", "0", "--holdout", "0.2", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_demo_dataset(root / "data", takes=16, val_fraction=0.25, seed=3, frames=8)
    backbone = bb.save_tiny_backbone(root / "tiny", seed=0)
    run = cli(*finetune_args(root / "data", backbone, root / "run"))
    assert run.exit_code == 0, run.output
    return root


def test_finetune_trains_and_writes_a_complete_run(world):
    run = world / "run"
    for name in ("config.json", "head.safetensors", "head.json", "metrics.json", "predictions.jsonl", "confusion.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint/state.json"):
        assert (run / name).is_file(), name
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    losses = state["train_losses"]
    per_epoch = len(losses) // 3
    assert np.mean(losses[-per_epoch:]) < np.mean(losses[:per_epoch])  # it learns the demo cues
    config = json.loads((run / "config.json").read_text())
    assert config["frames"] == FRAMES and config["views"] == "ego+exos" and config["tune"] == "lora"
    assert json.loads((run / "metrics.json").read_text())["num_takes"] == len(load_takes(world / "data", "val"))
    # checkpoints load without pickle
    torch.load(run / "checkpoint" / "optimizer.pt", weights_only=True)


def test_finetune_fits_on_train_less_holdout_keeps_the_best_holdout_epoch_and_scores_val_alone(world, tmp_path,
                                                                                                  monkeypatch):
    from safetensors.torch import load_file

    from pipeline.takes import LABEL_NAMES

    fitted, held, scored = [], [], []
    loader = finetune_module.clip_loader
    monkeypatch.setattr(finetune_module, "clip_loader", lambda takes, *args: fitted.append([t.take_uid for t in takes])
                        or loader(takes, *args))
    losses = iter([1.0, 0.5, 0.9])  # the held-out loss per epoch: epoch 1 is the best
    monkeypatch.setattr(finetune_module, "_holdout_loss", lambda model, takes, *args: held.append({t.take_uid for t in takes})
                        or next(losses))
    evaluate = finetune_module.evaluate_split
    monkeypatch.setattr(finetune_module, "evaluate_split", lambda model, takes, *args: scored.append(takes)
                        or evaluate(model, takes, *args))
    run = tmp_path / "run"
    assert cli(*finetune_args(world / "data", world / "tiny", run)).exit_code == 0
    train, val = load_takes(world / "data", "train"), load_takes(world / "data", "val")
    in_holdout = stratified_holdout(np.array([int(t.label) for t in train]), 0.2)
    assert held == [{t.take_uid for t, h in zip(train, in_holdout) if h}] * 3
    assert len(fitted) == 3 and all(sorted(epoch) == sorted(t.take_uid for t, h in zip(train, in_holdout) if not h)
                                    for epoch in fitted)
    assert fitted[0] != fitted[1] != fitted[2]  # each epoch its own order
    assert [[t.take_uid for t in takes] for takes in scored] == [[t.take_uid for t in val]]  # val: once, at the end
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["best_epoch"] == json.loads((run / "head.json").read_text())["best_epoch"] == 1
    best, last = load_file(run / "best.safetensors"), load_file(run / "checkpoint" / "trainable.safetensors")
    head = load_file(run / "head.safetensors")
    assert all(torch.equal(head[name], best[f"head.{name}"]) for name in head)  # the run keeps epoch 1's head
    assert not all(torch.equal(head[name], last[f"head.{name}"]) for name in head)
    labels = {t.take_uid: LABEL_NAMES[int(t.label)] for t in val}
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["take_uid"] for r in rows) == sorted(labels) and all(r["label"] == labels[r["take_uid"]] for r in rows)
    fit_labels = [int(t.label) for t, h in zip(train, in_holdout) if not h]
    np.testing.assert_allclose(json.loads((run / "head.json").read_text())["label_prior"],
                               np.bincount(fit_labels, minlength=4) / len(fit_labels))
    groups = torch.load(run / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.01, 0.0]


def test_evaluate_reproduces_the_run_and_rejects_conflicting_settings(world, tmp_path):
    result = cli("evaluate", "--checkpoint", world / "run", "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    ours = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    theirs = (world / "run" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(a)["predicted"] for a in ours] == [json.loads(b)["predicted"] for b in theirs]
    conflict = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                        "--out", str(tmp_path / "x"), "--frames", "16"])
    assert conflict.exit_code == 2 and "--frames 16 conflicts" in conflict.output
    views = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                     "--out", str(tmp_path / "x"), "--views", "ego"])
    assert views.exit_code == 2 and "--views ego conflicts" in views.output
    before = (world / "run" / "metrics.json").read_bytes()
    into_the_run = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                            "--split", "train", "--out", str(world / "run" / ".")])
    assert into_the_run.exit_code == 2 and "is the checkpoint folder itself" in into_the_run.output
    assert (world / "run" / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("inside", ["run adapter", "cell cache", "cell cache's crash records"])
def test_evaluate_refuses_an_out_folder_among_the_models_inputs(world, fitted_cell, tmp_path, inside):
    """Results written into a run's adapter/ would change its hash for good: every later evaluate would refuse it; in
    a cache's own folders they would mix with its files (its decoder crash records, say)."""
    checkpoint, folder, out = {
        "run adapter": (world / "run", world / "run" / "adapter", world / "run" / "adapter" / "eval"),
        "cell cache": (fitted_cell, world / "cache-fp32", world / "cache-fp32"),
        "cell cache's crash records": (fitted_cell, world / "cache-fp32", world / "cache-fp32" / "decoder_crashes"),
    }[inside]
    files = sorted(folder.rglob("*"))
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--root", str(world / "data"),
                                      "--out", str(out)])
    assert result.exit_code == 2 and "which" in result.output and "is read from" in " ".join(result.output.split())
    assert sorted(folder.rglob("*")) == files


def strict_json(path):
    """`path` parsed as strict JSON: NaN and Infinity, which Python writes and JavaScript or jq refuse, raise."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_run_without_held_out_takes_keeps_its_last_epoch_and_writes_strict_json(world, tmp_path):
    args = finetune_args(world / "data", world / "tiny", tmp_path / "run")
    args[args.index("--epochs") + 1], args[args.index("--holdout") + 1] = "2", "0"
    result = cli(*args)
    assert result.exit_code == 0 and "no held-out takes: last epoch 1 kept" in " ".join(result.output.split())
    metrics = strict_json(tmp_path / "run" / "metrics.json")  # NaN losses until the thirteenth session
    assert metrics["settings"]["best_epoch"] == 1 and metrics["settings"]["holdout_losses"] == [None, None]
    strict_json(tmp_path / "run" / "head.json")
    state_file = tmp_path / "run" / "checkpoint" / "state.json"
    state = strict_json(state_file)
    assert state["best_epoch"] == 1
    # a checkpoint after epoch 0 as written before the thirteenth session: NaN for "no held-out takes"
    state_file.write_text(json.dumps({**state, "epoch": 0, "best_epoch": 0, "best_loss": math.nan,
                                      "holdout_losses": [math.nan]}))
    assert cli(*args, "--resume").exit_code == 0
    assert strict_json(tmp_path / "run" / "metrics.json")["settings"]["holdout_losses"] == [None, None]
    strict_json(tmp_path / "run" / "head.json")
    strict_json(state_file)


@pytest.mark.parametrize("into", ["a finetune run", "a fit-head cell", "a fit-head grid", "a finetune run under way",
                                  "another run's adapter", "a feature cache", "the download root"])
def test_evaluate_refuses_an_out_folder_of_another_run(world, fitted_cell, tmp_path, into):
    """Its metrics.json and predictions.jsonl would be replaced by those of the model evaluated, with no word; files
    in a run's adapter/ would change the hash it is checked against."""
    under_way = tmp_path / "under-way"  # a finetune run before its first results: config.json and checkpoint/ only
    shutil.copytree(world / "run" / "checkpoint", under_way / "checkpoint")
    shutil.copy(world / "run" / "config.json", under_way / "config.json")
    folder, out = {"a finetune run": (world / "run",) * 2, "a fit-head cell": (fitted_cell,) * 2,
                   "a fit-head grid": (fitted_cell.parent,) * 2, "a finetune run under way": (under_way,) * 2,
                   "another run's adapter": (world / "run" / "adapter", world / "run" / "adapter" / "eval"),
                   "a feature cache": (world / "cache-fp32",) * 2, "the download root": (world / "data",) * 2}[into]
    checkpoint = world / "run" if into in ("a fit-head cell", "a fit-head grid", "a feature cache") else fitted_cell
    files = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != "run.lock"}
    result = cli("evaluate", "--checkpoint", checkpoint, "--root", world / "data", "--out", out)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and ("holds another run's" in said or "which the run" in said
                                      or "is a feature cache's folder" in said or "is an EgoExo4D download root" in said), said
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != "run.lock"} == files


def test_a_cell_kept_in_its_cache_folder_is_evaluated_into_its_own_folder(world, fitted_cell, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world / "cache-fp32", cache)
    cell = cache / "heads" / fitted_cell.name  # as `fit-head --cache cache --out cache/heads` makes it
    shutil.copytree(fitted_cell, cell)
    info = json.loads((cell / "head.json").read_text())
    (cell / "head.json").write_text(json.dumps({**info, "cache": str(cache)}))
    result = cli("evaluate", "--checkpoint", cell, "--root", world / "data", "--out", cell / "eval")
    assert result.exit_code == 0, result.output  # until the thirteenth session: refused as inside the cache
    evaluated = [json.loads(line)["predicted"] for line in (cell / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert evaluated == [json.loads(line)["predicted"] for line in (fitted_cell / "predictions.jsonl").read_text().splitlines()]


def test_one_evaluate_writes_a_folder_at_a_time_and_the_next_removes_a_killed_ones_temporary_files(
        world, fitted_cell, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    killed = out / ".metrics.json.0a1b2c3d.tmp"  # write_bytes_atomic's name, left by an evaluate killed mid-write
    killed.write_text("{")
    users = out / ".notes.tmp"
    users.write_text("mine")
    with writer_lock.first_writer(out / writer_lock.RUN_LOCK, "that folder"):  # another evaluate, still running
        refused = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(fitted_cell), "--root", str(world / "data"),
                                           "--out", str(out)])
        assert refused.exit_code == 2 and "is being written by another run" in " ".join(refused.output.split())
        assert killed.exists() and not (out / "metrics.json").exists()
    result = cli("evaluate", "--checkpoint", fitted_cell, "--root", world / "data", "--out", out)
    assert result.exit_code == 0, result.output
    assert not killed.exists() and users.read_text() == "mine" and (out / "metrics.json").is_file()


def test_evaluate_and_finetune_refuse_a_split_without_takes(world, tmp_path):
    data = shutil.copytree(world / "data", tmp_path / "data")
    (data / "annotations" / "proficiency_demonstrator_val.json").write_text(json.dumps({"annotations": []}))
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(data),
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and "the val annotations list no takes" in result.output
    result = CliRunner().invoke(app, [str(a) for a in finetune_args(data, world / "tiny", tmp_path / "run")])
    assert result.exit_code == 2 and "the val annotations list no takes" in result.output
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_predict_on_a_take_folder(world, tmp_path):
    take = load_takes(world / "data", "val")[0]
    folder = take.videos["ego"].parent  # .../frame_aligned_videos/downscaled/448
    result = subprocess.run([sys.executable, "-m", "stages.cli", "predict", "--checkpoint", str(world / "run"), "--json",
                             str(folder.parent.parent.parent)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout[result.stdout.index("["):])
    expected = next(json.loads(l) for l in (world / "run" / "predictions.jsonl").read_text().splitlines()
                    if json.loads(l)["take_uid"] == take.take_uid)
    assert row["predicted"] == expected["predicted"]
    assert np.allclose(list(row["probabilities"].values()), expected["probabilities"], atol=1e-3)


def test_resume_after_sigkill_equals_an_uninterrupted_run(world, tmp_path):
    command = [sys.executable, "-m", "stages.cli", *map(str, finetune_args(world / "data", world / "tiny", tmp_path / "run"))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(state.read_text())["epoch"] < 2, "the run should have been killed before its last epoch"
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "after epoch" in resumed.stdout  # continued, not started over
    want = json.loads((world / "run" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert (tmp_path / "run" / "predictions.jsonl").read_text() == (world / "run" / "predictions.jsonl").read_text()
    assert (tmp_path / "run" / "head.safetensors").read_bytes() == (world / "run" / "head.safetensors").read_bytes()


@pytest.fixture(scope="module")
def fitted_cell(world):
    cache = world / "cache-fp32"
    for split in ("train", "val"):
        result = cli("extract", "--root", world / "data", "--split", split, "--cache", cache, "--backbone", world / "tiny",
                     "--frames", FRAMES, "--precision", "fp32", "--workers", "0")
        assert result.exit_code == 0, result.output
    result = cli("fit-head", "--cache", cache, "--out", world / "heads", "--views", "ego+exos", *TINY_HEAD,
                 "--epochs", "5", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    return world / "heads" / "ego+exos__crossview__seed0"


def test_parity_of_end_to_end_evaluation_with_fit_head(world, fitted_cell, tmp_path):
    result = cli("evaluate", "--checkpoint", fitted_cell, "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    fit = [json.loads(l) for l in (fitted_cell / "predictions.jsonl").read_text().splitlines()]
    end_to_end = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["take_uid"] for r in fit] == [r["take_uid"] for r in end_to_end]
    assert [r["predicted"] for r in fit] == [r["predicted"] for r in end_to_end]
    difference = max(np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() for a, b in zip(fit, end_to_end))
    assert difference < 1e-3


@pytest.mark.parametrize("frozen", [True, False])  # False: as compiled caches were made before frozen weights
def test_a_cell_from_a_compiled_cache_is_evaluated_with_the_compiled_backbone(world, tmp_path, frozen, monkeypatch):
    cache = tmp_path / "cache-compiled"
    for split in ("train", "val"):
        result = cli("extract", "--root", world / "data", "--split", split, "--cache", cache, "--backbone", world / "tiny",
                     "--frames", FRAMES, "--workers", "0", "--compile", "--frozen-weights" if frozen else "--no-frozen-weights")
        assert result.exit_code == 0, result.output
    result = cli("fit-head", "--cache", cache, "--out", tmp_path / "heads", "--views", "ego+exos", *TINY_HEAD, "--epochs", "5")
    assert result.exit_code == 0, result.output
    cell = tmp_path / "heads" / "ego+exos__crossview__seed0"
    assert read_model_spec(cell).compiled and read_model_spec(cell).frozen_weights == frozen
    result = cli("evaluate", "--checkpoint", cell, "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    fit = [json.loads(l) for l in (cell / "predictions.jsonl").read_text().splitlines()]
    end_to_end = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in fit] == [r["predicted"] for r in end_to_end]
    difference = max(np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() for a, b in zip(fit, end_to_end))
    assert difference < 1e-3
    # the tokens themselves are the cache's, bit for bit: the same compiled graph on the same clips
    model, _ = load_skill_model(cell)
    val = FeatureCache.open(cache).read("val")
    take = next(t for t in load_takes(world / "data", "val") if t.take_uid == val.records[0].take_uid)
    clips, present, _, _, _ = TakeClips([take], VIEWS, ClipSampling(FRAMES))[0]
    with torch.inference_mode(), bb.autocast_context(torch.device("cpu")):
        tokens = model.tokens(clips[None], present[None])
    np.testing.assert_array_equal(tokens[0].half().numpy(), val.tokens[0])
    # the tiny backbone rounds alike either way, so check that the cache's forward is the one asked for
    asked = []
    monkeypatch.setattr(bb, "compiled_encode_clips", lambda frozen_weights: asked.append(frozen_weights))
    load_skill_model(cell)
    assert asked == [frozen]


def test_a_cell_from_a_window_cache_is_evaluated_on_window_clips(world, tmp_path):
    cache = tmp_path / "cache-window"
    for split in ("train", "val"):
        result = cli("extract", "--root", world / "data", "--split", split, "--cache", cache, "--backbone", world / "tiny",
                     "--frames", FRAMES, "--workers", "0", "--sampling", "window")
        assert result.exit_code == 0, result.output
    result = cli("fit-head", "--cache", cache, "--out", tmp_path / "heads", "--views", "ego+exos", *TINY_HEAD, "--epochs", "5")
    assert result.exit_code == 0, result.output
    cell = tmp_path / "heads" / "ego+exos__crossview__seed0"
    model, spec = load_skill_model(cell)
    assert spec.clip_sampling == ClipSampling(FRAMES, "window")
    val = FeatureCache.open(cache).read("val")
    take = next(t for t in load_takes(world / "data", "val") if t.take_uid == val.records[0].take_uid)
    clips, present, _, _, _ = TakeClips([take], VIEWS, spec.clip_sampling)[0]
    with torch.inference_mode(), bb.autocast_context(torch.device("cpu")):
        tokens = model.tokens(clips[None], present[None])
    np.testing.assert_array_equal(tokens[0].half().numpy(), val.tokens[0])  # the cache's clips, bit for bit
    result = cli("evaluate", "--checkpoint", cell, "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]["sampling"] == "window"
    fit = [json.loads(l) for l in (cell / "predictions.jsonl").read_text().splitlines()]
    end_to_end = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    difference = max(np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() for a, b in zip(fit, end_to_end))
    assert difference < 1e-3


def test_finetune_with_window_sampling_trains_and_evaluates_on_window_clips(world, tmp_path, monkeypatch):
    seen = []

    def recording(loader, stage):
        def wrapper(takes, views, sampling, *args, **kwargs):
            seen.append((stage, sampling, args[2] if len(args) > 2 else kwargs.get("moved_windows")))
            return loader(takes, views, sampling, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(finetune_module, "clip_loader", recording(finetune_module.clip_loader, "train"))
    monkeypatch.setattr(evaluation, "clip_loader", recording(evaluation.clip_loader, "evaluation"))
    result = cli(*finetune_args(world / "data", world / "tiny", tmp_path / "run", "--sampling", "window", "--epochs", "2",
                                "--seed", "5"))
    assert result.exit_code == 0, result.output
    window = ClipSampling(FRAMES, "window")
    # training clips' windows move per epoch (seeded); held-out and val clips stay centred
    assert [entry for entry in seen if entry[0] == "train"] == [("train", window, (5, 0)), ("train", window, (5, 1))]
    assert {entry[1:] for entry in seen if entry[0] == "evaluation"} == {(window, None)} and len(seen) >= 5
    centre = cli(*finetune_args(world / "data", world / "tiny", tmp_path / "centre", "--sampling", "window", "--epochs", "1",
                                "--train-windows", "centre"))
    assert centre.exit_code == 0, centre.output
    assert seen[-3][0] == "train" and seen[-3][2] is None  # training, held-out and val clips: all centred
    seen.clear()
    assert read_model_spec(tmp_path / "run").clip_sampling == ClipSampling(FRAMES, "window")  # and evaluate's
    # extract with the run's adapter samples as the run trained (frames and sampling), unless told otherwise
    extract = ["extract", "--root", world / "data", "--split", "val", "--workers", "0", "--views", "ego",
               "--adapter", tmp_path / "run"]
    for cache, given, frames, sampling in (("followed", [], FRAMES, "window"),
                                           ("given", ["--sampling", "uniform", "--frames", "8"], 8, "uniform")):
        result = cli(*extract, "--cache", tmp_path / cache, *given)
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / cache / "extract-val.json").read_text())
        assert (saved["frames"], saved["sampling"]) == (frames, sampling)
        fingerprint = FeatureCache.open(tmp_path / cache).spec.fingerprint
        assert (fingerprint["frames"], fingerprint["preprocessing"]["sampling"]) == (frames, SAMPLING_NAMES[sampling])


def test_evaluate_records_the_precision_of_a_cells_head_beside_its_caches(world, fitted_cell, tmp_path):
    cell = shutil.copytree(fitted_cell, tmp_path / "cell")
    info = json.loads((cell / "head.json").read_text())
    (cell / "head.json").write_text(json.dumps({**info, "precision": "bf16"}))  # as fit-head --precision bf16 on an fp32 cache
    result = cli("evaluate", "--checkpoint", cell, "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert (settings["precision"], settings["head_precision"]) == ("fp32", "bf16")


@pytest.mark.parametrize("fusion, warned", [("concat", True), ("crossview", False)])
def test_predict_warns_when_an_order_dependent_head_gets_a_camera_in_another_slot(world, fitted_cell, tmp_path, fusion,
                                                                                   warned):
    cell = fitted_cell
    if fusion == "concat":  # a head that tells the exo slots apart
        result = cli("fit-head", "--cache", world / "cache-fp32", "--out", tmp_path / "heads", "--views", "ego+exos",
                     "--fusion", "concat", *TINY_HEAD, "--epochs", "1", "--precision", "fp32")
        assert result.exit_code == 0, result.output
        cell = tmp_path / "heads" / "ego+exos__concat__seed0"
    take = load_takes(world / "data", "val")[0]
    folder = tmp_path / "take"
    folder.mkdir()
    for view, name in zip(VIEWS, ["aria01_214-1", "cam01", "cam02", "cam03", "cam05"]):  # cam05 fills exo4
        shutil.copy(take.videos[view], folder / f"{name}.mp4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli("predict", "--checkpoint", cell, folder)
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught if "tells view slots apart" in str(w.message)]
    assert len(said) == int(warned) and (not warned or "cam05.mp4 as exo4" in said[0])


def test_evaluate_refuses_a_model_whose_cache_backbone_or_adapter_changed(world, fitted_cell, tmp_path):
    def evaluate(checkpoint):
        return CliRunner().invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--root", str(world / "data"),
                                        "--out", str(tmp_path / "eval")])

    def cell_on(cache):  # the cell, pointed at a copy of its cache
        shutil.copytree(world / "cache-fp32", cache)
        cell = shutil.copytree(fitted_cell, cache.with_name(cache.name + "-cell"))
        info = json.loads((cell / "head.json").read_text())
        (cell / "head.json").write_text(json.dumps({**info, "cache": str(cache)}))
        return cell

    rebuilt = cell_on(tmp_path / "rebuilt")  # re-extracted into the same folder with other frames
    spec = json.loads((tmp_path / "rebuilt" / "cache.json").read_text())
    spec["fingerprint"]["frames"] = 8
    (tmp_path / "rebuilt" / "cache.json").write_text(json.dumps(spec))
    result = evaluate(rebuilt)
    assert result.exit_code == 2 and "fingerprint.frames: the head was trained on 4, the cache now has 8" in result.output

    other_weights = cell_on(tmp_path / "moved")  # its backbone folder now holds other weights
    other = str(bb.save_tiny_backbone(tmp_path / "tiny1", seed=1))
    for extract_config in (tmp_path / "moved").glob("extract-*.json"):
        extract_config.write_text(json.dumps({**json.loads(extract_config.read_text()), "backbone": other}))
    result = evaluate(other_weights)
    assert result.exit_code == 2 and "no longer holds the weights it was trained with" in result.output

    relu = shutil.copytree(world / "tiny", tmp_path / "tiny-relu")  # the same weights, another activation
    (relu / "config.json").write_text(json.dumps({**json.loads((relu / "config.json").read_text()), "hidden_act": "relu"}))
    rearchitected = cell_on(tmp_path / "rearchitected")
    for extract_config in (tmp_path / "rearchitected").glob("extract-*.json"):
        extract_config.write_text(json.dumps({**json.loads(extract_config.read_text()), "backbone": str(relu)}))
    result = evaluate(rearchitected)
    assert result.exit_code == 2 and "has the weights it was trained with, but not the architecture" in result.output
    assert "hidden_act: 'gelu' then, 'relu' now" in " ".join(result.output.split())
    relu_run = shutil.copytree(world / "run", tmp_path / "relu-run")  # a LoRA run, its base folder re-configured
    settings = json.loads((relu_run / "config.json").read_text())
    (relu_run / "config.json").write_text(json.dumps({**settings, "backbone": str(relu)}))
    result = evaluate(relu_run)
    assert result.exit_code == 2 and "but not the architecture" in result.output

    run = shutil.copytree(world / "run", tmp_path / "run")
    (run / "adapter" / "adapter_config.json").write_text((run / "adapter" / "adapter_config.json").read_text() + " ")
    result = evaluate(run)
    assert result.exit_code == 2 and "changed since it was trained" in result.output
    shutil.rmtree(run / "adapter")
    result = evaluate(run)
    assert result.exit_code == 2 and "trained with tune=lora, but its adapter/ folder is missing" in result.output


def test_zero_lora_updates_give_the_frozen_cache_logits(world, fitted_cell):
    head, info = load_head(fitted_cell)
    adapted = bb.add_lora(bb.load_backbone(str(world / "tiny"), FRAMES), bb.LoraSettings(r=4))  # lora_B = 0
    model = SkillModel(adapted, head, HeadConfig(**info["head"]), round_like_cache=True).eval()
    cache = FeatureCache.open(world / "cache-fp32")
    val = cache.read("val")
    takes = {t.take_uid: t for t in load_takes(world / "data", "val")}
    clips, present, _, _, _ = TakeClips([takes[r.take_uid] for r in val.records[:2]], VIEWS, ClipSampling(FRAMES))[0]
    with torch.inference_mode():
        end_to_end = model(clips[None], present[None])
        cached = head(head_inputs(torch.from_numpy(val.tokens[:1]).float(), HeadConfig(**info["head"])),
                      torch.from_numpy(val.present[:1]))
    torch.testing.assert_close(end_to_end, cached, atol=1e-4, rtol=1e-4)


def test_extract_with_a_finetuned_adapter_has_another_fingerprint(world, fitted_cell, tmp_path):
    refused = CliRunner().invoke(app, ["extract", "--root", str(world / "data"), "--split", "val", "--cache",
                                       str(world / "cache-fp32"), "--backbone", str(world / "tiny"), "--frames", str(FRAMES),
                                       "--precision", "fp32", "--workers", "0", "--adapter", str(world / "run")])
    assert refused.exit_code == 2 and "fingerprint.adapter_sha256: cache has null" in refused.output
    fresh = cli("extract", "--root", world / "data", "--split", "val", "--cache", tmp_path / "adapted", "--backbone",
                world / "tiny", "--frames", FRAMES, "--precision", "fp32", "--workers", "0", "--adapter", world / "run")
    assert fresh.exit_code == 0, fresh.output
    assert FeatureCache.open(tmp_path / "adapted").spec.fingerprint["adapter_sha256"] == bb.adapter_hash(world / "run")
    adapted, base = (FeatureCache.open(folder).read("val").tokens.astype(np.float32)
                     for folder in (tmp_path / "adapted", world / "cache-fp32"))
    assert np.abs(adapted - base).max() > 1e-3  # the adapter's weights were applied, not only hashed


def test_extract_with_a_runs_adapter_uses_the_runs_backbone_and_refuses_other_weights(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default backbone, were it used, could not load here
    args = ["extract", "--root", world / "data", "--split", "val", "--frames", FRAMES, "--workers", "0",
            "--adapter", world / "run" / "adapter", "--views", "ego"]
    assert cli(*args, "--cache", tmp_path / "own").exit_code == 0  # no --backbone: the run's (world/tiny)
    assert json.loads((tmp_path / "own" / "extract-val.json").read_text())["backbone"] == str((world / "tiny").resolve())
    from pipeline.extraction import ExtractConfig, with_run_defaults

    given = ExtractConfig(root=world / "data", backbone=bb.DEFAULT_BACKBONE, adapter=world / "run")
    assert with_run_defaults(given).backbone == bb.DEFAULT_BACKBONE  # given, even if it is the default: then checked
    other = bb.save_tiny_backbone(tmp_path / "other-tiny", seed=1)
    refused = CliRunner().invoke(app, [str(a) for a in [*args, "--cache", tmp_path / "other", "--backbone", other]])
    assert refused.exit_code == 2 and "was trained on the backbone" in refused.output
    assert not (tmp_path / "other").exists()
    refused_at_other_frames = CliRunner().invoke(app, [str(a) for a in [*args, "--cache", tmp_path / "other8", "--backbone",
                                                                        other, "--frames", FRAMES * 2]])
    assert refused_at_other_frames.exit_code == 2 and "was trained on the backbone" in refused_at_other_frames.output
    same_weights = tmp_path / "copy-of-tiny"
    shutil.copytree(world / "tiny", same_weights)  # another folder, the same weights: accepted, at another T too
    assert cli(*args, "--cache", tmp_path / "copy", "--backbone", same_weights, "--frames", FRAMES * 2).exit_code == 0
    relu = shutil.copytree(world / "tiny", tmp_path / "tiny-relu")  # the same weights, another activation: refused
    (relu / "config.json").write_text(json.dumps({**json.loads((relu / "config.json").read_text()), "hidden_act": "relu"}))
    refused = CliRunner().invoke(app, [str(a) for a in [*args, "--cache", tmp_path / "relu", "--backbone", relu]])
    assert refused.exit_code == 2 and "the same weights but another architecture (hidden_act:" in refused.output


def test_evaluate_runs_the_backbone_with_the_runs_adapter(world):
    model, _ = load_skill_model(world / "run")
    clips, present, _, _, _ = TakeClips(load_takes(world / "data", "val")[:1], VIEWS, ClipSampling(FRAMES))[0]
    with torch.inference_mode(), bb.autocast_context(torch.device("cpu")):
        tokens = model.tokens(clips[None], present[None])
        with model.backbone.disable_adapter():  # AttributeError if no adapter was loaded
            base_tokens = model.tokens(clips[None], present[None])
    assert (tokens - base_tokens).abs().max() > 1e-3


def test_a_fit_head_cell_is_evaluated_in_backbone_forwards_of_its_caches_size(world, fitted_cell, monkeypatch):
    """bf16 matmuls round differently with the number of rows: a base-size backbone's tokens moved by up to 0.02 (and
    cells' probabilities by 2e-3) when evaluate ran 2 takes' clips in one forward where extract had run one clip."""
    model, spec = load_skill_model(fitted_cell)
    assert spec.clips_per_forward == 1  # the cache was extracted on the CPU without --batch-size
    run, _ = load_skill_model(world / "run")
    assert run.clips_per_forward is None  # a finetune run: trained on batches, any batching will do
    sizes = []
    encode = bb.encode_clips
    monkeypatch.setattr(bb, "encode_clips", lambda backbone, clips: sizes.append(len(clips)) or encode(backbone, clips))
    clips, present, _, _, _ = TakeClips(load_takes(world / "data", "val")[:1], VIEWS, ClipSampling(FRAMES))[0]
    with torch.inference_mode():
        model.tokens(clips[None].expand(2, *clips.shape), present[None].expand(2, *present.shape))
    assert sizes == [1] * int(present.sum()) * 2


def test_rank_shares_are_disjoint_and_equal_sized():
    from pipeline.distributed import Ranks
    from pipeline.finetune import rank_share

    order = [5, 3, 8, 1, 9, 0, 7]
    shares = [rank_share(order, Ranks(rank, 2)) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 4
    assert set(shares[0][:3]) | set(shares[1][:3]) | {shares[0][3]} == set(order)
    assert rank_share(order, Ranks()) == order


def test_torchrun_two_ranks_finetune_with_ddp(world, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    args = finetune_args(world / "data", world / "tiny", tmp_path / "ddp")
    args[args.index("--epochs") + 1] = "2"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradient_checkpointing" not in result.stderr  # checkpointing enabled by transformers' current name, quietly
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["epoch"] == 1
    fit_takes = int((~stratified_holdout(np.array([int(t.label) for t in load_takes(world / "data", "train")]), 0.2)).sum())
    assert len(state["train_losses"]) == 2 * math.ceil(math.ceil(fit_takes / 2) / 4)  # rank 0's steps: its half, batch 4
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["num_takes"] == len(load_takes(world / "data", "val"))
    resumed_other_size = CliRunner().invoke(app, [str(a) for a in args] + ["--resume"])
    assert resumed_other_size.exit_code == 2 and "same world size" in resumed_other_size.output
    assert "finetune epoch" not in resumed_other_size.output  # no progress bar before the first step
    # killed right after the first checkpoint, then resumed: every rank continues its own dropout and data seeds
    crashing = tmp_path / "crash_after_first_checkpoint.py"
    crashing.write_text(CRASH_AFTER_FIRST_CHECKPOINT)
    args[args.index("--out") + 1] = tmp_path / "killed"
    killed = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(crashing), *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["epoch"] == 0
    # rank 0 alone rewrites best.safetensors from the checkpoint on resume; its failure (here the path is a folder)
    # used to leave rank 1 at the next barrier, to die in gloo once rank 0 had exited
    broken = Path(shutil.copytree(tmp_path / "killed", tmp_path / "broken"))
    (broken / "best.safetensors").unlink(missing_ok=True)
    (broken / "best.safetensors" / "in-the-way").mkdir(parents=True)
    refused = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
                              *map(str, args[:args.index("--out")]), "--out", str(broken), *map(str, args[args.index("--out") + 2:]),
                              "--resume"], capture_output=True, text=True, timeout=600)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1 and "Connection closed" not in said and root_cause(said) == (0, 1), said[-3000:]
    assert "IsADirectoryError" in said and "restore_best_weights" in said, said[-3000:]
    resumed = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli", *map(str, args),
                              "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 0" in resumed.stdout
    assert (tmp_path / "killed" / "head.safetensors").read_bytes() == (tmp_path / "ddp" / "head.safetensors").read_bytes()


RECORDING_DDP = """
import atexit, hashlib, json, os
from torch.nn.parallel import DistributedDataParallel
from stages.cli import main

record = {"no_sync": 0}
wrapped, entered = DistributedDataParallel.__init__, DistributedDataParallel.no_sync


def init(self, module, *args, **kwargs):
    record["module"] = module
    wrapped(self, module, *args, **kwargs)


def no_sync(self):
    record["no_sync"] += 1
    return entered(self)


def dump():  # this rank's count and trained weights, at exit
    trained = b"".join(p.detach().numpy().tobytes() for p in record["module"].parameters() if p.requires_grad)
    with open(os.path.join(os.environ["RECORDS"], "rank" + os.environ["RANK"] + ".json"), "w") as out:
        json.dump({"no_sync": record["no_sync"], "weights": hashlib.sha256(trained).hexdigest()}, out)


DistributedDataParallel.__init__, DistributedDataParallel.no_sync = init, no_sync
atexit.register(dump)
main()
"""


def test_ddp_skips_the_all_reduce_inside_an_accumulation_group_and_ranks_stay_equal(world, tmp_path):
    script = tmp_path / "recording_ddp.py"
    script.write_text(RECORDING_DDP)
    args = finetune_args(world / "data", world / "tiny", tmp_path / "run", "--batch-size", "1", "--grad-accum", "2")
    args[args.index("--epochs") + 1] = "1"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RECORDS": str(tmp_path)}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # 8 fitted takes: 4 batches of 1 per rank, groups of 2: the first batch of each group keeps its gradient local
    assert [rank["no_sync"] for rank in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and the update still averages both ranks' gradients


CRASH_AFTER_FIRST_CHECKPOINT = """
import os
import pipeline.finetune as finetune
from stages.cli import main

save = finetune.save_epoch_checkpoint


def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os._exit(9)


finetune.save_epoch_checkpoint = save_then_die
main()
"""


def test_full_finetune_saves_a_backbone_that_extract_loads(world, tmp_path):
    args = finetune_args(world / "data", world / "tiny", tmp_path / "full", "--tune", "full", "--sampling", "window")
    args[args.index("--epochs") + 1] = "1"
    assert cli(*args).exit_code == 0
    saved = tmp_path / "full" / "backbone"
    assert (saved / "config.json").is_file() and not (tmp_path / "full" / "adapter").exists()
    result = cli("extract", "--root", world / "data", "--split", "val", "--cache", tmp_path / "cache", "--backbone", saved,
                 "--workers", "0")  # no --frames: the run's, as with a run's --adapter
    assert result.exit_code == 0, result.output
    spec = FeatureCache.open(tmp_path / "cache").spec
    assert spec.frames == FRAMES and spec.fingerprint["preprocessing"]["sampling"] == SAMPLING_NAMES["window"]
    tuned = FeatureCache.open(tmp_path / "cache").spec.fingerprint["weights_sha256"]
    assert tuned != bb.weights_hash(bb.load_backbone(str(world / "tiny"), FRAMES))
    load_skill_model(tmp_path / "full")  # its own backbone/, as trained
    shutil.copy(world / "tiny" / "model.safetensors", saved / "model.safetensors")  # backbone/ overwritten since
    with pytest.raises(ConfigError, match="the backbone .*backbone changed since it was trained"):
        load_skill_model(tmp_path / "full")


@pytest.mark.parametrize("cell_features, said", [
    ({}, []),  # the run's own backbone, sampling and T
    ({"weights_sha256": "0" * 64, "backbone": "k400"}, ["fitted on features of other backbone weights (k400)"]),
    ({"weights_sha256": "0" * 64, "frames": 8}, ["fitted on clips of 8 frames; this run's have 4"]),  # the hashes
    # cannot be compared at another T
    ({"adapter_sha256": "a" * 64}, ["fitted on features of an adapted backbone"]),
    ({"preprocessing": {"sampling": SAMPLING_NAMES["window"]}}, ["was fitted on window clips; this run samples uniform"]),
])
def test_init_head_notes_what_differs_in_the_features_the_cell_was_fitted_on(tmp_path, cell_features, said):
    fingerprint = {"backbone": "tiny", "weights_sha256": "f" * 64, "adapter_sha256": None, "frames": FRAMES,
                   "preprocessing": {"sampling": SAMPLING_NAMES["uniform"]}} | cell_features
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "head.json").write_text(json.dumps({"cache_fingerprint": fingerprint}))
    config = finetune_module.FinetuneConfig(root=tmp_path, out=tmp_path / "run", frames=FRAMES, init_head=tmp_path / "cell")
    notes = finetune_module.init_head_notes(config, weights_sha256="f" * 64)
    assert len(notes) == len(said) and all(part in note for part, note in zip(said, notes))


def test_init_head_warm_starts_from_a_fit_head_cell(world, fitted_cell, tmp_path):
    from safetensors.torch import load_file

    args = finetune_args(world / "data", world / "tiny", tmp_path / "warm", "--init-head", fitted_cell, "--sampling", "window")
    args[args.index("--epochs") + 1], args[args.index("--lr") + 1] = "1", "0"
    args[args.index("--hidden") + 1] = "64"  # the cell's head has 32: it keeps its size, and the run says so
    result = cli(*args)
    assert result.exit_code == 0 and "the head keeps its trained size" in " ".join(result.output.split())
    assert "was fitted on uniform clips; this run samples window" in " ".join(result.output.split())
    assert "other backbone weights" not in result.output  # the cell's cache hashed the run's backbone alike
    moved = tmp_path / "cell-without-its-cache"  # a warm start needs the cell alone, not its cache
    shutil.copytree(fitted_cell, moved)
    head = json.loads((moved / "head.json").read_text())
    (moved / "head.json").write_text(json.dumps({**head, "cache": str(tmp_path / "deleted-cache")}))
    args[args.index("--init-head") + 1], args[args.index("--out") + 1] = str(moved), str(tmp_path / "warm2")
    assert cli(*args).exit_code == 0
    saved = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert saved["hidden"] == json.loads((tmp_path / "warm" / "head.json").read_text())["head"]["hidden"] == 32
    started, finished = load_file(fitted_cell / "head.safetensors"), load_file(tmp_path / "warm" / "head.safetensors")
    assert started.keys() == finished.keys()
    assert all(torch.equal(started[k], finished[k]) for k in started)  # lr 0: the warm-started head is kept as is
    mismatch = finetune_args(world / "data", world / "tiny", tmp_path / "bad", "--init-head", fitted_cell)
    mismatch[mismatch.index("--views") + 1] = "ego"
    result = CliRunner().invoke(app, [str(a) for a in mismatch])
    assert result.exit_code == 2 and "trained for views" in result.output


@pytest.mark.parametrize("field,value,message", [
    ("holdout", 1.0, "FinetuneConfig.holdout: must be in [0, 0.5)"),
    ("warmup_ratio", 3.0, "FinetuneConfig.warmup_ratio: must be in [0, 1.0)"),
    ("lora_dropout", -0.1, "FinetuneConfig.lora_dropout"),
    ("lr", -1.0, "lr and weight_decay must be >= 0"),
    ("lr", float("nan"), "lr and weight_decay must be >= 0 and finite"),
    ("hidden", 0, "FinetuneConfig.hidden: must be >= 1"),
    ("workers", -1, "FinetuneConfig.workers: must be >= 0"),
    ("max_grad_norm", -1.0, "FinetuneConfig.max_grad_norm: must be >= 0"),
    ("max_grad_norm", float("nan"), "FinetuneConfig.max_grad_norm: must be >= 0"),
    ("views", "ego+bogus", "bogus"),
])
def test_finetune_settings_are_checked_before_any_work(field, value, message):
    from pipeline.config import ConfigError
    from pipeline.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as info:
        FinetuneConfig(root=Path("r"), out=Path("o"), **{field: value})
    assert message in str(info.value)


@pytest.mark.parametrize("max_norm", [0.05, 0])
def test_updates_see_the_gradient_clipped_to_max_grad_norm(world, tmp_path, max_norm):
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)  # every optimizer's
    try:
        args = finetune_args(world / "data", world / "tiny", tmp_path / "run", "--max-grad-norm", max_norm)
        args[args.index("--epochs") + 1] = "1"
        assert cli(*args).exit_code == 0
    finally:
        handle.remove()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert len(norms) == len(state["train_losses"]) >= 2  # no accumulation: one update per batch
    if max_norm:
        assert max(norms) <= max_norm * (1 + 1e-4)
    else:  # the control: without clipping these gradients are larger than the bound above
        assert min(norms) > 0.05


def first_epoch_updates(world, out, grad_accum, emptied, monkeypatch):
    """The gradients each update of a 1-epoch run (batch 1, no clipping) steps with, where the training batches
    numbered in `emptied` have no decodable view (as if every video of their take had failed)."""
    real_loader, updates = finetune_module.clip_loader, []

    class Emptying(list):
        def __init__(self, loader):
            super().__init__((clips, torch.zeros_like(present) if i in emptied else present, labels, rest)
                             for i, (clips, present, labels, rest) in enumerate(loader))

    monkeypatch.setattr(finetune_module, "clip_loader", lambda *args, **kwargs: Emptying(real_loader(*args, **kwargs)))
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: updates.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                                                        if p.grad is not None]))
    try:
        args = finetune_args(world / "data", world / "tiny", out, "--max-grad-norm", 0, "--batch-size", 1,
                             "--grad-accum", grad_accum)
        args[args.index("--epochs") + 1] = "1"
        assert cli(*args).exit_code == 0
    finally:
        handle.remove()
    return updates, json.loads((out / "checkpoint" / "state.json").read_text())


def test_an_update_averages_over_the_batches_that_had_a_decodable_take(world, tmp_path, monkeypatch):
    alone, _ = first_epoch_updates(world, tmp_path / "alone", 1, (), monkeypatch)  # batch 0's gradient alone
    paired, state = first_epoch_updates(world, tmp_path / "paired", 2, {1}, monkeypatch)  # batch 0 + an empty batch 1
    assert len(paired) == -(-len(state["train_losses"]) // 2) >= 2
    assert len(alone[0]) == len(paired[0]) > 0
    for found, expected in zip(paired[0], alone[0]):  # not half of it, as a mean over both batches would be
        torch.testing.assert_close(found, expected)
    skipped, _ = first_epoch_updates(world, tmp_path / "skipped", 2, {0, 1}, monkeypatch)
    assert len(skipped) == len(paired) - 1  # a group without any decodable take makes no update at all,
    scheduled = {run: torch.load(tmp_path / run / "checkpoint" / "optimizer.pt", weights_only=True)["schedule"]["last_epoch"]
                 for run in ("paired", "skipped")}
    assert scheduled["skipped"] == scheduled["paired"] - 1 == len(skipped)  # and uses up no scheduled step


@pytest.mark.parametrize("group_batches, world_size, with_takes, factor", [
    (4, 1, 4, 1.0), (4, 1, 3, 4 / 3), (2, 2, 3, 4 / 3),  # DDP averaged 2 ranks' 2 batches, one of them without takes
    (3, 2, 6, 1.0), (2, 3, 0, None),
])
def test_the_gradient_factor_of_a_group_counts_the_batches_of_every_rank(group_batches, world_size, with_takes, factor):
    assert finetune_module.group_gradient_factor(group_batches, world_size, with_takes) == factor


def test_resume_refuses_other_settings_and_leaves_the_run_alone(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    before = (run / "config.json").read_text()
    args = finetune_args(world / "data", world / "tiny", run, "--resume")
    args[args.index("--lr") + 1] = "0.5"
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "lr: 0.003 -> 0.5" in result.output
    assert (run / "config.json").read_text() == before


def test_resume_refuses_a_backbone_folder_that_now_holds_other_weights(world, tmp_path):
    run = shutil.copytree(world / "run", tmp_path / "run")
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["weights_sha256"] == bb.weights_hash(bb.load_backbone(str(world / "tiny"), FRAMES))
    # as if the folder had held other weights when the run started (the same as it holding others now)
    (run / "checkpoint" / "state.json").write_text(json.dumps({**state, "weights_sha256": "0" * 64}))
    result = CliRunner().invoke(app, [str(a) for a in finetune_args(world / "data", world / "tiny", run, "--resume")])
    assert result.exit_code == 2 and "trained on other backbone weights than" in " ".join(result.output.split())


def test_resume_refuses_train_annotations_that_changed_since_the_run_began_but_not_a_moved_root(world, tmp_path):
    run = shutil.copytree(world / "run", tmp_path / "run")
    moved = shutil.copytree(world / "data", tmp_path / "moved")
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["train_takes_sha256"] == takes_sha256(load_takes(moved, "train"), moved, VIEWS)  # relative to the root
    annotations = moved / "annotations" / "proficiency_demonstrator_train.json"
    document = json.loads(annotations.read_text())
    record = document["annotations"][0]
    record["proficiency_score"] = "Novice" if record["proficiency_score"] != "Novice" else "Late Expert"
    annotations.write_text(json.dumps(document))
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*") if path.is_file() and path.name != "run.lock"}
    result = CliRunner().invoke(app, [str(a) for a in finetune_args(moved, world / "tiny", run, "--resume")])
    assert result.exit_code == 2 and "the train annotations under" in result.output
    assert "changed since the run began" in " ".join(result.output.split())
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_a_second_run_into_a_run_folder_being_written_stops_at_once(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    files = {path: path.stat().st_mtime_ns for path in run.rglob("*") if path.is_file() and path.name != "run.lock"}
    with first_writer(run / "run.lock", "that folder"):  # the run still training there
        result = CliRunner().invoke(app, [str(a) for a in finetune_args(world / "data", world / "tiny", run, "--resume")])
    assert result.exit_code == 2, result.output
    assert f"the run folder {run} is being written by another run (pid {os.getpid()} " in " ".join(result.output.split())
    assert {path: path.stat().st_mtime_ns for path in files} == files  # nothing touched


def test_a_torchrun_into_a_run_folder_being_written_stops_every_rank_with_the_message(world, tmp_path):
    run = shutil.copytree(world / "run", tmp_path / "run")
    torchrun = Path(sys.executable).with_name("torchrun")
    with first_writer(run / "run.lock", "that folder"):  # the run still training there
        launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
                                   *map(str, finetune_args(world / "data", world / "tiny", run, "--resume"))],
                                  capture_output=True, text=True, timeout=300)
    said = " ".join((launched.stdout + launched.stderr).split())
    assert launched.returncode == 1 and "Connection closed" not in said, said[-3000:]
    assert said.count("is being written by another run") == 1 and root_cause(said) == (0, 2), said[-3000:]


def test_a_resumed_finished_run_is_not_complete_until_its_new_evaluation(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped while evaluating")

    monkeypatch.setattr(finetune_module, "evaluate_split", stopped)
    with pytest.raises(RuntimeError, match="stopped while evaluating"):
        CliRunner().invoke(app, [str(a) for a in finetune_args(world / "data", world / "tiny", run, "--resume")],
                           catch_exceptions=False)
    assert (run / "head.json").is_file() and not (run / "metrics.json").exists()


@pytest.mark.parametrize("other", ["grid.json", "cache.json", "config.json"])
def test_a_run_into_a_fit_head_grid_or_a_feature_cache_is_refused_and_leaves_it_as_it_was(world, tmp_path, other):
    """A grid's root holds no finished results, so it passed: the run replaced the grid's config.json and mixed its
    files with the cells'; a feature cache's folder got the run's files among its own."""
    out = tmp_path / "other"
    out.mkdir()
    (out / other).write_text(json.dumps({"kind": "FitHeadConfig"} if other == "config.json" else {"format": 1}))
    result = cli(*finetune_args(world / "data", world / "tiny", out))
    said = " ".join(result.output.split())
    expected = {"grid.json": "it is a fit-head grid", "cache.json": "it is a feature cache",
                "config.json": "a config.json of FitHeadConfig"}[other]
    assert result.exit_code == 2 and "holds another kind of output" in said and expected in said, said
    assert [path.name for path in out.iterdir()] == [other]


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_into_a_finished_runs_folder_without_its_checkpoint_is_refused(world, tmp_path, resume):
    """Its old metrics.json and head would stand beside the new run's config.json, and evaluate would score the old
    model with the new settings (another --sampling, say) without a word."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "checkpoint")  # only needed for --resume: a user may delete it to save space
    files = lambda: {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != "run.lock"}  # noqa: E731
    before = files()
    result = cli(*finetune_args(world / "data", world / "tiny", run, "--sampling", "window", *(["--resume"] * resume)))
    assert result.exit_code == 2 and "holds a finished run (metrics.json" in " ".join(result.output.split())
    assert files() == before


def test_a_refused_run_leaves_no_run_folder_behind(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    annotations = data / "annotations"
    train = json.loads((annotations / "proficiency_demonstrator_train.json").read_text())
    val = json.loads((annotations / "proficiency_demonstrator_val.json").read_text())
    val["annotations"].append(train["annotations"][0])  # a train take in val too
    (annotations / "proficiency_demonstrator_val.json").write_text(json.dumps(val))
    result = CliRunner().invoke(app, [str(a) for a in finetune_args(data, world / "tiny", tmp_path / "run")])
    assert result.exit_code == 2 and "in both the train and val annotations" in result.output
    assert not (tmp_path / "run").exists()


def test_resume_finds_a_checkpoint_left_mid_swap(tmp_path):
    from pipeline.epoch_checkpoints import find_epoch_checkpoint

    def checkpoint(name, epoch, files=("state.json", "trainable.safetensors", "optimizer.pt")):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text(json.dumps({"epoch": epoch}))

    assert find_epoch_checkpoint(tmp_path) is None
    checkpoint("checkpoint.old", 1)  # killed between the two renames of a swap
    assert find_epoch_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    checkpoint("checkpoint.staging", 2)  # the newer one was complete: it wins
    assert find_epoch_checkpoint(tmp_path) == tmp_path / "checkpoint.staging"
    checkpoint("checkpoint", 3, files=("trainable.safetensors",))  # without state.json: not complete
    assert find_epoch_checkpoint(tmp_path) == tmp_path / "checkpoint.staging"
    for files in (("state.json",), ("state.json", "trainable.safetensors")):  # weights or optimizer gone: not either
        shutil.rmtree(tmp_path / "checkpoint")
        checkpoint("checkpoint", 3, files=files)
        assert find_epoch_checkpoint(tmp_path) == tmp_path / "checkpoint.staging"


def test_a_resume_of_a_run_killed_mid_swap_in_its_last_epoch_ends_with_its_checkpoint_in_place(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "checkpoint").rename(run / "checkpoint.staging")  # killed between the renames: the new one still staged,
    shutil.copytree(run / "checkpoint.staging", run / "checkpoint.old")  # the previous one retired
    for name in ("metrics.json", "predictions.jsonl"):  # killed before it finished, as it was
        (run / name).unlink()
    (run / ".metrics.json.k1ll3d00.tmp").write_text("{")  # and while writing its metrics
    assert cli(*finetune_args(world / "data", world / "tiny", run, "--resume")).exit_code == 0
    assert (run / "checkpoint" / "state.json").is_file()
    assert not (run / "checkpoint.staging").exists() and not (run / "checkpoint.old").exists()
    assert not list(run.glob(".*.tmp"))
    assert (run / "predictions.jsonl").read_bytes() == (world / "run" / "predictions.jsonl").read_bytes()


def test_a_save_after_resuming_from_a_staging_checkpoint_never_leaves_only_an_older_one(tmp_path, monkeypatch):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline import epoch_checkpoints as ec

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)

    def save(epoch):
        ec.save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": epoch, "world_size": 1}, [{}])

    save(0)
    save(1)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # epoch 1's swap killed between its renames:
    shutil.copytree(tmp_path / "checkpoint.old", tmp_path / "checkpoint.staging")  # staging holds the newest one
    (tmp_path / "checkpoint.old" / "state.json").write_text(json.dumps({"epoch": 0, "world_size": 1}))
    assert ec.find_epoch_checkpoint(tmp_path) == tmp_path / "checkpoint.staging"  # the resume starts from it

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ec.torch, "save", killed)  # the next save dies while writing epoch 2
    with pytest.raises(KeyboardInterrupt):
        save(2)
    newest = ec.find_epoch_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoint" and json.loads((newest / "state.json").read_text())["epoch"] == 1


def test_a_save_killed_at_its_state_file_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline import epoch_checkpoints as ec

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    save = functools.partial(ec.save_epoch_checkpoint, tmp_path, model, optimizer, schedule, rngs=[{}])
    save(state={"epoch": 0, "world_size": 1})
    written = ec.write_json_atomic

    def killed_at_state(path, value):
        if path.name == "state.json":
            raise KeyboardInterrupt
        written(path, value)

    monkeypatch.setattr(ec, "write_json_atomic", killed_at_state)
    with pytest.raises(KeyboardInterrupt):
        save(state={"epoch": 1, "world_size": 1})
    newest = ec.find_epoch_checkpoint(tmp_path)  # state.json marks a folder complete: written before the swap
    assert newest == tmp_path / "checkpoint" and json.loads((newest / "state.json").read_text())["epoch"] == 0


def test_a_resume_may_change_where_and_how_but_not_what_it_trains(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline.distributed import Ranks
    from pipeline.epoch_checkpoints import load_epoch_checkpoint, save_epoch_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    config = {"lr": 1.0, "max_grad_norm": 1.0, "sampling": "uniform", "train_windows": "random",
              "decay_norms_and_biases": False, "root": "a", "out": "b", "device": "cpu", "workers": 1}
    save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": 0, "world_size": 1, "config": config},
                          [{"cpu": torch.get_rng_state()}])
    load = functools.partial(load_epoch_checkpoint, tmp_path / "checkpoint", optimizer=optimizer, schedule=schedule,
                             ranks=Ranks(), device=torch.device("cpu"))
    moved = {**config, "root": "c", "out": "d", "device": "cuda", "workers": 4}
    assert load(model, config=moved)["epoch"] == 0
    optimizer.step()  # AdamW state tensors, saved below as a CUDA run saves them: tagged with their GPU
    with unittest.mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": 1, "world_size": 1, "config": config},
                              [{"cpu": torch.get_rng_state()}])
    with pytest.raises(RuntimeError, match="CUDA"):  # what torch.load does with them here, unmapped
        torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert load(model, config={**config, "device": "cpu"})["epoch"] == 1  # a CUDA run resumes on a CPU
    another = torch.nn.Sequential(torch.nn.Linear(3, 2))  # its weights are "0.weight": the checkpoint's do not fit
    with pytest.raises(ConfigError, match="checkpoint does not match this model"):
        load(another, config=config)


@pytest.mark.parametrize("damage", ["bits flipped", "bits flipped in the optimizer state", "cut, in a checkpoint from before hashes"])
def test_a_checkpoint_damaged_since_it_was_written_is_refused_naming_the_file(tmp_path, damage):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline.distributed import Ranks
    from pipeline.epoch_checkpoints import load_epoch_checkpoint, save_epoch_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    config = {"lr": 1.0, "max_grad_norm": 1.0, "sampling": "uniform", "train_windows": "random", "decay_norms_and_biases": False}
    save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": 0, "world_size": 1, "config": config},
                          [{"cpu": torch.get_rng_state()}])
    folder = tmp_path / "checkpoint"
    assert set(json.loads((folder / "state.json").read_text())["files_sha256"]) == {"trainable.safetensors", "optimizer.pt"}
    if damage.startswith("bits flipped"):  # still a valid file: only the recorded hash tells
        damaged = folder / ("trainable.safetensors" if damage == "bits flipped" else "optimizer.pt")
        data = bytearray(damaged.read_bytes())
        # the weights' last value; the optimizer's base learning rate, 1e-3 (a float64 in its pickle)
        at = len(data) - 1 if damage == "bits flipped" else data.index(struct.pack(">d", 1e-3)) + 7
        data[at] ^= 0x01
        damaged.write_bytes(bytes(data))
        torch.load(damaged, weights_only=True) if damaged.suffix == ".pt" else None  # still loads
        expected = f"{damaged}: not the file its checkpoint recorded"
    else:
        state = json.loads((folder / "state.json").read_text())
        del state["files_sha256"]
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:100])
        expected = f"{folder / 'optimizer.pt'}: unreadable (RuntimeError"
    with pytest.raises(ConfigError) as raised:
        load_epoch_checkpoint(folder, model, optimizer, schedule, config, Ranks(), torch.device("cpu"))
    assert str(raised.value).startswith(expected) and "cannot resume from it" in str(raised.value)


@pytest.mark.parametrize("best_epoch, restored", [(2, True), (1, False)])
def test_a_resume_restores_the_best_weights_when_its_checkpoint_is_the_best_epoch(tmp_path, best_epoch, restored):
    from pipeline.epoch_checkpoints import restore_best_weights

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainable.safetensors").write_bytes(b"epoch 2")
    (tmp_path / "best.safetensors").write_bytes(b"epoch 1")  # killed after checkpoint 2, before its best weights
    restore_best_weights(tmp_path, tmp_path / "checkpoint", {"epoch": 2, "best_epoch": best_epoch})
    assert (tmp_path / "best.safetensors").read_bytes() == (b"epoch 2" if restored else b"epoch 1")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from pipeline.files import NEW_FILE_MODE, write_json_atomic

    write_json_atomic(tmp_path / "metrics.json", {})
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == NEW_FILE_MODE
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # an ordinary open() under this process's umask
    assert NEW_FILE_MODE == plain.stat().st_mode & 0o777


def test_a_checkpoint_from_before_per_rank_rng_states_still_resumes(tmp_path):
    from safetensors.torch import save_file
    from transformers import get_cosine_schedule_with_warmup

    from pipeline.distributed import Ranks
    from pipeline.epoch_checkpoints import load_epoch_checkpoint, trainable_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    (tmp_path / "checkpoint").mkdir()
    save_file(trainable_state(model), tmp_path / "checkpoint" / "trainable.safetensors")
    rng = torch.get_rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rng},
               tmp_path / "checkpoint" / "optimizer.pt")  # the layout written until 2026-11-29
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 0, "world_size": 1}))
    torch.rand(5)  # moves the generator on
    load = functools.partial(load_epoch_checkpoint, tmp_path / "checkpoint", model, ranks=Ranks(), device=torch.device("cpu"))
    # such runs predate the settings added since: no clipping, uniform clips, every weight decayed (one optimizer group)
    as_trained = {"lr": 1.0, "max_grad_norm": 0.0, "sampling": "uniform", "train_windows": "random",
                  "decay_norms_and_biases": True}
    for changed, message in (({"decay_norms_and_biases": False}, "decay_norms_and_biases: True -> False"),
                             ({"max_grad_norm": 1.0}, "max_grad_norm: 0.0 -> 1.0"),
                             ({"sampling": "window"}, "sampling: 'uniform' -> 'window'")):
        with pytest.raises(ConfigError, match=message):
            load(optimizer=optimizer, schedule=schedule, config={**as_trained, **changed})
    two_groups = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}])
    with pytest.raises(ConfigError, match="its optimizer state does not fit this run"):  # not a ValueError traceback
        load(optimizer=two_groups, schedule=get_cosine_schedule_with_warmup(two_groups, 1, 10), config=as_trained)
    state = load(optimizer=optimizer, schedule=schedule, config=as_trained, weights_sha256="ab" * 32)
    assert state["epoch"] == 0 and torch.equal(torch.get_rng_state(), rng)
    assert state["weights_sha256"] == "ab" * 32  # unrecorded then: kept from now on, so later resumes check it


def test_a_take_without_any_decodable_view_gets_the_prior_and_no_gradient(world, tmp_path):
    model, _ = load_skill_model(world / "run")
    prior = json.loads((world / "run" / "head.json").read_text())["label_prior"]
    take, other = load_takes(world / "data", "val")[:2]
    broken = dataclasses.replace(take, videos={view: tmp_path / "empty.mp4" for view in take.videos})
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.warns(UserWarning, match=f"take {take.take_uid}, view ego: .*empty.mp4.*treated as absent"):
        clips, present, _, _ = next(iter(clip_loader([broken, other], VIEWS, ClipSampling(FRAMES), batch_size=2, workers=0)))
    assert not present[0].any() and present[1].all()
    autocast = bb.autocast_context(torch.device("cpu"))  # the artifact's bf16 backbone, as evaluate runs it
    with autocast:
        logits = model.train()(clips, present)
    torch.testing.assert_close(torch.softmax(logits[0], 0), torch.tensor(prior, dtype=torch.float32))
    logits[0].sum().backward()  # the prior row reaches no weight of the head
    assert all(p.grad is None or (p.grad == 0).all() for p in model.head.parameters())
    with torch.inference_mode(), autocast:
        torch.testing.assert_close(model.eval()(clips, present)[1:], model(clips[1:], present[1:]))
    skewed = tmp_path / "skewed-run"  # the demo's fitted labels are balanced: a uniform prior would pass above
    shutil.copytree(world / "run", skewed)
    info = json.loads((skewed / "head.json").read_text())
    (skewed / "head.json").write_text(json.dumps({**info, "label_prior": [0.1, 0.2, 0.3, 0.4]}))
    with torch.inference_mode(), autocast:
        logits = load_skill_model(skewed)[0](clips, present)
    torch.testing.assert_close(torch.softmax(logits[0], 0), torch.tensor([0.1, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize("workers", [0, 1])
def test_decode_warnings_are_said_once_by_the_main_process_not_by_each_epochs_workers(world, tmp_path, workers):
    take, clean = load_takes(world / "data", "val")[:2]
    broken = dataclasses.replace(take, videos={**take.videos, "ego": tmp_path / "empty.mp4"})
    (tmp_path / "empty.mp4").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _epoch in range(2):  # finetune makes a new loader, so new worker processes, every epoch
            assert len(list(clip_loader([clean, broken, clean], VIEWS, ClipSampling(FRAMES), batch_size=3, workers=workers))) == 1
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(said) == 1 and said[0].startswith(f"take {take.take_uid}, view ego: ")  # and no empty ones for clean takes


def test_a_batch_without_any_decodable_view_still_trains_every_backbone_weight(world):
    """Under DDP every rank's backbone must produce gradients in each step, even when no clip of its batch decoded."""
    adapted = bb.add_lora(bb.load_backbone(str(world / "tiny"), FRAMES), bb.LoraSettings(r=4, alpha=8))
    config = HeadConfig(dim=32, num_views=len(VIEWS), frames=FRAMES, hidden=32, heads=4)
    model = SkillModel(adapted, build_head(config), config, label_prior=[0.1, 0.2, 0.3, 0.4])
    clips, present = torch.zeros(2, len(VIEWS), FRAMES, 3, 224, 224), torch.zeros(2, len(VIEWS), dtype=torch.bool)
    logits = model.train()(clips, present)
    torch.testing.assert_close(logits, model.prior_logits.expand(2, -1))
    (logits.sum() * 0).backward()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and (p.grad == 0).all() for p in trainable)


def test_evaluate_and_predict_name_takes_with_absent_views_and_exit_3(world, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(world / "data", root)
    first, second = load_takes(root, "val")[:2]  # evaluate's first batch of 2: no view of either decodes
    for take in (first, second):
        for video in take.videos.values():
            video.unlink()
    prior = json.loads((world / "run" / "head.json").read_text())["label_prior"]
    result = subprocess.run([sys.executable, "-m", "stages.cli", "evaluate", "--checkpoint", str(world / "run"),
                             "--root", str(root), "--out", str(tmp_path / "eval")], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "2 takes had views that were missing" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["takes_with_absent_views"] == metrics["takes_without_views"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["absent_views"] for r in rows[:3]] == [list(VIEWS), list(VIEWS), []]
    np.testing.assert_allclose(rows[0]["probabilities"], prior, atol=1e-5)

    third = load_takes(root, "val")[2]
    third.videos["ego"].write_bytes(b"")
    third.videos["exo3"].unlink()  # a camera missing from the folder: its slot stays empty, not filled by exo4
    predicted = subprocess.run([sys.executable, "-m", "stages.cli", "predict", "--checkpoint", str(world / "run"), "--json",
                                str(third.videos["ego"].parents[3])], capture_output=True, text=True)
    assert predicted.returncode == 3, predicted.stderr
    assert "view ego" in predicted.stderr and "treated as absent" in predicted.stderr
    assert "\nwarning: take " in "\n" + predicted.stderr and "UserWarning" not in predicted.stderr  # said, not traced
    assert "is_gradient_checkpointing" not in predicted.stderr  # peft's use of a deprecated transformers property
    (row,) = json.loads(predicted.stdout[predicted.stdout.index("["):])
    assert row["absent_views"] == ["ego", "exo3"]


def test_init_head_refuses_a_temporal_head_for_other_frames(tmp_path):
    from pipeline.checkpoints import save_head
    from pipeline.config import ConfigError
    from pipeline.finetune import _warm_start_head
    from pipeline.fusion import build_head

    saved = HeadConfig(fusion="temporal", dim=32, num_views=2, frames=4, num_patches=4, hidden=16, heads=4)
    save_head(tmp_path, build_head(saved), saved, ("ego", "exo1"))
    assert _warm_start_head(tmp_path, saved, ("ego", "exo1"))[1] == saved
    with pytest.raises(ConfigError, match="T=4, N=4; this run has .* T=8"):
        _warm_start_head(tmp_path, dataclasses.replace(saved, frames=8), ("ego", "exo1"))


def test_evaluate_and_predict_refuse_bad_input_with_exit_2(world, tmp_path):
    split = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                     "--split", "test", "--out", str(tmp_path / "eval")])
    assert split.exit_code == 2 and "unknown split 'test'" in split.output
    folder = CliRunner().invoke(app, ["predict", "--checkpoint", str(world / "run"), str(tmp_path / "no-such-take")])
    assert folder.exit_code == 2 and "no-such-take: not a folder" in folder.output
    (tmp_path / "afile").write_text("")
    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                   "--out", str(tmp_path / "afile")])
    assert out.exit_code == 2 and "afile is a file; it must be a folder" in out.output
    under = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(world / "run"), "--root", str(world / "data"),
                                     "--out", str(tmp_path / "afile" / "eval")])
    assert under.exit_code == 2 and "afile is a file, not a folder" in under.output


def test_a_checkpoint_from_before_max_grad_norm_and_sampling_resumes_only_as_it_trained(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline.config import ConfigError
    from pipeline.distributed import Ranks
    from pipeline.epoch_checkpoints import load_epoch_checkpoint, save_epoch_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    older = {"lr": 1.0}  # a run's settings as recorded before max_grad_norm existed
    save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": 0, "world_size": 1, "config": older},
                          [{"cpu": torch.get_rng_state()}])
    load = functools.partial(load_epoch_checkpoint, tmp_path / "checkpoint", model, optimizer, schedule,
                             ranks=Ranks(), device=torch.device("cpu"))
    now = {**older, "max_grad_norm": 0.0, "sampling": "uniform", "train_windows": "random",
           "decay_norms_and_biases": True}  # as recorded today
    with pytest.raises(ConfigError, match=r"decay_norms_and_biases: True -> False"):  # it decayed every weight
        load(config={**now, "decay_norms_and_biases": False})
    with pytest.raises(ConfigError, match=r"max_grad_norm: 0.0 -> 1.0"):  # says what the run trained with
        load(config={**now, "max_grad_norm": 1.0})
    with pytest.raises(ConfigError, match=r"sampling: 'uniform' -> 'window'"):  # it trained on uniform clips
        load(config={**now, "sampling": "window"})
    assert load(config=now)["epoch"] == 0
    assert load(config={**now, "train_windows": "centre"})["epoch"] == 0  # a uniform run has no windows to place


def test_a_window_checkpoint_from_before_train_windows_resumes_on_centred_windows_only():
    from pipeline.epoch_checkpoints import with_added_settings

    older = {"lr": 1.0, "max_grad_norm": 1.0, "sampling": "window"}  # such runs trained on centred windows
    assert with_added_settings(older, {**older, "train_windows": "random"})["train_windows"] == "centre"
    assert with_added_settings({**older, "sampling": "uniform"}, {"train_windows": "random"})["train_windows"] == "random"
    assert with_added_settings({**older, "train_windows": "random"}, {})["train_windows"] == "random"  # recorded: kept


@pytest.mark.parametrize("tune", ["lora", "full"])
def test_weight_decay_leaves_out_biases_and_layernorm_weights_as_hf_trainer_does(world, tune):
    from transformers import Trainer

    from pipeline.finetune import FinetuneConfig, build_model
    from pipeline.weight_decay import decay_groups

    config = FinetuneConfig(root=world / "data", out=world / "unused", backbone=str(world / "tiny"), frames=FRAMES,
                            hidden=32, heads=4, lora_r=4, tune=tune)
    model, _, _ = build_model(config)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, exempt = ({names[id(p)] for p in group["params"]} for group in decay_groups(model, 0.01, False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    hf_rule = Trainer.get_decay_parameter_names(Trainer.__new__(Trainer), model)  # HF Trainer's own rule
    assert decayed == trainable & set(hf_rule) and exempt == trainable - set(hf_rule) and decayed and exempt
    assert "head.norm.weight" in exempt and "head.projector.down.1.weight" in exempt  # LayerNorms
    assert "head.classifier.bias" in exempt and "head.projector.calibration.std" in decayed  # not a norm, as in HF
    assert any("lora_A" in name for name in decayed) if tune == "lora" else any("qkv.weight" in name for name in decayed)
    everything = decay_groups(model, 0.01, True)  # runs before 2026-12-05: one group, every weight decayed
    assert len(everything) == 1 and len(everything[0]["params"]) == len(trainable)


def test_fp16_autocast_scales_the_loss_and_the_checkpoint_keeps_the_scale(world, tmp_path, monkeypatch):
    """On GPUs without bf16 autocast runs in fp16, whose small gradients underflow unless the loss is scaled: the run
    scales it (GradScaler) and its checkpoint keeps the scale. Simulated on the CPU, where fp16 autocast also runs."""
    steps = []
    monkeypatch.setattr(bb, "autocast_dtype", lambda device: torch.float16)
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, optimizer: steps.append(self.get_scale()) or
                        optimizer.step())
    args = finetune_args(world / "data", world / "tiny", tmp_path / "fp16")
    args[args.index("--epochs") + 1] = "1"
    assert cli(*args).exit_code == 0
    assert steps and all(scale == 2.0**16 for scale in steps)  # GradScaler's initial scale, applied at every update
    saved = torch.load(tmp_path / "fp16" / "checkpoint" / "optimizer.pt", weights_only=True)["grad_scaler"]
    assert saved["scale"] == 2.0**16 and saved["_growth_tracker"] == len(steps)
    assert not torch.load(world / "run" / "checkpoint" / "optimizer.pt", weights_only=True)["grad_scaler"]  # bf16: none


def test_evaluate_runs_an_fp16_trained_head_in_fp16_as_the_run_did(world, tmp_path, monkeypatch):
    """On GPUs without bf16 a finetune run's head trains and is scored in fp16 autocast; evaluate ran it in bf16, and
    its probabilities moved by 3e-4 to 4e-3 from the run's own (simulated on the CPU)."""
    monkeypatch.setattr(bb, "autocast_dtype", lambda device: torch.float16)
    args = finetune_args(world / "data", world / "tiny", tmp_path / "fp16")
    args[args.index("--epochs") + 1] = "1"
    assert cli(*args).exit_code == 0
    result = cli("evaluate", "--checkpoint", tmp_path / "fp16", "--root", world / "data", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    run, evaluated = ([json.loads(line)["probabilities"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
                      for folder in (tmp_path / "fp16", tmp_path / "eval"))
    assert np.abs(np.subtract(run, evaluated)).max() < 1e-5


def test_fp16_updates_skipped_for_overflow_do_not_use_up_scheduled_steps(world, tmp_path, monkeypatch):
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(bb, "autocast_dtype", lambda device: torch.float16)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(scaler, init_scale=2.0**40))  # every update overflows
    args = finetune_args(world / "data", world / "tiny", tmp_path / "fp16")
    args[args.index("--epochs") + 1] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns of a scheduler stepped before its optimizer
        warnings.filterwarnings("ignore", message=".*(treated as absent|CUDA|cuda).*")
        assert cli(*args).exit_code == 0
    saved = torch.load(tmp_path / "fp16" / "checkpoint" / "optimizer.pt", weights_only=True)
    updates = len(json.loads((tmp_path / "fp16" / "checkpoint" / "state.json").read_text())["train_losses"])
    assert saved["grad_scaler"]["scale"] == 2.0 ** (40 - updates)  # halved at each skipped update
    assert saved["optimizer"]["state"] == {} and saved["schedule"]["last_epoch"] == 0  # no update, no scheduled step


def test_a_resumed_fp16_run_continues_from_its_loss_scale(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    from pipeline.distributed import Ranks
    from pipeline.epoch_checkpoints import load_epoch_checkpoint, save_epoch_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))
    scaler.update(2.0**7)  # as after overflows lowered it
    config = {"max_grad_norm": 1.0, "sampling": "uniform", "train_windows": "random", "decay_norms_and_biases": False}
    save_epoch_checkpoint(tmp_path, model, optimizer, schedule, {"epoch": 0, "world_size": 1, "config": config},
                          [{"cpu": torch.get_rng_state()}], scaler)
    resumed = torch.amp.GradScaler("cpu")
    load_epoch_checkpoint(tmp_path / "checkpoint", model, optimizer, schedule, config, Ranks(), torch.device("cpu"),
                          scaler=resumed)
    assert resumed.get_scale() == 2.0**7


def test_a_run_whose_training_takes_have_no_decodable_view_stops_instead_of_learning_nothing(world, tmp_path):
    args = finetune_args(world / "data", world / "tiny", tmp_path / "none")
    args[args.index("--frames") + 1] = "16"  # the demo videos have 8 frames: every view is too short
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "none of the 8 training takes had a decodable view of ego+exos in epoch 0" in " ".join(result.output.split())
    assert not (tmp_path / "none" / "checkpoint").exists()


def test_a_short_last_accumulation_group_averages_over_its_own_batches():
    # 7 batches, accumulation 3: updates after batches 0-2, 3-5 and 6 alone, each the mean of its batches' gradients
    divisors = [finetune_module.accumulated_batches(step, 7, 3) for step in range(7)]
    assert divisors == [3, 3, 3, 3, 3, 3, 1]
    assert [finetune_module.accumulated_batches(step, 4, 2) for step in range(4)] == [2, 2, 2, 2]
    assert [finetune_module.accumulated_batches(step, 5, 4) for step in range(5)] == [4, 4, 4, 4, 1]


def test_a_run_with_gradient_accumulation_updates_once_per_group_and_averages_its_batches(world, tmp_path, monkeypatch):
    divisors, updates = [], []
    accumulated = finetune_module.accumulated_batches
    monkeypatch.setattr(finetune_module, "accumulated_batches",
                        lambda *args: divisors.append(args) or accumulated(*args))
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: updates.append(len(divisors)))
    try:
        args = finetune_args(world / "data", world / "tiny", tmp_path / "run")
        args[args.index("--epochs") + 1], args[args.index("--grad-accum") + 1] = "1", "3"
        assert cli(*args).exit_code == 0
    finally:
        handle.remove()
    batches = len(divisors)  # 8 fitted takes in batches of 4: one short group of 2, averaged over 2, not 3
    assert divisors == [(step, batches, 3) for step in range(batches)] and batches == 2
    assert updates == [batches]  # one update, after the epoch's last batch


def test_an_error_in_a_step_rank_0_takes_alone_stops_every_rank_with_its_message(world, tmp_path):
    """Rank 0 alone writes the run's config (and checkpoints, and scores held-out takes); the other ranks used to wait
    for it at the next collective and die in gloo ('Connection closed by peer') once it had exited."""
    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)  # rank 0's save_config fails: IsADirectoryError
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.cli",
                               *map(str, finetune_args(world / "data", world / "tiny", run))],
                              capture_output=True, text=True, timeout=300)
    said = " ".join((launched.stdout + launched.stderr).split())
    assert launched.returncode == 1 and "Connection closed" not in said, said[-3000:]
    assert "IsADirectoryError: [Errno 21] Is a directory" in said and root_cause(said) == (0, 1), said[-3000:]
