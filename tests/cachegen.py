"""Generate small feature caches for head tests, with the skill label split across views.

Label = 2 * exo_bit + ego_bit. The ego view's tokens carry ego_bit (+-signal along one feature
direction) and every exo view's tokens carry exo_bit (along another), on top of unit noise. One
side alone can tell at most 2 of the 4 labels apart, so only ego+exos can be accurate.
"""

from pathlib import Path

import numpy as np

from pipeline.cache import CacheSpec, FeatureCache, TakeRecord
from pipeline.takes import SCENARIOS, VIEWS

DIM, FRAMES, PATCHES, SHARD = 32, 4, 196, 16


def split_view_cache(root: Path, train: int = 96, val: int = 48, seed: int = 0, signal: float = 1.5, absent: float = 0.0,
                     splits: tuple[str, ...] = ("train", "val"), views: tuple[str, ...] = VIEWS) -> FeatureCache:
    """A finished cache of `train` + `val` takes; each view is absent (zero rows) with probability `absent`."""
    spec = CacheSpec(fingerprint={"backbone": "synthetic", "seed": seed}, views=views, frames=FRAMES,
                     num_patches=PATCHES, hidden_size=DIM, shard_size=SHARD)
    cache = FeatureCache.open_or_create(root, spec)
    rng = np.random.default_rng(seed)
    is_ego = np.array([view == "ego" for view in views])
    for split, count in (("train", train), ("val", val)):
        if split not in splits:
            continue
        labels = np.resize(np.arange(4), count)
        tokens = rng.normal(0, 1, (count, len(views), 1 + FRAMES, DIM))  # (N, V, 1 + T, D)
        tokens[..., 0][:, is_ego] += signal * np.where(labels % 2, 1, -1)[:, None, None]  # ego_bit
        tokens[..., 1][:, ~is_ego] += signal * np.where(labels // 2, 1, -1)[:, None, None]  # exo_bit
        present = rng.random((count, len(views))) >= absent
        present[:, 0] |= ~present.any(1)  # keep at least one view per take
        tokens[~present] = 0
        uids = [f"{split}-{i:04d}" for i in range(count)]
        for shard, shard_uids in enumerate(cache.plan_split(split, uids)):
            rows = range(shard * SHARD, shard * SHARD + len(shard_uids))
            records = [TakeRecord(uids[i], f"take_{uids[i]}", split, int(labels[i]), SCENARIOS[i % 3],
                                  tuple(bool(p) for p in present[i])) for i in rows]
            cache.write_shard(split, shard, tokens[rows.start : rows.stop].astype(np.float16), records, {})
    return cache
