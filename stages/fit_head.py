"""`skillpipe fit-head`: train and evaluate fusion heads on a feature cache, a whole grid at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cache import FeatureCache
from pipeline.checkpoints import save_head
from pipeline.config import config_to_dict, load_config, save_config
from pipeline.files import write_json_atomic
from pipeline.head_training import (
    FeatureTable, FitHeadConfig, check_heads, evaluate_head, grid_cells, head_config_for, load_complete_split, train_head,
)
from pipeline.metrics import plot_grid, write_evaluation, write_submission
from pipeline.views import parse_view_setting


def fit_head(
    cache: Optional[Path] = typer.Option(None, help="Feature cache folder (needs finished train and val splits)."),
    out: Optional[Path] = typer.Option(None, help="Run folder: one sub-folder per grid cell, plus grid.json."),
    views: Optional[List[str]] = typer.Option(None, help="View setting: ego, exos, ego+exos or e.g. ego+exo2. Repeat for a grid."),
    fusion: Optional[List[str]] = typer.Option(None, help="crossview, crossview-nogate, mean, concat, temporal. Repeat for a grid."),
    seed: Optional[List[int]] = typer.Option(None, help="Random seed. Repeat for a grid."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 10)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-4)."),
    batch_size: Optional[int] = typer.Option(None, help="Takes per step (default 64)."),
    hidden: Optional[int] = typer.Option(None, help="Projector size H (default 1536)."),
    heads: Optional[int] = typer.Option(None, help="Attention heads (default 16)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0.01)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Share of steps warming up the cosine schedule (default 0.1)."),
    holdout: Optional[float] = typer.Option(None, help="Stratified share of train held out to pick the best epoch (default 0.1)."),
    precision: Optional[str] = typer.Option(None, help="bf16 (autocast, default) or fp32."),
    submission: Optional[Path] = typer.Option(None, help="Write the challenge submission JSON of the first cell here."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON config file; flags override it."),
) -> None:
    """Train fusion heads on cached features over views x fusions x seeds; evaluate on val."""
    overrides = dict(
        cache=cache, out=out, views=tuple(views) if views else None, fusions=tuple(fusion) if fusion else None,
        seeds=tuple(seed) if seed else None, epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden, heads=heads,
        weight_decay=weight_decay, warmup_ratio=warmup_ratio, holdout=holdout, precision=precision, submission=submission,
    )
    run_grid(load_config(FitHeadConfig, config, overrides))


def run_grid(settings: FitHeadConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    cache = FeatureCache.open(settings.cache)
    check_heads(cache, settings)
    view_names = {setting: parse_view_setting(setting, cache.spec.views) for setting in settings.views}
    train, val = load_complete_split(cache, "train"), load_complete_split(cache, "val")
    save_config(settings, settings.out / "config.json")
    bf16 = settings.precision == "bf16"
    rows, tables = [], {}
    for cell in grid_cells(settings):
        names = view_names[cell.views]
        head_config = head_config_for(cache, settings, cell.fusion, len(names))
        kind = (cell.views, cell.fusion == "temporal")
        if kind not in tables:  # pooled once per view selection and input kind, shared by seeds
            tables[kind] = tuple(FeatureTable(split, cache.spec.views, names, head_config) for split in (train, val))
        train_table, val_table = tables[kind]
        trained = train_head(train_table, head_config, settings, cell.seed, names)
        result = evaluate_head(trained, val_table, bf16)
        folder = settings.out / cell.name
        cell_settings = {
            **config_to_dict(settings), "views": cell.views, "view_names": list(names), "fusion": cell.fusion,
            "seed": cell.seed, "best_epoch": trained.best_epoch, "holdout_losses": trained.holdout_losses,
            "train_takes": len(train_table), "dropped_val_takes": val_table.dropped,
        }
        metrics = write_evaluation(folder, result.take_uids, result.labels, result.probabilities, result.scenarios,
                                   cell_settings, cell.name)
        save_head(folder, trained.head, head_config, names, cache=str(cache.root.resolve()),
                  cache_fingerprint=cache.spec.fingerprint, frames=cache.spec.frames, settings=cell_settings)
        if settings.submission and not rows:
            write_submission(settings.submission, result.take_uids, result.probabilities)
        rows.append({"cell": cell.name, "views": cell.views, "fusion": cell.fusion, "seed": cell.seed,
                     "accuracy": metrics["accuracy"], "num_takes": metrics["num_takes"]})
    write_json_atomic(settings.out / "grid.json", {"cells": rows, "config": config_to_dict(settings)})
    groups = _group_by_setting(rows)
    majority = float(np.bincount(val.labels, minlength=4).max() / len(val.labels))
    plot_grid(settings.out / "grid.png", groups, chance=majority)
    _print_grid(console, groups, len(val.records))
    return rows


def _group_by_setting(rows: list[dict]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(f"{row['views']} / {row['fusion']}", []).append(row["accuracy"])
    return groups


def _print_grid(console: Console, groups: dict[str, list[float]], num_val: int) -> None:
    table = Table(title=f"fit-head: val accuracy over {num_val} takes")
    for column in ("views / fusion", "seeds", "mean", "std", "per seed"):
        table.add_column(column)
    for name, accuracies in groups.items():
        table.add_row(name, str(len(accuracies)), f"{np.mean(accuracies):.3f}", f"{np.std(accuracies):.3f}",
                      " ".join(f"{a:.3f}" for a in accuracies))
    console.print(table)
