"""`skillpipe extract`: cache TimeSformer token features of every take of a split."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.config import load_config
from pipeline.distributed import Ranks, init_distributed, local_device
from pipeline.extraction import ExtractConfig, ExtractSummary, run_extraction

FAILURES_EXIT = 3  # the run finished, but some views could not be used


def extract(
    root: Optional[Path] = typer.Option(None, help="egoexo download root (holds annotations/ and takes/)."),
    split: Optional[str] = typer.Option(None, help="Annotation split to extract: train or val."),
    cache: Optional[Path] = typer.Option(None, help="Feature cache folder (default cache/features)."),
    backbone: Optional[str] = typer.Option(None, help="TimeSformer hub id or local folder (default facebook/timesformer-base-finetuned-k600)."),
    frames: Optional[int] = typer.Option(None, help="Frames T sampled uniformly over each take (default 16)."),
    views: Optional[str] = typer.Option(None, help="Comma-separated views to extract (default ego,exo1,exo2,exo3,exo4)."),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder (or a finetune run holding adapter/)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda[:N]."),
    precision: Optional[str] = typer.Option(None, help="bf16 (autocast, default) or fp32."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per backbone forward (default 1 on CPU, 16 on CUDA)."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes; 0 decodes in the main process (default 1)."),
    shard_size: Optional[int] = typer.Option(None, help="Takes per zarr shard, the unit of commit and resume (default 16)."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="SDPA attention + torch.compile: ~1.3x faster forwards after a one-off compile; recorded in the fingerprint.",
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON config file; flags override it."),
) -> None:
    """Decode takes, run the backbone per view, and commit token features to a zarr cache (resumable)."""
    overrides = dict(
        root=root, split=split, cache=cache, backbone=backbone, frames=frames, views=views, adapter=adapter,
        device=device, precision=precision, batch_size=batch_size, workers=workers, shard_size=shard_size,
        compile=compile,
    )
    settings = load_config(ExtractConfig, config, overrides)
    ranks = init_distributed(settings.device)  # torchrun: each rank extracts its own shards
    settings = dataclasses.replace(settings, device=local_device(settings.device))
    summary = extract_with_progress(settings, ranks=ranks)
    raise typer.Exit(FAILURES_EXIT if summary.failures else 0)


def extract_with_progress(settings: ExtractConfig, console: Console | None = None, ranks: Ranks = Ranks()) -> ExtractSummary:
    """Run extraction under a rich progress bar, then print a summary naming every failed view."""
    console = console or Console()
    columns = (
        TextColumn(f"extract {settings.split}"), BarColumn(), MofNCompleteColumn(), TextColumn("takes"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not ranks.is_main) as progress:
        task = progress.add_task("extract", total=None, rate="")
        clips = [0]

        def on_start(total: int, skipped: int) -> None:
            progress.reset(task, total=total, completed=skipped)

        def on_take(num_clips: int) -> None:
            clips[0] += num_clips
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=1, rate=f"{clips[0] / elapsed:.2f} clips/s")

        summary = run_extraction(settings, on_take=on_take, on_start=on_start, ranks=ranks)
    rate = summary.clips / summary.seconds if summary.seconds else 0.0
    where = f"rank {ranks.rank}/{ranks.world_size} " if ranks.world_size > 1 else ""
    console.print(
        f"{where}{settings.split}: {summary.total_takes} takes; computed {summary.computed_takes}, "
        f"already cached {summary.skipped_takes}; {summary.clips} clips in {summary.seconds:.1f} s "
        f"({rate:.2f} clips/s) -> {settings.cache}"
    )
    if summary.failures and ranks.is_main:
        console.print(f"[yellow]{len(summary.failures)} take(s) with failed views[/] (see {settings.cache}/failures.json):")
        for uid, reasons in sorted(summary.failures.items()):
            for view, reason in reasons.items():
                console.print(f"  {uid} {view}: {reason}", highlight=False, markup=False)
    return summary
