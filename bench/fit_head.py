"""fit-head speed on a cache of the real benchmark's size filled with random features.

    python -m bench.fit_head [--cells 3]

1904 train + 466 val takes, 5 views, T=16, D=768; one cell = 4 epochs, H=1536, 16 heads, batch 64.
Prints the skillpipe loop (the stage's own FeatureTable + train_head) beside a plain eager fp32
loop with default AdamW, and the achieved FLOP/s against the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import count_flops, matmul_peak_gflops
from pipeline.cache import CacheSpec, FeatureCache, TakeRecord
from pipeline.fusion import HeadConfig, build_head
from pipeline.head_training import FeatureTable, FitHeadConfig, head_config_for, load_complete_split, train_head
from pipeline.takes import VIEWS

TRAIN, VAL, FRAMES, DIM = 1904, 466, 16, 768


def random_cache(root: Path) -> FeatureCache:
    spec = CacheSpec(fingerprint={"bench": "random"}, views=VIEWS, frames=FRAMES, num_patches=196, hidden_size=DIM, shard_size=64)
    cache = FeatureCache.open_or_create(root, spec)
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN), ("val", VAL)):
        uids = [f"{split}{i:05d}" for i in range(count)]
        for shard, shard_uids in enumerate(cache.plan_split(split, uids)):
            tokens = rng.standard_normal((len(shard_uids), len(VIEWS), 1 + FRAMES, DIM), dtype=np.float32)
            records = [TakeRecord(u, u, split, int(rng.integers(4)), "Dance", (True,) * len(VIEWS)) for u in shard_uids]
            cache.write_shard(split, shard, tokens.astype(np.float16), records, {})
    return cache


def plain_loop(table: FeatureTable, head_config: HeadConfig, epochs: int, batch: int) -> float:
    """The obvious eager fp32 loop with default AdamW, for comparison."""
    torch.manual_seed(0)
    head = build_head(head_config)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    started = time.perf_counter()
    for _ in range(epochs):
        for rows in torch.randperm(len(table)).split(batch):
            loss = F.cross_entropy(head(table.inputs[rows], table.present[rows]), table.labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=3, help="cells (seeds) in the amortised grid")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache = random_cache(Path(folder) / "cache")
        build_s = time.perf_counter() - started
        config = FitHeadConfig(cache=cache.root, out=Path(folder) / "run", epochs=4, batch_size=64, hidden=1536, heads=16, holdout=0.0)
        head_config = head_config_for(cache, config, "crossview", len(VIEWS))
        started = time.perf_counter()
        table = FeatureTable(load_complete_split(cache, "train"), cache.spec.views, VIEWS, head_config)
        load_s = time.perf_counter() - started
        cell_s = []
        for seed in range(args.cells):
            started = time.perf_counter()
            train_head(table, head_config, config, seed, VIEWS)
            cell_s.append(time.perf_counter() - started)
        plain_s = plain_loop(table, head_config, config.epochs, config.batch_size)

        head = build_head(head_config)
        batch = torch.arange(config.batch_size)
        step_flops = count_flops(lambda: F.cross_entropy(head(table.inputs[batch], table.present[batch]), table.labels[batch]).backward())
        steps = config.epochs * -(-len(table) // config.batch_size)
        peak = matmul_peak_gflops(torch.bfloat16)
        ideal_s = step_flops * steps / (peak * 1e9)
        print(json.dumps({
            "cache_build_s": round(build_s, 2),
            "cache_load_and_pool_s": round(load_s, 2),
            "fit_head_cell_s": round(min(cell_s), 3),
            "fit_head_cells_s": [round(s, 3) for s in cell_s],
            "fit_head_cell_amortised_s": round(sum(cell_s) / len(cell_s), 3),
            "plain_fp32_loop_cell_s": round(plain_s, 3),
            "speedup_vs_plain": round(plain_s / min(cell_s), 2),
            "cell_gflop": round(step_flops * steps / 1e9, 1),
            "bf16_matmul_peak_gflops": round(peak, 1),
            "cell_s_at_bf16_peak": round(ideal_s, 3),
            "fraction_of_peak": round(ideal_s / min(cell_s), 3),
        }, indent=2))


if __name__ == "__main__":
    main()
