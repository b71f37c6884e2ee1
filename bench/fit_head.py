"""fit-head speed on a cache of the real benchmark's size filled with random features.

    python -m bench.fit_head [--cells 3]

The cache (1904 train + 466 val takes, 5 views, T=16, D=768) is written with pipeline.cache into a
temporary folder and read back once through the stage's own loader (load_complete_split +
FeatureTable). A cell is crossview on ego+exos: 4 epochs over all 1904 train takes (holdout 0),
H=1536, 16 heads, batch 64. Measured, interleaved over --cells seeds so that every variant sees
the same quiet and noisy moments of the host:
  plain     the obvious eager fp32 loop with default AdamW over skillpipe's head (whose attention
            already averages its weights over the query views before the value product: 5.4
            GFLOP per step, where the reference's formulation does 6.4)
  eager     skillpipe's train_head (bf16 autocast, fused AdamW)
  compiled  skillpipe's train_head with --compile, in a process that compiled it once before
  replay    the cell's matmuls (one step's shapes and layouts, replayed) and its compiled AdamW
            pass, step after step: a reference point for what this loop's own work costs here,
            not a floor (the same products in another layout, W @ x.T, ran 1.4-2x faster alone)
  peak      the bf16 matmul peak (bench.common.matmul_peak_gflops)
Training time only: compiling, the cache read, pooling, evaluation and writing are outside these
cells; then the stage's run_grid with --compile over --cells seeds, everything included, per cell.
Also: the time the parameters' memory traffic alone needs at this process's copy bandwidth.
stdout: one JSON object (read by `python -m bench`); stderr: the side-by-side summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from bench.common import best_seconds, host_description, matmul_peak_gflops, median_paired_ratio, replayed_matmuls, timed_seconds
from pipeline.cache import CacheSpec, FeatureCache, TakeRecord
from pipeline.fusion import HeadConfig, build_head
from pipeline.head_training import FeatureTable, FitHeadConfig, head_config_for, load_complete_split, train_head
from pipeline.head_grid import run_grid
from pipeline.head_step import CompiledHeadTrainer, adamw_scalars, adamw_update
from pipeline.takes import SCENARIOS, VIEWS

TRAIN, VAL, FRAMES, DIM, PATCHES = 1904, 466, 16, 768, 196
# Bytes one step moves per head parameter. Eager (autocast + fused AdamW): cast the fp32 weight to
# bf16 (4 + 2), read it in the forward and backward matmuls (2 + 2), write the bf16 weight gradient
# and cast it to fp32 (2 + 2 + 4), AdamW reads weight, gradient and both moments and writes weight
# and both moments (16 + 12). Compiled (pipeline/head_step.py): the matmuls read the bf16 working
# weight (2 + 2) and write its bf16 gradient (2); one fused AdamW pass reads it, the fp32 weight and
# both moments (2 + 12) and writes those and the bf16 working copy (12 + 2).
EAGER_BYTES_PER_PARAMETER_STEP = 46
COMPILED_BYTES_PER_PARAMETER_STEP = 34
ADAMW_BYTES_PER_PARAMETER_STEP = 28  # the compiled step's AdamW pass alone: the 34 less the matmuls' 6
# The speed target: 2 s per cell on a host where the plain loop took 11 s. Hosts here differ up to ~5x
# (bf16 peaks of 650-3,300 GFLOP/s), so the target is scaled to this host by the plain loop's time.
TARGET_CELL_S, TARGET_HOST_PLAIN_LOOP_S = 2.0, 11.0


def random_cache(root: Path, seed: int = 0) -> FeatureCache:
    spec = CacheSpec(fingerprint={"bench": "random"}, views=VIEWS, frames=FRAMES, num_patches=PATCHES, hidden_size=DIM,
                     shard_size=64)
    cache = FeatureCache.open_or_create(root, spec)
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN), ("val", VAL)):
        uids = [f"{split}{i:05d}" for i in range(count)]
        for shard, shard_uids in enumerate(cache.plan_split(split, uids)):
            tokens = rng.standard_normal((len(shard_uids), len(VIEWS), 1 + FRAMES, DIM), dtype=np.float32)
            records = [TakeRecord(u, u, split, int(rng.integers(4)), SCENARIOS[int(rng.integers(6))], (True,) * len(VIEWS))
                       for u in shard_uids]
            cache.write_shard(split, shard, tokens.astype(np.float16), records, {})
    return cache


def plain_loop_s(table: FeatureTable, head_config: HeadConfig, epochs: int, batch: int) -> float:
    """The obvious eager fp32 loop with default AdamW, on the same resident inputs."""
    torch.manual_seed(0)
    head = build_head(head_config).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    started = time.perf_counter()
    for _ in range(epochs):
        for rows in torch.randperm(len(table)).split(batch):
            loss = F.cross_entropy(head(table.inputs[rows], table.present[rows]), table.labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def autocast_step(table: FeatureTable, head_config: HeadConfig, batch_size: int) -> Callable[[], None]:
    """One eager bf16-autocast forward + backward of a fresh head on the first batch (its matmuls: shapes, FLOPs)."""
    head = build_head(head_config).train()
    rows = torch.arange(batch_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(table.inputs[rows], table.present[rows])
        F.cross_entropy(logits.float(), table.labels[rows]).backward()

    return step


def adamw_pass(head_config: HeadConfig) -> Callable[[], float]:
    """A measurement of the compiled step's AdamW pass alone (fp32 masters and moments, bf16 gradients in and
    working copy out), compiled the same way, over a fresh head's parameters."""
    state = CompiledHeadTrainer(build_head(head_config), rows_per_step=1, weight_decay=0.01, compile=False)
    grads = {name: torch.randn_like(p).to(torch.bfloat16) for name, p in state.master.items()}
    scalars = [torch.tensor(value) for value in adamw_scalars(1e-4, 10, state.betas, state.weight_decay)]
    update = torch.compile(adamw_update)

    def run() -> None:
        update(state.master, state.working, grads, state.first, state.second, *scalars, state.betas, state.eps, state.decayed)

    run()  # compiles
    return lambda: timed_seconds(run)


def replay_run(step_matmuls_s: Callable[[], float], step_adamw_s: Callable[[], float], steps: int) -> tuple[float, float]:
    """(matmul seconds, AdamW seconds) of a cell reduced to its matmuls and optimizer: `steps` times one step's
    replayed matmuls and its AdamW pass, in step order, over a cell's length of time like the cells beside it."""
    matmuls = adamw = 0.0
    for _ in range(steps):
        matmuls += step_matmuls_s()
        adamw += step_adamw_s()
    return matmuls, adamw


def copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Best-of bytes moved per second by a large tensor copy (read + write)."""
    source = torch.randn(megabytes * 2**18)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / best_seconds(lambda: target.copy_(source), repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=3, help="seeds: single-cell repeats and the grid's size")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core this process may use, one thread each
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache = random_cache(Path(folder) / "cache")
        build_s = time.perf_counter() - started
        config = FitHeadConfig(cache=cache.root, out=Path(folder) / "run", seeds=tuple(range(args.cells)), epochs=args.epochs,
                               batch_size=64, hidden=1536, heads=16, holdout=0.0)
        head_config = head_config_for(cache, config, "crossview", len(VIEWS))
        started = time.perf_counter()
        table = FeatureTable(load_complete_split(cache, "train"), cache.spec.views, VIEWS, head_config)
        load_s = time.perf_counter() - started

        compiled = dataclasses.replace(config, compile=True)
        first_compiled_s = train_head(table, head_config, compiled, seed=-1).seconds  # compiles once for the process
        step_matmuls_s, step_flops = replayed_matmuls(autocast_step(table, head_config, config.batch_size))
        step_adamw_s = adamw_pass(head_config)
        steps = config.epochs * -(-TRAIN // config.batch_size)
        plain_s, cell_s, compiled_s, peaks, replays = [], [], [], [], []
        for seed in config.seeds:  # interleaved, so every variant sees the same quiet and noisy moments
            plain_s.append(plain_loop_s(table, head_config, config.epochs, config.batch_size))
            cell_s.append(train_head(table, head_config, config, seed).seconds)
            compiled_s.append(train_head(table, head_config, compiled, seed).seconds)
            peaks.append(matmul_peak_gflops(torch.bfloat16, repeats=2))
            replays.append(replay_run(step_matmuls_s, step_adamw_s, steps))
        started = time.perf_counter()
        run_grid(compiled, Console(file=sys.stderr))
        grid_s = time.perf_counter() - started

        parameters = sum(p.numel() for p in build_head(head_config).parameters())
    peak = max(peaks)
    bandwidth = copy_bandwidth_gbs()
    best, best_compiled, best_plain = min(cell_s), min(compiled_s), min(plain_s)
    cell_gflop = step_flops * steps / 1e9  # the compiled step pads the last batch to 64 rows
    eager_cell_gflop = step_flops / config.batch_size * TRAIN * config.epochs / 1e9  # the eager one does not
    traffic_s = COMPILED_BYTES_PER_PARAMETER_STEP * parameters * steps / (bandwidth * 1e9)
    matmuls_s, adamw_s = min(replays, key=sum)
    figures = {
        "host": host_description(),
        "threads": torch.get_num_threads(),
        "cache_build_s": round(build_s, 2),
        "cache_load_and_pool_s": round(load_s, 2),
        "plain_fp32_loop_cell_s": round(best_plain, 3),
        "plain_fp32_loop_cells_s": [round(s, 3) for s in plain_s],
        "fit_head_cell_s": round(best_compiled, 3),
        "fit_head_compiled_cells_s": [round(s, 3) for s in compiled_s],
        "fit_head_eager_cell_s": round(best, 3),
        "fit_head_eager_cells_s": [round(s, 3) for s in cell_s],
        "compile_once_s": round(first_compiled_s - best_compiled, 1),
        "grid_cells": args.cells,
        "grid_compiled_per_cell_s": round(grid_s / args.cells, 3),
        "speedup_vs_plain": round(best_plain / best_compiled, 2),
        "target_cell_s_scaled_by_plain_loop": round(TARGET_CELL_S * best_plain / TARGET_HOST_PLAIN_LOOP_S, 3),
        "plain_over_compiled_median_paired": round(median_paired_ratio(plain_s, compiled_s), 2),
        "cell_gflop": round(cell_gflop, 1),
        "bf16_matmul_peak_gflops": round(peak, 1),
        "fraction_of_bf16_peak": {"compiled": round(cell_gflop / best_compiled / peak, 3),
                                  "eager": round(eager_cell_gflop / best / peak, 3)},
        "cell_s_at_bf16_peak": round(cell_gflop / peak, 3),
        "head_parameters": parameters,
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "compiled_step_traffic_s": round(traffic_s, 3),
        "replayed_matmuls_cell_s": round(matmuls_s, 3),
        "replay_cells_s": [round(sum(r), 3) for r in replays],
        "adamw_only_cell_s": round(adamw_s, 3),
        "adamw_only_gbs": round(ADAMW_BYTES_PER_PARAMETER_STEP * parameters * steps / adamw_s / 1e9, 1),
        "replay_cell_s": round(matmuls_s + adamw_s, 3),
        "compiled_over_replay_median_paired": round(median_paired_ratio(compiled_s, [sum(r) for r in replays]), 2),
        "eager_step_traffic_s": round(EAGER_BYTES_PER_PARAMETER_STEP * parameters * steps / (bandwidth * 1e9), 3),
    }
    print(json.dumps(figures, indent=2))
    print(
        f"\none cell ({args.epochs} epochs, {TRAIN} takes, H=1536), best of {args.cells} seeds interleaved:\n"
        f"  skillpipe --compile {best_compiled:.2f} s | skillpipe eager {best:.2f} s | plain eager fp32 loop {best_plain:.2f} s"
        f" (x{best_plain / best_compiled:.1f}; median of paired seeds x{figures['plain_over_compiled_median_paired']:.1f});"
        f" compiling once: {figures['compile_once_s']:.0f} s\n"
        f"  target ({TARGET_CELL_S:.0f} s where the plain loop took {TARGET_HOST_PLAIN_LOOP_S:.0f} s) scaled to this host: "
        f"{figures['target_cell_s_scaled_by_plain_loop']:.2f} s\n"
        f"  grid of {args.cells} cells through the stage with --compile, everything included: {grid_s / args.cells:.2f} s per cell\n"
        f"  {cell_gflop:.0f} GFLOP per cell = {cell_gflop / peak:.2f} s at the bf16 matmul peak ({peak:.0f} GFLOP/s); "
        f"fraction of peak: compiled {figures['fraction_of_bf16_peak']['compiled']:.2f}, eager "
        f"{figures['fraction_of_bf16_peak']['eager']:.2f}\n"
        f"  parameter traffic alone at the measured copy bandwidth ({bandwidth:.0f} GB/s): compiled "
        f"{traffic_s:.2f} s, eager {figures['eager_step_traffic_s']:.2f} s\n"
        f"  replay: the cell's matmuls alone (its shapes and layouts replayed) {matmuls_s:.2f} s "
        f"({cell_gflop / matmuls_s:.0f} GFLOP/s = {cell_gflop / matmuls_s / peak:.2f} of the peak); "
        f"+ its AdamW passes alone {adamw_s:.2f} s ({figures['adamw_only_gbs']:.0f} GB/s) = {matmuls_s + adamw_s:.2f} s; "
        f"--compile is at x{figures['compiled_over_replay_median_paired']:.2f} of it (median of paired seeds)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
