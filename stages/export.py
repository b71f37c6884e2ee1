"""`skillpipe export`: copy a feature cache into a format other tools read."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.cache import FeatureCache
from pipeline.config import ConfigError
from pipeline.export import export_hdf5


def export(
    cache: Path = typer.Option(..., help="Feature cache folder written by `skillpipe extract`."),
    out: Path = typer.Option(..., help="Output file, e.g. features.h5."),
    format: str = typer.Option("hdf5", "--format", help="Output format: hdf5."),
    split: Optional[List[str]] = typer.Option(None, "--split", help="Split to export; repeat for several. Default: every split."),
) -> None:
    """Export a feature cache's arrays and per-take index (HDF5, readable with plain h5py)."""
    if format != "hdf5":
        raise ConfigError(f"--format {format!r} is not supported (supported: hdf5)")
    counts = export_hdf5(FeatureCache.open(cache), out, split)
    takes = ", ".join(f"{count} {name}" for name, count in counts.items())
    Console().print(f"exported {takes} takes from {escape(str(cache))} -> {escape(str(out))}")
