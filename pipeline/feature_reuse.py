"""Features extract need not compute: another cache's (`extract --reuse OTHER` copies them instead of decoding and
encoding again), and a retried shard's views that did not fail (`extract --retry-failed` keeps them).

For a cache that cannot be added to because its split's take list changed (a new annotation release adds or drops
takes) or because it holds other views: the new cache is extracted with `--reuse OLD`, and every take the two share
costs a copy, not a decode and a backbone forward per view. Only features made the same way are taken (the caches'
fingerprints must agree but for views and shard size), of a take from the same video file per view; a view that
failed in the other cache, or that it lacks, is decoded as usual.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import decoder_crashes
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


@dataclass
class KnownFeatures:
    """A pending shard's views that need no decoding: the committed ones of a shard that --retry-failed rewrites, or
    another cache's (--reuse)."""

    decode: dict[str, tuple[str, ...]]  # take_uid -> its views still to decode; a take not named decodes none
    read: Callable[[], list[dict[str, np.ndarray]]]  # per take of the shard: view -> (1 + T, D) features
    rewrite: bool  # a committed shard of this cache: uncommitted just before it is written


def known_features(cache: FeatureCache, split: str, views: tuple[str, ...], root: Path,
                   owned_shards: list[tuple[int, list[Take]]], done: set[int], retry_failed: bool,
                   donor: FeatureDonor | None) -> dict[int, KnownFeatures]:
    """Shard -> its views that need no decoding: with `retry_failed`, a committed shard's views that did not fail;
    with a `donor` (--reuse), a pending shard's views that the other cache holds."""
    known = {}
    for k, shard_takes in owned_shards:
        if k in done and retry_failed and (failed := cache.shard_failures(split, k)):
            decoder_crashes.forget(cache.root, list(failed))  # their files are decoded again, guarded as ever
            known[k] = KnownFeatures({uid: tuple(view for view in views if view in failed_views)
                                      for uid, failed_views in failed.items()},
                                     partial(_committed_views, cache, split, views, k), rewrite=True)
        elif k not in done and donor and any(reusable := [donor.reusable_views(take, views, root) for take in shard_takes]):
            decode = {take.take_uid: tuple(view for view in views if view not in held)
                      for take, held in zip(shard_takes, reusable) if len(held) < len(views)}
            known[k] = KnownFeatures(decode, partial(_donated_views, donor, shard_takes, reusable), rewrite=False)
    return known


def _committed_views(cache: FeatureCache, split: str, views: tuple[str, ...], shard: int) -> list[dict[str, np.ndarray]]:
    """The features of a committed shard's present views, per take (checked: damage since the run began raises)."""
    data, marker = cache.read_committed_shard(split, shard)
    return [{view: data[i, v] for v, view in enumerate(views) if record["present"][v]}
            for i, record in enumerate(marker["records"])]


def _donated_views(donor: FeatureDonor, takes: list[Take], reusable: list[set[str]]) -> list[dict[str, np.ndarray]]:
    return [donor.features(take.take_uid, views) if views else {} for take, views in zip(takes, reusable)]
