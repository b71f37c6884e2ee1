"""Keep an extract cache's committed shards true to what they were made from, before a rerun goes on.

A committed shard's data may be damaged since (a file deleted, emptied or corrupted: pipeline.cache notices), and
the annotation file may have been corrected since (labels, scenarios, or which video file a view is). Extract's
rank 0 runs these while it holds the split's writer lock, before the other ranks start: damaged shards and those of
takes whose files changed become pending again, and changed labels are updated in place.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from pipeline.cache import FeatureCache, TakeRecord
from pipeline.takes import LABEL_NAMES, Take, video_files


def uncommit_damaged_shards(cache: FeatureCache, split: str) -> None:
    """Make the committed shards whose data was damaged since (a file deleted, emptied or corrupted; see
    pipeline.cache) pending again, so that this run extracts them anew."""
    for shard, problem in cache.damaged_shards(split).items():
        warnings.warn(f"{cache.root}: the data of committed shard {shard} of split {split} is damaged ({problem}); "
                      "extracting it again", stacklevel=2)
        cache.uncommit_shard(split, shard)


def refresh_committed_shards(cache: FeatureCache, split: str, takes: list[Take], views: tuple[str, ...], root: Path) -> None:
    """Bring the committed shards in line with the annotations as they are now (the takes themselves are the same:
    plan_split checked that).

    A take whose label or scenario changed has its records updated: its features do not depend on them. A take whose
    video files changed (another camera in a view's slot, or a renamed take folder) has its shard made pending again,
    so that this run extracts it anew. Markers written before 2026-12-05 (twelfth session) do not record their files:
    there only the records are compared, and a renamed folder updates the take's name in place.
    """
    by_uid = {take.take_uid: take for take in takes}
    relabelled: list[str] = []
    for shard in sorted(cache.committed_shards(split)):
        marker = cache.shard_marker(split, shard)
        moved = [uid for uid, files in marker.get("videos", {}).items() if files != video_files(by_uid[uid], views, root)]
        if moved:
            warnings.warn(f"{cache.root}: the annotations now give other video files for {', '.join(moved)} than their "
                          f"cached features came from; extracting shard {shard} of split {split} again", stacklevel=2)
            cache.uncommit_shard(split, shard)
            continue
        records = [TakeRecord.from_json(r) for r in marker["records"]]
        current = [dataclasses.replace(r, label=int(by_uid[r.take_uid].label), scenario=by_uid[r.take_uid].scenario,
                                       take_name=by_uid[r.take_uid].take_name) for r in records]
        if current != records:
            relabelled += [f"{old.take_uid} ({_described(old)} -> {_described(new)})"
                           for old, new in zip(records, current) if old != new]
            cache.update_records(split, shard, current)
    if relabelled:
        examples = "; ".join(relabelled[:3]) + ("; ..." if len(relabelled) > 3 else "")
        warnings.warn(f"{cache.root}: {len(relabelled)} cached take(s) of split {split} have another label, scenario or "
                      f"folder in the annotations now: {examples}. Their records were updated (features do not depend "
                      "on them); heads fitted before keep the old labels", stacklevel=2)


def _described(record: TakeRecord) -> str:
    return f"{LABEL_NAMES[record.label]}, {record.scenario}, {record.take_name}"
