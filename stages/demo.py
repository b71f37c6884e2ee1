"""`skillpipe demo-data` and `skillpipe demo`: the whole pipeline on generated EgoExo4D-layout data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.backbone import save_tiny_backbone
from pipeline.demo_data import write_demo_dataset
from pipeline.config import ConfigError, load_config
from pipeline.extraction import ExtractConfig
from pipeline.extraction_progress import extract_with_progress
from pipeline.head_grid import run_grid
from pipeline.head_training import FitHeadConfig
from pipeline.takes import annotation_path, load_takes

DEMO_FRAMES = 8
DEMO_FIT_HEAD = Path(__file__).resolve().parent.parent / "configs" / "demo-fit-head.yaml"


def demo_data(
    out: Path = typer.Argument(..., help="Folder to write the dataset into (egoexo download layout)."),
    takes: int = typer.Option(40, help="Number of takes over both splits."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same dataset."),
    frames: int = typer.Option(24, min=1, help="Frames per video: at least the --frames of the runs on it "
                                                 "(the published ego recipe samples 32)."),
) -> None:
    """Write a small synthetic dataset in the exact egoexo layout (annotations + 448px mp4s)."""
    summary = write_demo_dataset(out, takes=takes, seed=seed, frames=frames)
    splits = "; ".join(f"{split} {count} takes ({', '.join(f'{label} {n}' for label, n in summary.labels[split].items())})"
                       for split, count in summary.takes.items())
    Console().print(f"wrote demo dataset to {escape(str(out))}: {splits}", highlight=False)


def demo(
    out: Path = typer.Option(Path("cache/demo"), help="Folder for the demo's data, backbone, cache and runs."),
    takes: int = typer.Option(80, help="Number of demo takes over both splits."),
) -> None:
    """Run the pipeline end to end on generated demo data with a tiny random TimeSformer."""
    console = Console()
    data, backbone_dir, cache = out / "data", out / "tiny-timesformer", out / "cache"
    if not all(annotation_path(data, split).is_file() for split in ("train", "val")):  # written last, atomically
        console.print(f"[bold]1. demo data[/] -> {escape(str(data))}")
        write_demo_dataset(data, takes=takes, seed=0, frames=12)
    elif (written := sum(len(load_takes(data, split)) for split in ("train", "val"))) != takes:
        raise ConfigError(f"{data}: holds a demo dataset of {written} takes, not --takes {takes}; give another --out "
                          "(or delete that folder)")
    if not (backbone_dir / "config.json").is_file():
        console.print(f"[bold]2. tiny random TimeSformer[/] -> {escape(str(backbone_dir))} (pretrained weights cannot be downloaded everywhere)")
        save_tiny_backbone(backbone_dir, seed=0)
    failures = 0
    for split in ("train", "val"):
        console.print(f"[bold]3. extract {split}[/] -> {escape(str(cache))}")
        settings = ExtractConfig(root=data, split=split, cache=cache, backbone=str(backbone_dir), frames=DEMO_FRAMES)
        failures += len(extract_with_progress(settings, console).failures)
    if failures:
        raise typer.Exit(3)
    console.print(f"[bold]4. fit-head grid[/] ego / exos / ego+exos -> {escape(str(out / 'fit-head'))} (the skill cues are split across views)")
    run_grid(load_config(FitHeadConfig, DEMO_FIT_HEAD, {"cache": cache, "out": out / "fit-head"}), console)
