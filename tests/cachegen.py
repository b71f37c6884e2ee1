"""Generate small feature caches for head tests: the label is split across views.

Label = 2 * exo_bit + ego_bit; the ego view's tokens carry ego_bit along one direction and every
exo view's tokens carry exo_bit along another, on top of noise. Only ego+exos can be perfect.
"""

from pathlib import Path

import numpy as np

from pipeline.cache import CacheSpec, FeatureCache, TakeRecord
from pipeline.takes import SCENARIOS, VIEWS

DIM, FRAMES, PATCHES = 32, 4, 196


def split_view_cache(root: Path, train: int = 96, val: int = 48, seed: int = 0, signal: float = 1.5,
                     absent: float = 0.0, splits=("train", "val")) -> FeatureCache:
    spec = CacheSpec(fingerprint={"backbone": "synthetic", "seed": seed}, views=VIEWS, frames=FRAMES,
                     num_patches=PATCHES, hidden_size=DIM, shard_size=16)
    cache = FeatureCache.open_or_create(root, spec)
    rng = np.random.default_rng(seed)
    ego_direction, exo_direction = np.eye(DIM)[0], np.eye(DIM)[1]
    for split, count in (("train", train), ("val", val)):
        if split not in splits:
            continue
        labels = np.resize(np.arange(4), count)
        uids = [f"{split}-{i:04d}" for i in range(count)]
        tokens = rng.normal(0, 1, (count, len(VIEWS), 1 + FRAMES, DIM))
        tokens[:, 0] += signal * np.where(labels % 2, 1, -1)[:, None, None] * ego_direction
        tokens[:, 1:] += signal * np.where(labels // 2, 1, -1)[:, None, None, None] * exo_direction
        present = rng.random((count, len(VIEWS))) >= absent
        present[:, 0] |= ~present.any(1)  # keep at least one view per take
        tokens[~present] = 0
        for shard, shard_uids in enumerate(cache.plan_split(split, uids)):
            rows = slice(shard * 16, shard * 16 + len(shard_uids))
            records = [
                TakeRecord(uid, f"take_{uid}", split, int(labels[i]), SCENARIOS[i % 3], tuple(bool(p) for p in present[i]))
                for i, uid in zip(range(rows.start, rows.stop), shard_uids)
            ]
            cache.write_shard(split, shard, tokens[rows].astype(np.float16), records, {})
    return cache
