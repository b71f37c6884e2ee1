import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cache import CacheSpec, FeatureCache, TakeRecord
from stages.cli import app
from tests.cachegen import split_view_cache

SMALL = ["--epochs", "30", "--lr", "1e-3", "--batch-size", "16", "--hidden", "48", "--heads", "4"]


def fit(cache, out, *extra):
    return CliRunner().invoke(app, ["fit-head", "--cache", str(cache), "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    split_view_cache(root / "cache", absent=0.1)
    result = fit(root / "cache", root / "run", "--views", "ego", "--views", "exos", "--views", "ego+exos",
                 "--fusion", "crossview", "--fusion", "concat", "--seed", "0", "--seed", "1",
                 "--submission", str(root / "submission.json"))
    assert result.exit_code == 0, result.output
    return root


def cells(root):
    return json.loads((root / "run" / "grid.json").read_text())["cells"]


def test_only_fused_views_learn_the_split_view_signal(grid):
    by_setting = {}
    for row in cells(grid):
        by_setting.setdefault((row["views"], row["fusion"]), []).append(row["accuracy"])
    for fusion in ("crossview", "concat"):
        # 10% of takes miss views, so ego+exos tops out near 95%; one side alone near 50%
        fused = np.mean(by_setting[("ego+exos", fusion)])
        single = max(by_setting[("ego", fusion)] + by_setting[("exos", fusion)])
        assert fused > 0.75 and single < 0.7 and fused > single + 0.15


def test_grid_and_cell_files(grid):
    rows = cells(grid)
    assert len(rows) == 3 * 2 * 2
    assert {k for row in rows for k in row} >= {"views", "fusion", "seed", "accuracy"}
    assert (grid / "run" / "grid.png").stat().st_size > 0 and (grid / "run" / "config.json").is_file()
    folder = grid / "run" / rows[-1]["cell"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_takes"] == 48 and 0 <= metrics["accuracy"] <= 1
    assert np.array(metrics["confusion_matrix"]).shape == (4, 4) and np.sum(metrics["confusion_matrix"]) == 48
    assert metrics["label_order"] == ["Novice", "Early Expert", "Intermediate Expert", "Late Expert"]
    assert set(metrics["per_scenario"]) == {"Rock Climbing", "Basketball", "Dance"}
    assert metrics["settings"]["fusion"] == rows[-1]["fusion"] and metrics["settings"]["seed"] == rows[-1]["seed"]
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 48 and set(predictions[0]) == {"take_uid", "label", "predicted", "probabilities"}
    assert abs(sum(predictions[0]["probabilities"]) - 1) < 1e-4
    correct = np.mean([p["label"] == p["predicted"] for p in predictions])
    assert correct == pytest.approx(metrics["accuracy"])
    for name in ("head.safetensors", "head.json", "confusion.png"):
        assert (folder / name).stat().st_size > 0
    submission = json.loads((grid / "submission.json").read_text())
    first = rows[0]  # the ego cell: takes without an ego view cannot be scored by it
    assert first["views"] == "ego" and len(submission["videos"]) == first["num_takes"] < 48
    assert np.array(submission["ego_model_predictions"]).shape == (first["num_takes"], 4)
    assert np.array(submission["exo_model_predictions"]).shape == (first["num_takes"], 4, 4)


def test_same_seed_same_metrics(grid, tmp_path):
    rerun = fit(grid / "cache", tmp_path / "again", "--views", "ego+exos", "--fusion", "crossview", "--seed", "1")
    assert rerun.exit_code == 0, rerun.output
    name = "ego+exos__crossview__seed1"
    first = json.loads((grid / "run" / name / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / name / "metrics.json").read_text())
    assert first["confusion_matrix"] == second["confusion_matrix"]
    assert (grid / "run" / name / "predictions.jsonl").read_text() == (tmp_path / "again" / name / "predictions.jsonl").read_text()


def test_missing_cache_is_a_clear_error(tmp_path):
    result = fit(tmp_path / "nothing", tmp_path / "run")
    assert result.exit_code == 2 and "not a skillpipe feature cache" in result.output


def test_unfinished_cache_is_a_clear_error(tmp_path):
    cache = split_view_cache(tmp_path / "cache", train=40, val=8)
    (tmp_path / "cache" / "shards" / "train" / "00001.json").unlink()  # as if extract was killed
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 2 and "split train is unfinished (2/3 shards committed)" in result.output
    assert cache.is_complete("val")


def test_cache_without_val_takes_is_a_clear_error(tmp_path):
    split_view_cache(tmp_path / "cache", splits=("train",))
    result = fit(tmp_path / "cache", tmp_path / "run")
    assert result.exit_code == 2 and "has no val takes" in result.output


def test_view_setting_the_cache_lacks_is_a_clear_error(tmp_path):
    spec = CacheSpec(fingerprint={}, views=("ego",), frames=4, num_patches=196, hidden_size=32, shard_size=4)
    cache = FeatureCache.open_or_create(tmp_path / "cache", spec)
    for split in ("train", "val"):
        cache.plan_split(split, ["a"])
        cache.write_shard(split, 0, np.zeros((1, 1, 5, 32)), [TakeRecord("a", "a", split, 0, "Dance", (True,))], {})
    result = fit(tmp_path / "cache", tmp_path / "run", "--views", "exos")
    assert result.exit_code == 2
    assert "view setting 'exos' needs ['exo1', 'exo2', 'exo3', 'exo4'], which the cache does not contain" in result.output
    bad = fit(tmp_path / "cache", tmp_path / "run", "--views", "ego+cam7")
    assert bad.exit_code == 2 and "unknown view 'cam7'" in bad.output
