"""Evaluation outputs: accuracy, per-scenario accuracy, confusion matrix, predictions, plots, submission."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.files import read_json, write_bytes_atomic, write_json_atomic
from pipeline.takes import LABEL_NAMES
from pipeline.views import absent_views


def evaluation_metrics(labels: np.ndarray, probabilities: np.ndarray, scenarios: list[str]) -> dict:
    """labels (N,), probabilities (N, 4) -> accuracy (0-1), per_scenario, confusion_matrix, num_takes."""
    predicted = probabilities.argmax(1)
    correct = predicted == labels
    confusion = np.zeros((len(LABEL_NAMES), len(LABEL_NAMES)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)  # rows = true label, columns = predicted
    scenario_array = np.array(scenarios)
    return {
        "accuracy": float(correct.mean()) if len(labels) else 0.0,
        "per_scenario": {s: float(correct[scenario_array == s].mean()) for s in sorted(set(scenarios))},
        "scenario_takes": {s: int(np.sum(scenario_array == s)) for s in sorted(set(scenarios))},
        "confusion_matrix": confusion.tolist(),
        "label_order": list(LABEL_NAMES),
        "num_takes": int(len(labels)),
    }


def prediction_rows(take_uids: list[str], labels: np.ndarray, probabilities: np.ndarray,
                    absent: list[list[str]]) -> list[dict]:
    return [
        {"take_uid": uid, "label": LABEL_NAMES[label], "predicted": LABEL_NAMES[int(p.argmax())],
         "probabilities": [round(float(x), 6) for x in p], "absent_views": missing}
        for uid, label, p, missing in zip(take_uids, labels, probabilities, absent)
    ]


def write_predictions(path: Path, rows: list[dict]) -> None:
    write_bytes_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def submission(take_uids: list[str], probabilities: np.ndarray) -> dict:
    """The official challenge JSON. A fused multi-view head has one prediction per take, so it
    fills the ego slot and each of the 4 exo slots with it: the scorer's ego, exo and combined
    accuracies then all equal the fused head's accuracy."""
    probs = np.asarray(probabilities, dtype=float).round(6)
    return {
        "videos": list(take_uids),
        "ego_model_predictions": probs.tolist(),
        "exo_model_predictions": np.repeat(probs[:, None, :], 4, axis=1).tolist(),
    }


SUBMISSION_KEYS = {"videos", "ego_model_predictions", "exo_model_predictions"}


def is_a_submission(path: Path) -> bool:
    """Whether the file at `path` is a submission JSON (one a rerun may replace)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == SUBMISSION_KEYS


def write_submission(path: Path, take_uids: list[str], probabilities: np.ndarray) -> None:
    write_json_atomic(path, submission(take_uids, probabilities))


def plot_confusion(path: Path, confusion: list[list[int]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(confusion)
    figure, axes = plt.subplots(figsize=(5, 4.5))
    axes.imshow(matrix, cmap="Blues")
    short = ["Novice", "Early", "Intermediate", "Late"]
    axes.set_xticks(range(4), short, rotation=30)
    axes.set_yticks(range(4), short)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    _save(figure, path)


def seed_spread(accuracies: list[float]) -> float:
    """The sample standard deviation over seeds (ddof=1: with the usual 2-5 seeds the population one, ddof=0, reads
    1.1-1.4x low); 0 for a single seed."""
    return float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0


def plot_grid(path: Path, groups: dict[str, list[float]], baseline: float | None = None) -> None:
    """Bar per (views, fusion) group: mean accuracy over seeds, the spread as error bar, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    means = [float(np.mean(groups[n])) for n in names]
    spreads = [seed_spread(groups[n]) for n in names]
    figure, axes = plt.subplots(figsize=(max(4, 1.2 * len(names)), 4))
    axes.bar(range(len(names)), means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.8)
    for x, name in enumerate(names):
        axes.plot([x] * len(groups[name]), groups[name], "k.", markersize=4)
    if baseline is not None:
        axes.axhline(baseline, color="grey", linestyle="--", label="train-majority class")
        axes.legend()
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("val accuracy")
    axes.set_ylim(0, 1)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def mark_incomplete(folder: Path) -> None:
    """Remove a result folder's metrics.json before anything in it is rewritten: written last, it says the folder is
    complete, and an old one beside new files would say so of a half-rewritten folder."""
    (Path(folder) / "metrics.json").unlink(missing_ok=True)


def write_evaluation(folder: Path, take_uids: list[str], labels: np.ndarray, probabilities: np.ndarray,
                     scenarios: list[str], present: np.ndarray, views: tuple[str, ...], settings: dict, title: str) -> dict:
    """predictions.jsonl, confusion.png and, last, metrics.json of one evaluated model; returns the metrics.

    `present` (N, V) marks the model's `views` each take had: the others were missing or could not
    be decoded. Each prediction names its take's absent views; the metrics count the takes with
    some absent (`takes_with_absent_views`) and with none of the views, which get the train label
    prior (`takes_without_views`).
    """
    mark_incomplete(folder)
    absent = absent_views(present, views)
    metrics = {**evaluation_metrics(labels, probabilities, scenarios),
               "takes_with_absent_views": sum(map(bool, absent)),
               "takes_without_views": sum(len(missing) == len(views) for missing in absent), "settings": settings}
    write_predictions(Path(folder) / "predictions.jsonl", prediction_rows(take_uids, labels, probabilities, absent))
    plot_confusion(Path(folder) / "confusion.png", metrics["confusion_matrix"], f"{title}\naccuracy {metrics['accuracy']:.3f}")
    write_json_atomic(Path(folder) / "metrics.json", metrics)  # last: its presence says the folder is complete
    return metrics
