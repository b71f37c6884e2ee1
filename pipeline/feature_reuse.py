"""Features another cache already holds: `extract --reuse OTHER` copies them instead of decoding and encoding again.

For a cache that cannot be added to because its split's take list changed (a new annotation release adds or drops
takes) or because it holds other views: the new cache is extracted with `--reuse OLD`, and every take the two share
costs a copy, not a decode and a backbone forward per view. Only features made the same way are taken (the caches'
fingerprints must agree but for views and shard size), of a take from the same video file per view; a view that
failed in the other cache, or that it lacks, is decoded as usual.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.cache import CacheError, CacheSpec, FeatureCache, spec_differences
from pipeline.takes import Take, video_files

# how two caches may differ and still share features: which views they hold (matched by name), and how many takes
# make a shard
FREE_KEYS = ("views", "fingerprint.views", "shard_size")


class FeatureDonor:
    """The committed, fully recorded takes of another cache (every split), to copy features from."""

    def __init__(self, root: Path, spec: CacheSpec):
        try:
            self.cache = FeatureCache.open(root)
        except CacheError as err:
            raise CacheError(f"--reuse: {err}") from None
        differences = [line for line in spec_differences(asdict(self.cache.spec), asdict(spec), "--reuse cache has")
                       if line.split(":")[0] not in FREE_KEYS]
        if differences:
            listing = "\n".join(f"  - {d}" for d in differences)
            raise CacheError(f"--reuse {root}: its features were made differently; refusing to copy them:\n{listing}")
        # take_uid -> (split, shard, row in shard, view -> its video file, where the view is present)
        self.takes: dict[str, tuple[str, int, int, dict[str, str]]] = {}
        self.markers: dict[tuple[str, int], dict] = {}  # as indexed: a copy checks that its shard is still this one
        try:
            for split in self.cache.splits():
                self._index_split(split)
        except FileNotFoundError:  # a marker went between listing and reading it
            raise self._changed() from None
        self._shard: tuple[tuple[str, int], np.ndarray] | None = None  # the last shard read (takes come in row order)

    def _index_split(self, split: str) -> None:
        """Index the committed shards of `split` whose data is sound (every one is read: ~0.4 s for the 1,904 train
        takes at T=16); a damaged one is left out with a warning, and its takes are extracted here."""
        if damaged := self.cache.damaged_shards(split):  # one warning per split: a deleted array damages every shard
            first, problem = next(iter(damaged.items()))
            which, why = (f"shard {first}", problem) if len(damaged) == 1 else (f"{len(damaged)} shards", f"shard {first}: {problem}")
            warnings.warn(f"--reuse {self.cache.root}: the data of {which} of split {split} is damaged ({why}); their "
                          "takes are extracted here", stacklevel=3)
        for shard in sorted(self.cache.committed_shards(split) - set(damaged)):
            marker = self.markers[(split, shard)] = self.cache.shard_marker(split, shard)
            for row, record in enumerate(marker["records"]):
                files = marker.get("videos", {}).get(record["take_uid"])  # markers before 2026-12-05 have none
                if files is not None:
                    present = {view: files[view] for view, ok in zip(self.cache.spec.views, record["present"])
                               if ok and view in files}
                    self.takes[record["take_uid"]] = (split, shard, row, present)

    def reusable_views(self, take: Take, views: tuple[str, ...], root: Path) -> set[str]:
        """The views of `take` whose features the other cache holds, made from the same video files."""
        if take.take_uid not in self.takes:
            return set()
        present, files = self.takes[take.take_uid][3], video_files(take, views, root)
        return {view for view in views if view in present and present[view] == files.get(view)}

    def features(self, take_uid: str, views: set[str]) -> dict[str, np.ndarray]:
        """view -> (1 + T, D) float16 features of those (reusable) views; a CacheError if the other cache changed since
        it was indexed (a run writing it) or its data is damaged."""
        split, shard, row, _ = self.takes[take_uid]
        if self._shard is None or self._shard[0] != (split, shard):
            try:
                data, marker = self.cache.read_committed_shard(split, shard)
            except FileNotFoundError:
                raise self._changed() from None
            except CacheError as err:  # damaged since it was indexed: a rerun indexes it as damaged, and extracts those
                raise CacheError(f"--reuse: {err}") from None
            if marker != self.markers[(split, shard)]:  # rewritten since: its features may come from other files now
                raise self._changed()
            self._shard = (split, shard), data
        return {view: self._shard[1][row, self.cache.spec.views.index(view)] for view in views}

    def _changed(self) -> CacheError:
        return CacheError(f"--reuse {self.cache.root}: it changed while this run read it (an extract run is writing it); "
                          "rerun once that run has ended")
