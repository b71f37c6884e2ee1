"""Run a fit-head grid (views x fusions x seeds) on one cache: train, evaluate and write every cell.

The cache is read and pooled once per view selection and input kind; cells train one after
another on the resident tensors. Shared by `skillpipe fit-head`, `skillpipe demo` and the bench.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cache import CacheError, FeatureCache, written_by_the_cache
from pipeline.checkpoints import HEAD_INFO, HEAD_WEIGHTS, save_head
from pipeline.config import ConfigError, config_to_dict, foreign_output, save_config, with_absolute_paths
from pipeline.files import read_json, remove_temporary_files, write_json_atomic
from pipeline.fusion import HeadConfig
from pipeline.head_training import (
    Cell, FeatureTable, FitHeadConfig, TrainingDiverged, grid_cells, head_config_for, load_complete_split,
    predict_probabilities, train_head,
)
from pipeline.metrics import is_a_submission, mark_incomplete, plot_grid, seed_spread, write_evaluation, write_submission
from pipeline.takes import shared_takes
from pipeline.views import parse_view_setting
from pipeline.writer_lock import RUN_LOCK, first_writer


def run_grid(settings: FitHeadConfig, console: Console | None = None) -> list[dict]:
    """Train and evaluate every cell; writes the cell folders, grid.json and grid.png; returns the grid rows."""
    console = console or Console()
    settings = with_absolute_paths(settings)  # the saved configs are read back from other folders (--config)
    cells = grid_cells(settings)
    if settings.submission and len(cells) > 1:
        raise ConfigError(f"FitHeadConfig.submission: needs a grid of one cell, this one has {len(cells)}; "
                          "give a single --views, --fusion and --seed")
    cache = FeatureCache.open(settings.cache)
    for flag, path in (("--out", settings.out), ("--submission", settings.submission)):
        if path is not None and written_by_the_cache(cache.root, path):
            raise ConfigError(f"{flag} {path} is among the files of the cache it reads ({cache.root}); write it elsewhere")
    if settings.submission is not None and settings.submission.exists() and not is_a_submission(settings.submission):
        raise ConfigError(f"--submission {settings.submission} exists and is not a submission: it is left as it is; "
                          "give another file name, or delete it first")
    view_names = {setting: parse_view_setting(setting, cache.spec.views) for setting in settings.views}
    head_configs = {cell: head_config_for(cache, settings, cell.fusion, len(view_names[cell.views])) for cell in cells}
    # the cache as read, for --resume: hashed on both sides of the reads, so that a cell never records another state
    commits = cache.commits_sha256(("train", "val"))
    train, val = load_complete_split(cache, "train"), load_complete_split(cache, "val")
    if cache.commits_sha256(("train", "val")) != commits:
        raise cache.changed_while_read("train or val")
    if shared := shared_takes(train.records, val.records):
        raise CacheError(f"{cache.root}: {len(shared)} take(s) in both train and val, e.g. {shared[:3]}; "
                         "val would score training data")
    for setting, names in view_names.items():
        slots = [cache.spec.views.index(v) for v in names]
        if not train.present[:, slots].any():
            raise CacheError(f"{cache.root}: no train take has any of the views {list(names)} (view setting {setting!r})")
        blind = int((~val.present[:, slots].any(1)).sum())
        if blind:  # scored with the label prior of the train takes fitted, which can flatter or sink the accuracy
            console.print(f"[yellow]note:[/] {blind} of {len(val.records)} val takes have none of the views "
                          f"{list(names)} (view setting {setting!r}); they get the label prior of the train takes fitted "
                          "(those with these views, less the held-out part)")
    if foreign := another_runs_files(settings.out):
        raise ConfigError(f"--out {settings.out} holds another run ({foreign}); a grid written there would replace or "
                          "mix with its files: use another folder")
    with first_writer(settings.out / RUN_LOCK, f"the fit-head run folder {settings.out}"):  # one grid writes it at a time
        return _train_grid(settings, console, cells, cache, commits, view_names, head_configs, train, val)


def another_runs_files(out: Path) -> str | None:
    """What in `out` shows it is not a fit-head grid's folder (a finetune run, a cell, an evaluation); None if nothing."""
    if held := [name for name in (HEAD_INFO, "metrics.json", "checkpoint", "adapter", "backbone") if (out / name).exists()]:
        return held[0]
    return foreign_output(out, FitHeadConfig.__name__)


def _train_grid(settings: FitHeadConfig, console: Console, cells: list[Cell], cache: FeatureCache, commits: str,
                view_names: dict, head_configs: dict, train, val) -> list[dict]:
    # of an earlier grid killed mid-write (this one holds the folder's lock); not in folders a user made there
    remove_temporary_files([settings.out, *(settings.out / cell.name for cell in cells)])
    for summary in ("grid.json", "grid.png"):  # a previous run's, about cells this run replaces: gone until this grid ends
        (settings.out / summary).unlink(missing_ok=True)
    if earlier := sorted({folder.name for folder in earlier_cells(settings.out)} - {cell.name for cell in cells}):
        console.print(f"[yellow]note:[/] {settings.out} holds {len(earlier)} cell folder(s) of an earlier grid that this "
                      f"one does not list ({', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}); they stay as "
                      "they are, and grid.json and grid.png describe this grid only")
    resume, settings = settings.resume, dataclasses.replace(settings, resume=False)  # a saved config never resumes
    save_config(settings, settings.out / "config.json")
    rows, tables, kept = [], {}, 0
    for number, cell in enumerate(cells, 1):
        cell_config = dataclasses.replace(settings, views=(cell.views,), fusions=(cell.fusion,), seeds=(cell.seed,))
        row, why_not = _finished_row(settings.out / cell.name, cell, cell_config, commits) if resume else (None, "")
        if row:
            rows.append(row)
            kept += 1
            console.print(f"cell {number}/{len(cells)} {cell.name}: kept (accuracy {row['accuracy']:.3f})", highlight=False)
            continue
        kind = (cell.views, cell.fusion == "temporal")
        if kind not in tables:  # pooled once per view selection and input kind, shared by fusions and seeds
            tables[kind] = tuple(FeatureTable(split, cache.spec.views, view_names[cell.views], head_configs[cell], settings.device)
                                 for split in (train, val))
        rows.append(_fit_cell(cell, cell_config, cache, commits, settings, head_configs[cell], view_names[cell.views],
                              *tables[kind], console))
        console.print(f"cell {number}/{len(cells)} {cell.name}: accuracy {rows[-1]['accuracy']:.3f}, trained in "
                      f"{rows[-1]['train_seconds']:.1f} s" + (f" (not kept: {why_not})" if why_not else ""), highlight=False)
    if resume:
        console.print(f"--resume: kept {kept} of {len(cells)} cell(s), complete and fitted with these settings on the "
                      f"cache as it is now; trained {len(cells) - kept}")
    groups = _summarise(rows)
    write_json_atomic(settings.out / "grid.json", {"cells": rows, "groups": groups, "config": config_to_dict(settings)})
    baseline = _majority_baseline(train.labels, val.labels)
    plot_grid(settings.out / "grid.png", {f"{g['views']} / {g['fusion']}": g["accuracies"] for g in groups}, baseline)
    _print_grid(console, groups, len(val.records), baseline)
    return rows


def earlier_cells(out: Path) -> list[Path]:
    """The cell folders (with a head.json) under a fit-head --out."""
    return [folder for folder in out.iterdir() if (folder / "head.json").is_file()] if out.is_dir() else []


def _finished_row(folder: Path, cell: Cell, cell_config: FitHeadConfig, commits: str) -> tuple[dict | None, str]:
    """The grid row of a complete cell folder (its metrics.json, written last; its head and predictions there) fitted
    with `cell_config`'s settings on the cache with these `commits`, and ""; else None and why it is not one."""
    if not folder.is_dir():
        return None, ""  # a new cell: nothing to say
    if missing := [name for name in (HEAD_WEIGHTS, HEAD_INFO, "predictions.jsonl", "metrics.json")
                   if not (folder / name).is_file()]:
        return None, f"incomplete, no {missing[0]}"
    try:
        metrics = read_json(folder / "metrics.json")
        settings = metrics["settings"]
        saved, commits_then = settings["config"], settings.get("cache_commits")
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # not a cell's: fitted again
        return None, "its metrics.json is not a cell's"
    wanted = config_to_dict(cell_config)  # configs are saved with resume off (_train_grid)
    if changed := [f"{key} {saved.get(key)!r} -> {wanted.get(key)!r}" for key in dict.fromkeys([*wanted, *saved])
                   if key not in saved or key not in wanted or saved[key] != wanted[key]]:
        return None, "fitted with other settings: " + ", ".join(changed)
    if commits_then != commits:  # cells fitted before cache_commits were recorded: never kept
        return None, "fitted on the cache as it was before its shards changed"
    return _row(cell, metrics["accuracy"], metrics["num_takes"], settings["best_epoch"], settings["train_seconds"]), ""


def _row(cell: Cell, accuracy: float, num_takes: int, best_epoch: int, train_seconds: float) -> dict:
    return {"cell": cell.name, "views": cell.views, "fusion": cell.fusion, "seed": cell.seed, "accuracy": accuracy,
            "num_takes": num_takes, "best_epoch": best_epoch, "train_seconds": train_seconds}


def _fit_cell(cell: Cell, cell_config: FitHeadConfig, cache: FeatureCache, commits: str, settings: FitHeadConfig,
              head_config: HeadConfig, names: tuple[str, ...], train: FeatureTable, val: FeatureTable,
              console: Console) -> dict:
    """Train one cell, evaluate it on val and write its folder; returns its grid row."""
    try:
        trained = train_head(train, head_config, settings, cell.seed)
    except TrainingDiverged as err:  # the cells before it are written; this one has nothing worth keeping
        raise TrainingDiverged(f"{settings.out / cell.name}: {err}") from None
    if settings.holdout > 0 and not trained.holdout_losses:  # a silent choice otherwise (finetune says it too)
        console.print(f"[yellow]note:[/] cell {cell.name}: --holdout {settings.holdout} leaves no held-out takes among "
                      f"its {int(train.usable.sum())} train takes; its last epoch is kept")
    probabilities = predict_probabilities(trained, val, settings.precision)
    folder = settings.out / cell.name
    mark_incomplete(folder)  # a rerun's: its old metrics must not vouch for the new head
    save_config(cell_config, folder / "config.json")
    cell_settings = {
        "views": cell.views, "view_names": list(names), "fusion": cell.fusion, "seed": cell.seed,
        "best_epoch": trained.best_epoch, "train_losses": trained.train_losses, "holdout_losses": trained.holdout_losses,
        "train_takes": int(train.usable.sum()), "train_seconds": round(trained.seconds, 3),
        "config": config_to_dict(cell_config), "cache_commits": commits,
    }
    save_head(folder, trained.head, head_config, names, cache=str(cache.root.resolve()),
              cache_fingerprint=cache.spec.fingerprint, frames=cache.spec.frames, settings=cell_settings,
              precision=settings.precision, label_prior=trained.label_prior.tolist())
    # metrics.json last, as in finetune runs: a cell folder that has it is complete
    metrics = write_evaluation(folder, val.take_uids, val.labels.cpu().numpy(), probabilities, val.scenarios,
                               val.present.cpu().numpy(), names, cell_settings, cell.name)
    if settings.submission:
        write_submission(settings.submission, val.take_uids, probabilities)
    return _row(cell, metrics["accuracy"], metrics["num_takes"], trained.best_epoch, round(trained.seconds, 3))


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of each (views, fusion) pair, in grid order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["views"], row["fusion"]), []).append(row)
    return [
        {"views": views, "fusion": fusion, "seeds": len(members), "mean": float(np.mean([r["accuracy"] for r in members])),
         "std": seed_spread([r["accuracy"] for r in members]), "accuracies": [r["accuracy"] for r in members],
         "train_seconds": float(np.mean([r["train_seconds"] for r in members]))}
        for (views, fusion), members in groups.items()
    ]


def _majority_baseline(train_labels: np.ndarray, val_labels: np.ndarray) -> float:
    """Val accuracy of always predicting train's most frequent label."""
    return float(np.mean(val_labels == np.bincount(train_labels, minlength=4).argmax()))


def _print_grid(console: Console, groups: list[dict], num_val: int, baseline: float) -> None:
    table = Table(title=f"fit-head: val accuracy over {num_val} takes (train-majority baseline {baseline:.3f})")
    for column in ("views", "fusion", "seeds", "accuracy (mean ± std over seeds)", "per seed", "s / cell"):
        table.add_column(column)
    for group in groups:
        spread = f" ± {group['std']:.3f}" if group["seeds"] > 1 else ""  # undefined for one seed
        table.add_row(group["views"], group["fusion"], str(group["seeds"]), f"{group['mean']:.3f}{spread}",
                      " ".join(f"{a:.3f}" for a in group["accuracies"]), f"{group['train_seconds']:.1f}")
    console.print(table)
