"""Export a feature cache to one HDF5 file that plain h5py (or any HDF5 reader) can use.

Layout: `/<split>/tokens` (N, V, 1 + T, D) float16 chunked one take per chunk, `/<split>/present`
(N, V) bool, `/<split>/label` (N,) int64, `/<split>/take_uid`, `/<split>/take_name`,
`/<split>/scenario` (N,) UTF-8 strings; file attributes `views`, `label_names`, `frames`,
`num_patches`, `hidden_size`, `fingerprint` (JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache import CacheError, FeatureCache
from pipeline.takes import LABEL_NAMES


def export_hdf5(cache: FeatureCache, out: Path) -> dict[str, int]:
    """Write every committed take of every split to `out` (atomically); returns takes per split."""
    splits = [s for s in cache.splits() if cache.committed_shards(s)]
    if not splits:
        raise CacheError(f"{cache.root}: no committed takes to export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    counts = {}
    with h5py.File(partial, "w") as h5:
        h5.attrs["views"] = list(cache.spec.views)
        h5.attrs["label_names"] = list(LABEL_NAMES)
        h5.attrs["frames"] = cache.spec.frames
        h5.attrs["num_patches"] = cache.spec.num_patches
        h5.attrs["hidden_size"] = cache.spec.hidden_size
        h5.attrs["fingerprint"] = json.dumps(cache.spec.fingerprint, sort_keys=True)
        for split in splits:
            data = cache.read(split)
            group = h5.create_group(split)
            group.create_dataset("tokens", data=data.tokens, chunks=(1, *data.tokens.shape[1:]))
            group.create_dataset("present", data=data.present)
            group.create_dataset("label", data=data.labels)
            for name in ("take_uid", "take_name", "scenario"):
                values = [getattr(r, name) for r in data.records]
                group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            counts[split] = len(data.records)
    os.replace(partial, out)
    return counts
