"""Extraction under a rich progress bar, with a summary naming every failed view.

Shared by `skillpipe extract` and `skillpipe demo`.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.distributed import Ranks
from pipeline.extraction import ExtractConfig, ExtractSummary, run_extraction


def extract_with_progress(settings: ExtractConfig, console: Console | None = None, ranks: Ranks = Ranks()) -> ExtractSummary:
    """Run extraction under a rich progress bar, then print a summary naming every failed view."""
    console = console or Console()
    columns = (
        TextColumn(f"extract {settings.split}"), BarColumn(), MofNCompleteColumn(), TextColumn("takes"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    # shown from the start of the work on: a run refused in its set-up (a wrong path, another cache) prints no bar
    progress = Progress(*columns, console=console, disable=not ranks.is_main)
    task = progress.add_task("extract", total=None, rate="")
    clips = [0]

    def on_start(total: int, skipped: int) -> None:
        progress.start()
        progress.reset(task, total=total, completed=skipped)

    def on_take(num_clips: int) -> None:
        clips[0] += num_clips
        elapsed = progress.tasks[task].elapsed or 1e-9
        progress.update(task, advance=1, rate=f"{clips[0] / elapsed:.2f} clips/s")

    try:
        summary = run_extraction(settings, on_take=on_take, on_start=on_start, ranks=ranks)
    finally:
        progress.stop()
    rate = summary.clips / summary.seconds if summary.seconds else 0.0
    where = f"rank {ranks.rank}/{ranks.world_size} " if ranks.world_size > 1 else ""
    console.print(
        f"{where}{settings.split}: {summary.total_takes} takes; computed {summary.computed_takes}, "
        f"already cached {summary.skipped_takes}"
        f"{f', copied from --reuse {summary.reused_takes}' if settings.reuse else ''}; {summary.clips} clips in {summary.seconds:.1f} s "
        f"({rate:.2f} clips/s) -> {escape(str(settings.cache))}"
    )
    if summary.failures and ranks.is_main:
        console.print(f"[yellow]{len(summary.failures)} take(s) with failed views[/] (see {escape(str(settings.cache / 'failures.json'))}):")
        for uid, reasons in sorted(summary.failures.items()):
            for view, reason in reasons.items():
                console.print(f"  {uid} {view}: {reason}", highlight=False, markup=False)
        console.print("These views are absent in the cache. Once the files are fixed or fetched, rerun with --retry-failed.",
                      soft_wrap=True)
    return summary
