"""`skillpipe fit-head`: train and evaluate fusion heads on a feature cache, a whole grid at once."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.config import load_config
from pipeline.fusion import FUSIONS
from pipeline.head_grid import run_grid
from pipeline.head_training import FitHeadConfig, field_help


def fit_head(
    cache: Optional[Path] = typer.Option(None, help=field_help("cache")),
    out: Optional[Path] = typer.Option(None, help=field_help("out")),
    views: Optional[List[str]] = typer.Option(None, help="View setting: ego, exos, ego+exos, ego+exo2 (+ joins views) ... Repeat, or separate with commas, for a grid."),
    fusion: Optional[List[str]] = typer.Option(None, help=f"Fusion variant: {', '.join(FUSIONS)}. Repeat for a grid."),
    seed: Optional[List[int]] = typer.Option(None, help="Seed (initialisation, dropout, data order). Repeat for a grid."),
    epochs: Optional[int] = typer.Option(None, help=field_help("epochs")),
    lr: Optional[float] = typer.Option(None, help=field_help("lr")),
    batch_size: Optional[int] = typer.Option(None, help=field_help("batch_size")),
    hidden: Optional[int] = typer.Option(None, help=field_help("hidden")),
    heads: Optional[int] = typer.Option(None, help=field_help("heads")),
    dropout: Optional[float] = typer.Option(None, help=field_help("dropout")),
    weight_decay: Optional[float] = typer.Option(None, help=field_help("weight_decay")),
    decay_norms_and_biases: Optional[bool] = typer.Option(None, help=field_help("decay_norms_and_biases")),
    warmup_ratio: Optional[float] = typer.Option(None, help=field_help("warmup_ratio")),
    holdout: Optional[float] = typer.Option(None, help=field_help("holdout")),
    precision: Optional[str] = typer.Option(None, help=field_help("precision")),
    device: Optional[str] = typer.Option(None, help=field_help("device")),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help=field_help("compile")),
    submission: Optional[Path] = typer.Option(None, help=field_help("submission")),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help=field_help("resume")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON file of FitHeadConfig fields; flags win."),
) -> None:
    """Train fusion heads on cached features over views x fusions x seeds; evaluate each on val."""
    overrides = dict(
        cache=cache, out=out, views=_split_commas(views), fusions=_split_commas(fusion), seeds=tuple(seed) if seed else None,
        epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden, heads=heads, dropout=dropout, weight_decay=weight_decay,
        decay_norms_and_biases=decay_norms_and_biases,
        warmup_ratio=warmup_ratio, holdout=holdout, precision=precision, device=device, compile=compile,
        submission=submission, resume=resume,
    )
    run_grid(load_config(FitHeadConfig, config, overrides))


def _split_commas(values: list[str] | None) -> tuple[str, ...] | None:
    """`--views ego,exos` and `--views ego --views exos` mean the same grid."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip()) if values else None
