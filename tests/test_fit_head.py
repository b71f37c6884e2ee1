"""`skillpipe fit-head` end to end on generated caches whose skill signal is split across views."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline import head_grid, metrics
from pipeline.cache import FeatureCache, TakeRecord
from pipeline.checkpoints import load_head
from pipeline.config import read_saved_config
from pipeline.fusion import FUSIONS, HeadConfig
from pipeline.head_training import FeatureTable, FitHeadConfig, load_complete_split, predict_logits, stratified_holdout
import stages.fit_head
from stages.cli import app
from pipeline.writer_lock import first_writer
from tests.cachegen import DIM, FRAMES, split_view_cache

TINY = ["--epochs", "20", "--lr", "2e-3", "--batch-size", "16", "--hidden", "48", "--heads", "4"]
VAL = 192  # val takes in the grid: one side alone scores 0.5 +- 0.036 (binomial), far from the 0.65 bound


def fit(cache, out, *extra):
    return CliRunner().invoke(app, ["fit-head", "--cache", str(cache), "--out", str(out), *TINY, *map(str, extra)])


def read_json(path):
    return json.loads(path.read_text())


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """views ego, exos, ego+exos x crossview x seeds 0, 1 on a cache where 10% of views are absent."""
    root = tmp_path_factory.mktemp("grid")
    split_view_cache(root / "cache", val=VAL, absent=0.1)
    result = fit(root / "cache", root / "run", "--views", "ego,exos", "--views", "ego+exos", "--seed", "0", "--seed", "1")
    assert result.exit_code == 0, result.output
    (root / "output.txt").write_text(result.output)
    return root


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Every fusion variant on ego+exos, one seed, no absent views."""
    root = tmp_path_factory.mktemp("variants")
    split_view_cache(root / "cache")
    # the mean baseline dilutes the ego view's cue 5-fold: a higher learning rate lets its linear layer catch up
    result = fit(root / "cache", root / "run", "--lr", "5e-3", *[arg for name in FUSIONS for arg in ("--fusion", name)])
    assert result.exit_code == 0, result.output
    return {row["fusion"]: row for row in read_json(root / "run" / "grid.json")["cells"]}


def test_only_fused_views_learn_the_split_view_signal(grid):
    accuracy = {}
    for row in read_json(grid / "run" / "grid.json")["cells"]:
        accuracy.setdefault(row["views"], []).append(row["accuracy"])
    # one side alone separates 2 of 4 labels (<= 0.5 plus luck); 10% absent views cap ego+exos near 0.95
    assert min(accuracy["ego+exos"]) > 0.75
    assert max(accuracy["ego"] + accuracy["exos"]) < 0.65


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_fusion_variant_learns_the_split_view_signal(variants, fusion):
    assert variants[fusion]["accuracy"] > 0.75


def test_grid_files(grid):
    run = grid / "run"
    said = (grid / "output.txt").read_text()  # a line per cell as it ends, then the table
    assert [line.split(":")[0] for line in said.splitlines() if line.startswith("cell ")] == [
        f"cell {number}/6 {views}__crossview__seed{seed}"
        for number, (views, seed) in enumerate(((v, s) for v in ("ego", "exos", "ego+exos") for s in (0, 1)), 1)]
    summary = read_json(run / "grid.json")
    rows = summary["cells"]
    assert [(r["views"], r["seed"]) for r in rows] == [(v, s) for v in ("ego", "exos", "ego+exos") for s in (0, 1)]
    assert all(r["fusion"] == "crossview" and 0 <= r["accuracy"] <= 1 for r in rows)
    groups = {g["views"]: g for g in summary["groups"]}
    assert groups["exos"]["mean"] == pytest.approx(np.mean([r["accuracy"] for r in rows if r["views"] == "exos"]))
    # the sample standard deviation (ddof=1) over the 2 seeds: |a - b| / sqrt(2)
    exos_accuracies = [r["accuracy"] for r in rows if r["views"] == "exos"]
    assert groups["exos"]["std"] == pytest.approx(abs(exos_accuracies[0] - exos_accuracies[1]) / 2**0.5)
    assert (run / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert read_saved_config(FitHeadConfig, run / "config.json").seeds == (0, 1)
    cell = run / "exos__crossview__seed1"
    config = read_saved_config(FitHeadConfig, cell / "config.json")
    assert (config.views, config.fusions, config.seeds, config.hidden) == (("exos",), ("crossview",), (1,), 48)
    metrics = read_json(cell / "metrics.json")
    assert metrics["num_takes"] == VAL and metrics["accuracy"] == rows[3]["accuracy"]
    assert metrics["label_order"] == ["Novice", "Early Expert", "Intermediate Expert", "Late Expert"]
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (4, 4) and confusion.sum() == VAL
    assert confusion.sum(1).tolist() == [VAL // 4] * 4  # rows = true labels (balanced in the generated cache)
    assert np.trace(confusion) / VAL == pytest.approx(metrics["accuracy"])
    assert set(metrics["per_scenario"]) == {"Rock Climbing", "Basketball", "Dance"}
    assert sum(metrics["scenario_takes"].values()) == VAL
    scenario = {r.take_uid: r.scenario for r in FeatureCache.open(grid / "cache").read_records("val")}
    for name, accuracy in metrics["per_scenario"].items():
        hits = [p["label"] == p["predicted"] for p in read_jsonl(cell / "predictions.jsonl") if scenario[p["take_uid"]] == name]
        assert accuracy == pytest.approx(np.mean(hits)) and metrics["scenario_takes"][name] == len(hits)
    printed = " ".join((grid / "output.txt").read_text().split())  # the rich table: mean ± std and every seed
    exos = [r["accuracy"] for r in rows if r["views"] == "exos"]
    assert f"{np.mean(exos):.3f} ± {np.std(exos, ddof=1):.3f}" in printed and f"{exos[0]:.3f} {exos[1]:.3f}" in printed
    assert metrics["settings"]["view_names"] == ["exo1", "exo2", "exo3", "exo4"] and metrics["settings"]["seed"] == 1
    predictions = read_jsonl(cell / "predictions.jsonl")
    assert len(predictions) == VAL and set(predictions[0]) == {"take_uid", "label", "predicted", "probabilities",
                                                                  "absent_views"}
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)
    assert np.mean([p["label"] == p["predicted"] for p in predictions]) == pytest.approx(metrics["accuracy"])
    assert (cell / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    head = read_json(cell / "head.json")
    assert head["views"] == ["exo1", "exo2", "exo3", "exo4"] and head["head"]["hidden"] == 48
    assert (cell / "head.safetensors").stat().st_size > 0


def test_takes_without_the_cells_views_are_scored_with_the_train_prior(grid):
    metrics = read_json(grid / "run" / "ego__crossview__seed0" / "metrics.json")
    without_ego = [r for r in read_jsonl(grid / "run" / "ego__crossview__seed0" / "predictions.jsonl")
                   if not _present(grid, r["take_uid"])[0]]
    assert metrics["num_takes"] == VAL and metrics["takes_without_views"] == len(without_ego) > 0
    assert all(r["probabilities"] == without_ego[0]["probabilities"] and r["absent_views"] == ["ego"] for r in without_ego)
    assert read_json(grid / "run" / "ego+exos__crossview__seed0" / "metrics.json")["takes_without_views"] == 0
    said = " ".join((grid / "output.txt").read_text().split())
    assert f"{len(without_ego)} of {VAL} val takes have none of the views ['ego']" in said


def _present(root, take_uid):
    from pipeline.cache import FeatureCache

    return next(r.present for r in FeatureCache.open(root / "cache").read_records("val") if r.take_uid == take_uid)


def test_a_cell_alone_reproduces_the_same_cell_of_a_grid(grid, tmp_path):
    result = fit(grid / "cache", tmp_path / "again", "--views", "ego+exos", "--seed", "1")
    assert result.exit_code == 0, result.output
    name = "ego+exos__crossview__seed1"
    for artifact in ("predictions.jsonl", "head.safetensors"):
        assert (tmp_path / "again" / name / artifact).read_bytes() == (grid / "run" / name / artifact).read_bytes()
    assert read_json(tmp_path / "again" / name / "metrics.json")["confusion_matrix"] == \
        read_json(grid / "run" / name / "metrics.json")["confusion_matrix"]


def test_a_grid_into_an_out_folder_of_another_grid_names_the_cells_it_leaves_and_saves_absolute_paths(
        grid, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(grid / "run", out)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["fit-head", "--cache", os.path.relpath(grid / "cache"), "--out", "run", *TINY,
                                      "--views", "ego+exos", "--seed", "1"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "holds 5 cell folder(s) of an earlier grid that this one does not list (ego+exos__crossview__seed0, ego__crossview__seed0," in said
    assert [row["cell"] for row in read_json(out / "grid.json")["cells"]] == ["ego+exos__crossview__seed1"]
    assert read_json(out / "config.json")["cache"] == str((grid / "cache").resolve())  # readable from any folder


def test_a_rerun_removes_the_temporary_files_of_a_grid_killed_mid_write(grid, tmp_path):
    out = shutil.copytree(grid / "run", tmp_path / "run")
    left = [out / ".grid.json.k1ll3d00.tmp", out / "ego__crossview__seed0" / ".metrics.json.k1ll3d00.tmp"]
    for path in left:
        path.write_text("{")
    (out / "notes").mkdir()
    kept = out / "notes" / ".draft.k1ll3d00.tmp"  # a folder the user made there: not the grid's to tidy
    kept.write_text("mine")
    assert fit(grid / "cache", out, "--views", "ego").exit_code == 0
    assert not any(path.exists() for path in left) and kept.read_text() == "mine"


def test_a_grid_into_a_folder_being_written_by_another_grid_stops_at_once(grid, tmp_path):
    out = shutil.copytree(grid / "run", tmp_path / "run")
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != "run.lock"}
    with first_writer(out / "run.lock", "that folder"):  # another grid still training there
        result = fit(grid / "cache", out, "--views", "ego+exos")
    assert result.exit_code == 2 and "is being written by another run" in " ".join(result.output.split())
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != "run.lock"} == files


@pytest.mark.parametrize("other", ["a finetune run", "a finetune run under way", "a fit-head cell", "an evaluation",
                                   "a feature cache", "a download root"])
def test_a_grid_into_another_runs_folder_is_refused_before_it_writes(grid, tmp_path, other):
    """It replaced a finetune run's config.json (the run could not be evaluated any more) and mixed its files in."""
    out = tmp_path / "other"
    shutil.copytree(grid / ("cache" if other == "a feature cache" else "run/ego+exos__crossview__seed0"), out)
    if other == "a finetune run":
        (out / "config.json").write_text(json.dumps({"kind": "FinetuneConfig", "root": "data"}))
    elif other == "a finetune run under way":  # its config.json alone says so
        shutil.rmtree(out)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"kind": "FinetuneConfig", "root": "data"}))
    elif other == "an evaluation":
        for name in ("head.json", "head.safetensors", "config.json"):
            (out / name).unlink()
    elif other == "a download root":  # the data: a grid's files landed among annotations/ and takes/
        shutil.rmtree(out)
        for folder in ("annotations", "takes/basketball_1"):
            (out / folder).mkdir(parents=True)
        (out / "annotations" / "proficiency_demonstrator_train.json").write_text("{}")
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = fit(grid / "cache", out, "--views", "ego")
    assert result.exit_code == 2 and "holds another run" in " ".join(result.output.split())
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == files


def test_submission_is_the_challenge_format(grid, tmp_path):
    result = fit(grid / "cache", tmp_path / "run", "--views", "ego+exos", "--submission", tmp_path / "submission.json")
    assert result.exit_code == 0, result.output
    submission = read_json(tmp_path / "submission.json")
    predictions = read_jsonl(tmp_path / "run" / "ego+exos__crossview__seed0" / "predictions.jsonl")
    assert submission["videos"] == [p["take_uid"] for p in predictions] and len(predictions) == VAL
    ego, exo = np.array(submission["ego_model_predictions"]), np.array(submission["exo_model_predictions"])
    assert ego.shape == (VAL, 4) and exo.shape == (VAL, 4, 4)
    np.testing.assert_allclose(ego, [p["probabilities"] for p in predictions], atol=1e-6)
    np.testing.assert_array_equal(exo, np.repeat(ego[:, None], 4, axis=1))  # the fused prediction in every slot
    refused = fit(grid / "cache", tmp_path / "grid", "--seed", "0", "--seed", "1", "--submission", tmp_path / "s.json")
    assert refused.exit_code == 2 and "needs a grid of one cell, this one has 2" in refused.output
    again = fit(grid / "cache", tmp_path / "run", "--views", "ego+exos", "--submission", tmp_path / "submission.json")
    assert again.exit_code == 0, again.output  # an earlier submission is replaced


def test_a_holdout_too_small_to_hold_out_any_take_is_said_and_one_seed_shows_no_spread(grid, tmp_path):
    """fit-head kept the last epoch without a word (finetune says so); a single seed printed "± 0.000"."""
    result = fit(grid / "cache", tmp_path / "run", "--views", "ego", "--holdout", "0.01")
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "note: cell ego__crossview__seed0: --holdout 0.01 leaves no held-out takes among its" in said
    assert "its last epoch is kept" in said and "± 0.000" not in said
    cell = read_json(tmp_path / "run" / "ego__crossview__seed0" / "metrics.json")
    quiet = fit(grid / "cache", tmp_path / "held", "--views", "ego", "--holdout", "0.25")
    assert quiet.exit_code == 0 and "no held-out takes" not in quiet.output
    assert cell["num_takes"] == VAL


@pytest.mark.parametrize("target", ["a file of the user's", "the cache's cache.json", "the cache folder as --out"])
def test_a_submission_or_out_over_files_it_does_not_own_is_refused_and_they_stay(grid, tmp_path, target):
    """--submission replaced any file: the cache's own cache.json, which left the cache unreadable."""
    cache = Path(shutil.copytree(grid / "cache", tmp_path / "cache"))
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    if target == "the cache folder as --out":
        result = fit(cache, cache, "--views", "ego+exos")
    else:
        result = fit(cache, tmp_path / "run", "--views", "ego+exos", "--submission",
                     mine if target == "a file of the user's" else cache / "cache.json")
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert ("exists and is not a submission" if target == "a file of the user's" else "among the files of the cache") in said
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_missing_or_empty_cache_is_a_clear_error(tmp_path):
    result = fit(tmp_path / "nothing", tmp_path / "run")
    assert result.exit_code == 2 and "not a skillpipe feature cache" in result.output
    split_view_cache(tmp_path / "empty", splits=())  # created, nothing extracted yet
    result = fit(tmp_path / "empty", tmp_path / "run")
    assert result.exit_code == 2 and "the cache has no train takes" in result.output


def test_unfinished_cache_is_a_clear_error(tmp_path):
    cache = split_view_cache(tmp_path / "cache", train=40, val=8)
    (tmp_path / "cache" / "shards" / "train" / "00001.json").unlink()  # as if extract was killed
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 2 and "split train is unfinished (2/3 shards committed)" in result.output
    assert cache.is_complete("val") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["train", "val"])
def test_cache_without_train_or_val_takes_is_a_clear_error(tmp_path, missing):
    split_view_cache(tmp_path / "cache", splits=tuple({"train", "val"} - {missing}))
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 2 and f"the cache has no {missing} takes" in result.output


def test_view_settings_the_cache_lacks_are_clear_errors(tmp_path):
    split_view_cache(tmp_path / "cache", train=16, val=16, views=("ego", "exo1"))
    result = fit(tmp_path / "cache", tmp_path / "run", "--views", "ego+exo2")
    assert result.exit_code == 2
    assert "view setting 'ego+exo2' needs ['exo2'], which the cache does not contain" in result.output
    result = fit(tmp_path / "cache", tmp_path / "run", "--views", "ego+cam7")
    assert result.exit_code == 2 and "unknown view 'cam7'" in result.output


def test_takes_in_both_train_and_val_are_refused(tmp_path):
    cache = split_view_cache(tmp_path / "cache", train=16, splits=("train",))
    uids = ["train-0003", "val-0001"]  # one train take extracted again as val
    (shard_uids,) = cache.plan_split("val", uids)
    records = [TakeRecord(u, f"take_{u}", "val", 0, "Dance", (True,) * 5) for u in shard_uids]
    cache.write_shard("val", 0, np.zeros((2, 5, 1 + FRAMES, DIM), np.float16), records, {})
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 2 and "1 take(s) in both train and val, e.g. ['train-0003']" in result.output


def test_a_view_no_train_take_has_is_a_clear_error(tmp_path):
    split_view_cache(tmp_path / "cache", train=16, val=16, views=("ego", "exo1"), absent=1.0)  # only ego survives
    result = fit(tmp_path / "cache", tmp_path / "run", "--views", "exo1")
    assert result.exit_code == 2 and "no train take has any of the views ['exo1']" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--fusion", "sum"], "--fusion (FitHeadConfig.fusions): unknown ['sum']"),
    (["--heads", "5"], "--heads (FitHeadConfig.heads): 5 must divide the feature size 32"),
    (["--holdout", "0.5"], "--holdout (FitHeadConfig.holdout): must be in [0, 0.5)"),
    (["--seed", "1", "--seed", "1"], "--seed (FitHeadConfig.seeds): repeated values"),
    (["--submission", "."], "--submission (FitHeadConfig.submission) . is a folder; it must be a file name"),
    (["--views", "exos+exo2"], "view setting 'exos+exo2' names a view twice"),
    (["--lr", "nan"], "FitHeadConfig: lr must be > 0 and weight_decay >= 0, both finite"),
    (["--weight-decay", "inf"], "FitHeadConfig: lr must be > 0 and weight_decay >= 0, both finite"),
])
def test_bad_settings_are_clear_errors(grid, tmp_path, flags, message):
    result = fit(grid / "cache", tmp_path / "run", *flags)
    assert result.exit_code == 2 and message in result.output


def test_an_output_that_is_a_file_is_refused_before_training(grid, tmp_path):
    (tmp_path / "run").write_text("")
    result = fit(grid / "cache", tmp_path / "run")
    assert result.exit_code == 2 and "--out (FitHeadConfig.out)" in result.output and "is a file; it must be a folder" in result.output


def test_a_diverged_cell_is_an_error_not_a_result(grid, tmp_path):
    (tmp_path / "run").mkdir()
    for summary in ("grid.json", "grid.png"):  # an earlier run's, into the same folder with other settings
        (tmp_path / "run" / summary).write_bytes((grid / "run" / summary).read_bytes())
    result = fit(grid / "cache", tmp_path / "run", "--views", "ego+exos", "--lr", "1e8", "--precision", "fp32")
    assert result.exit_code == 2 and "training diverged; try a lower --lr" in result.output
    # no grid summary, not even the earlier run's, whose cells this run replaces
    assert "ego+exos__crossview__seed0" in result.output and not list((tmp_path / "run").glob("grid.*"))


@pytest.mark.parametrize("stop_in", ["write_evaluation", "plot_confusion"])  # before and inside the evaluation's writes
def test_a_cell_folder_with_metrics_is_complete(grid, tmp_path, monkeypatch, stop_in):
    """metrics.json is written last: a run stopped before it leaves a cell without one, never metrics without a head."""
    def stopped(*args, **kwargs):
        raise RuntimeError("stopped")

    arguments = ["fit-head", "--cache", str(grid / "cache"), "--out", str(tmp_path / "run"), *TINY, "--views", "ego"]
    assert CliRunner().invoke(app, arguments).exit_code == 0
    cell = tmp_path / "run" / "ego__crossview__seed0"
    head = (cell / "head.safetensors").read_bytes()
    monkeypatch.setattr(head_grid if stop_in == "write_evaluation" else metrics, stop_in, stopped)
    with pytest.raises(RuntimeError, match="stopped"):  # a rerun with other settings, stopped
        CliRunner().invoke(app, [*arguments, "--epochs", "3"], catch_exceptions=False)
    assert (cell / "head.safetensors").read_bytes() != head and (cell / "head.json").is_file()
    assert not (cell / "metrics.json").exists()  # neither a new one nor the first run's


def test_the_cell_keeps_its_best_held_out_epoch(tmp_path):
    split_view_cache(tmp_path / "cache", signal=0.4)  # a weak signal: 30 epochs at a high lr overfit
    result = fit(tmp_path / "cache", tmp_path / "run", "--views", "ego+exos", "--epochs", "30", "--lr", "2e-2",
                 "--precision", "fp32", "--holdout", "0.25")
    assert result.exit_code == 0, result.output
    settings = read_json(tmp_path / "run" / "ego+exos__crossview__seed0" / "metrics.json")["settings"]
    losses = settings["holdout_losses"]
    assert int(np.argmin(losses)) < len(losses) - 1  # the run did overfit: the last epoch is not the best
    assert settings["best_epoch"] == int(np.argmin(losses))
    # and the saved weights are that epoch's: their held-out loss is the minimum
    cache = FeatureCache.open(tmp_path / "cache")
    head, info = load_head(tmp_path / "run" / "ego+exos__crossview__seed0")
    table = FeatureTable(load_complete_split(cache, "train"), cache.spec.views, tuple(info["views"]), HeadConfig(**info["head"]))
    rows = np.flatnonzero(table.usable)
    held = torch.from_numpy(rows[stratified_holdout(table.labels.numpy()[rows], 0.25)])
    loss = F.cross_entropy(predict_logits(head, table.inputs[held], table.present[held], "fp32"), table.labels[held])
    assert float(loss) == pytest.approx(min(losses), rel=1e-5)


def test_an_evaluation_rewritten_into_its_folder_drops_the_old_metrics_first(tmp_path, monkeypatch):
    """evaluate --out of an earlier evaluation: stopped before its new metrics.json, the folder must not look complete."""
    (tmp_path / "metrics.json").write_text("{}")
    monkeypatch.setattr(metrics, "plot_confusion", lambda *args: (_ for _ in ()).throw(RuntimeError("stopped")))
    probabilities = np.full((2, 4), 0.25)
    with pytest.raises(RuntimeError, match="stopped"):
        metrics.write_evaluation(tmp_path, ["a", "b"], np.array([0, 1]), probabilities, ["Cooking", "Music"],
                                 np.ones((2, 1), bool), ("ego",), {}, "eval")
    assert (tmp_path / "predictions.jsonl").is_file() and not (tmp_path / "metrics.json").exists()


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch):
    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.fit_head, "run_grid", interrupted)
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 130 and "interrupted: the cells finished so far are kept; the same command with --resume" \
        in " ".join(result.output.split())


def test_resume_keeps_the_complete_cells_fitted_alike_and_trains_only_the_others(tmp_path, monkeypatch):
    cache = split_view_cache(tmp_path / "cache")
    run = tmp_path / "run"
    assert fit(cache.root, run, "--views", "ego", "--seed", "0", "--seed", "1").exit_code == 0
    first = {row["cell"]: row for row in read_json(run / "grid.json")["cells"]}
    trained, train_head = [], head_grid.train_head
    monkeypatch.setattr(head_grid, "train_head", lambda table, head_config, settings, seed: trained.append(seed)
                        or train_head(table, head_config, settings, seed))

    def resumed(*extra):
        trained.clear()
        result = fit(cache.root, run, "--views", "ego", "--seed", "0", "--seed", "1", "--seed", "2", "--resume", *extra)
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    (run / "ego__crossview__seed1" / "metrics.json").unlink()  # a cell cut short
    said = resumed()
    assert "kept 1 of 3 cell(s)" in said and trained == [1, 2]  # the grid gained seed 2
    assert "seed1: accuracy" in said and "(not kept: incomplete, no metrics.json)" in said
    assert "seed2: accuracy" in said and "not kept" not in said.split("seed2: accuracy")[1]  # a new cell: no reason
    rows = {row["cell"]: row for row in read_json(run / "grid.json")["cells"]}
    assert rows["ego__crossview__seed0"] == first["ego__crossview__seed0"] and len(rows) == 3
    assert rows["ego__crossview__seed1"]["accuracy"] == first["ego__crossview__seed1"]["accuracy"]  # deterministic
    assert "kept 3 of 3" in resumed() and trained == []
    marker = cache.shard_marker("train", 0)  # records updated in place (a corrected label): a new commit
    cache.update_records("train", 0, [dataclasses.replace(TakeRecord.from_json(r), label=(r["label"] + 1) % 4)
                                      for r in marker["records"]])
    said = resumed()
    assert "kept 0 of 3" in said and trained == [0, 1, 2] and "(not kept: fitted on the cache as it was before" in said
    said = resumed("--lr", "3e-3")  # other settings
    assert "kept 0 of 3" in said and trained == [0, 1, 2]
    assert "ego__crossview__seed2: accuracy" in said and "(not kept: fitted with other settings: lr 0.002 -> 0.003)" in said
    refused = fit(cache.root, run, "--resume", "--submission", tmp_path / "submission.json")
    assert refused.exit_code == 2 and "run it without --resume" in refused.output
    (run / "ego__crossview__seed1" / "head.safetensors").unlink()  # damaged from outside: fitted again
    assert "kept 2 of 3" in resumed("--lr", "3e-3") and trained == [1]
    assert not read_json(run / "config.json")["resume"] and not read_json(run / "ego__crossview__seed0" / "config.json")["resume"]
    trained.clear()  # a saved config passed back resumes only when asked to
    again = CliRunner().invoke(app, ["fit-head", "--config", str(run / "config.json")])
    assert again.exit_code == 0 and "kept" not in again.output and trained == [0, 1, 2]


def test_a_cache_changed_while_fit_head_reads_it_is_refused(tmp_path, monkeypatch):
    cache = split_view_cache(tmp_path / "cache")
    load = head_grid.load_complete_split

    def changed_after_reading(cache, split):
        data = load(cache, split)
        if split == "val":  # a label corrected by an extract rerun just after both splits were read
            marker = cache.shard_marker("train", 0)
            cache.update_records("train", 0, [TakeRecord.from_json(r) for r in marker["records"]])
        return data

    monkeypatch.setattr(head_grid, "load_complete_split", changed_after_reading)
    result = fit(cache.root, tmp_path / "run", "--views", "ego")
    assert result.exit_code == 2 and "split train or val changed while it was read" in " ".join(result.output.split())
