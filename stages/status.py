"""`skillpipe status`: how far a feature cache is extracted, what made it, and which run writes it now."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.cache import FeatureCache
from pipeline.cache_status import SplitStatus, made_with, split_status
from pipeline.extraction import saved_config_path
from pipeline.takes import SPLITS
from pipeline.views import FAILURES_EXIT


def status(
    cache: Path = typer.Option(..., help="Feature cache folder written by `skillpipe extract`."),
    check: bool = typer.Option(False, "--check", help="Also read every committed shard and name those whose data is "
                                                      "damaged (~0.4 s per 2,000 takes at T=16)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show each split's progress (takes and shards committed of those planned), its takes with failed views, the run
    writing it now if any, and how the cache's features were made. Reads only. Exits 3 when it finds a damaged shard."""
    feature_cache = FeatureCache.open(cache)
    splits = [split_status(feature_cache, split, check) for split in feature_cache.splits()]
    if as_json:
        rows = [{**dataclasses.asdict(split), "complete": split.complete} for split in splits]
        print(json.dumps({"cache": str(cache), "made_with": made_with(feature_cache), "splits": rows}, indent=2))
    else:
        _print_status(cache, feature_cache, splits, check)
    if any(split.damaged or split.unreadable_markers for split in splits):  # for scripts: a rerun of extract is due
        raise typer.Exit(FAILURES_EXIT)


def _print_status(cache: Path, feature_cache: FeatureCache, splits: list[SplitStatus], check: bool) -> None:
    console = Console()
    made = made_with(feature_cache)
    console.print(f"cache {escape(str(cache))}: " + ", ".join(f"{key} {_shown(value)}" for key, value in made.items()
                                                           if value is not None), highlight=False)
    if not splits:
        console.print("no split planned yet: run `skillpipe extract`")
        return
    console.print(_table(splits, check))
    planned = {split.split for split in splits}
    for missing in (split for split in SPLITS if split not in planned):  # fit-head reads both
        config = next((path for split in sorted(planned) if (path := saved_config_path(cache, split)).is_file()), None)
        # --cache too: the saved config names the folder the cache was extracted in, which it may have left since
        how = f"`skillpipe extract --config {config} --cache {cache} --split {missing}` does, with the same settings" \
            if config else \
            f"`skillpipe extract --split {missing}` into it does"
        console.print(f"no {missing} split yet: fit-head needs one; {escape(how)}", soft_wrap=True, highlight=False)
    for split in splits:
        problems = split.damaged or dict.fromkeys(split.unreadable_markers, "its commit marker is unreadable")
        for shard, problem in problems.items():
            console.print(f"{split.split} shard {shard}: {escape(problem)}", highlight=False)
    if any(split.damaged or split.unreadable_markers for split in splits):
        console.print("Rerun the `skillpipe extract` command of such a split: it extracts damaged shards again.")
    if any(split.takes_with_failed_views for split in splits):
        console.print(f"failed views: {escape(str(Path(cache) / 'failures.json'))}; once the files are fixed or fetched, "
                      "`skillpipe extract ... --retry-failed` decodes them again", soft_wrap=True)


def _table(splits: list[SplitStatus], check: bool) -> Table:
    table = Table()
    for column in ("split", "takes committed", "shards committed", "takes with failed views", "state", "written by",
                   *(("damaged shards",) if check else ())):
        table.add_column(column)
    for split in splits:
        damaged = (", ".join(map(str, split.damaged)) or "none",) if check else ()
        table.add_row(split.split, f"{split.committed_takes}/{split.planned_takes}",
                      f"{split.committed_shards}/{split.planned_shards}", str(split.takes_with_failed_views),
                      "complete" if split.complete else "unfinished", split.writer or "no run", *damaged)
    return table


def _shown(value: object) -> str:
    if isinstance(value, dict):  # preprocessing: its sampling is what tells caches apart
        return str(value.get("sampling", value))
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12]
    return str(value)
