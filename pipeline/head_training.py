"""Train and evaluate fusion heads on cached features: whole ablation grids in one process.

The cache is read once; per-view features are pooled once per (views, input kind) and stay in
memory; each cell then runs a tight loop on resident tensors (index, forward, backward, fused
AdamW step) with bf16 autocast on CPU. Model selection uses a stratified held-out part of train
(best epoch by held-out loss); the val split is only ever used for the final evaluation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from pipeline.cache import CacheError, CachedSplit, FeatureCache
from pipeline.config import ConfigError
from pipeline.fusion import FUSIONS, HeadConfig, build_head, head_inputs
from pipeline.views import parse_view_setting


@dataclass(frozen=True)
class FitHeadConfig:
    """Settings of `skillpipe fit-head`; saved as `<out>/config.json`."""

    cache: Path  # feature cache written by `skillpipe extract` (needs train and val)
    out: Path  # run folder: one sub-folder per grid cell
    views: tuple[str, ...] = ("ego+exos",)  # view settings of the grid
    fusions: tuple[str, ...] = ("crossview",)  # fusion variants of the grid
    seeds: tuple[int, ...] = (0,)
    epochs: int = 10
    lr: float = 1e-4  # head only, on frozen features: higher than the reference's end-to-end 2e-5..5e-5
    batch_size: int = 64
    hidden: int = 1536
    heads: int = 16
    dropout: float = 0.1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    holdout: float = 0.1  # fraction of train held out (stratified) to pick the best epoch; 0 = last epoch
    precision: Literal["bf16", "fp32"] = "bf16"
    submission: Path | None = None  # write the challenge JSON of the first cell here

    def __post_init__(self):
        unknown = [f for f in self.fusions if f not in FUSIONS]
        if unknown:
            raise ConfigError(f"FitHeadConfig.fusions: unknown {unknown} (choose from {sorted(FUSIONS)})")
        if self.epochs < 1 or self.batch_size < 1 or not 0 <= self.holdout < 0.5:
            raise ConfigError("FitHeadConfig: epochs and batch_size must be >= 1, holdout in [0, 0.5)")
        if not self.views or not self.fusions or not self.seeds:
            raise ConfigError("FitHeadConfig: views, fusions and seeds need at least one value each")


@dataclass(frozen=True)
class Cell:
    views: str
    fusion: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.views}__{self.fusion}__seed{self.seed}"


@dataclass
class Evaluation:
    take_uids: list[str]
    labels: np.ndarray  # (N,)
    scenarios: list[str]
    probabilities: np.ndarray  # (N, 4)


@dataclass
class TrainedHead:
    head: torch.nn.Module
    config: HeadConfig
    view_names: tuple[str, ...]
    best_epoch: int
    holdout_losses: list[float] = field(default_factory=list)


def load_complete_split(cache: FeatureCache, split: str) -> CachedSplit:
    """A split that extract finished, with at least one take; clear errors otherwise."""
    if split not in cache.splits():
        raise CacheError(f"{cache.root}: the cache has no {split} takes; run `skillpipe extract --split {split}` into it")
    if not cache.is_complete(split):
        planned = -(-len(cache.planned_takes(split)) // cache.spec.shard_size)
        raise CacheError(
            f"{cache.root}: split {split} is unfinished ({len(cache.committed_shards(split))}/{planned} shards committed); "
            "rerun the same `skillpipe extract` command to finish it"
        )
    data = cache.read(split)
    if not data.records:
        raise CacheError(f"{cache.root}: the cache has no {split} takes")
    return data


def select_views(data: CachedSplit, cache_views: tuple[str, ...], view_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Token slots and presence of the chosen views: (N, V', 1 + T, D), (N, V')."""
    slots = [cache_views.index(v) for v in view_names]
    return data.tokens[:, slots], data.present[:, slots]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out rows: `fraction` of each label, chosen by a fixed seed."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(fraction * len(rows)))
        held[rng.permutation(rows)[:count]] = True
    return held


class FeatureTable:
    """A split's head inputs for one view selection, pooled once and kept in memory."""

    def __init__(self, data: CachedSplit, cache_views, view_names, head_config: HeadConfig):
        tokens, present = select_views(data, cache_views, view_names)
        usable = present.any(1)  # a take with none of the chosen views cannot be classified
        self.dropped = [r.take_uid for r, ok in zip(data.records, usable) if not ok]
        records = [r for r, ok in zip(data.records, usable) if ok]
        tokens = torch.from_numpy(tokens[usable]).float()
        self.inputs = head_inputs(tokens, head_config).contiguous()  # (N, V, D) or (N, V, T, D)
        self.present = torch.from_numpy(present[usable])
        self.labels = torch.tensor([r.label for r in records], dtype=torch.long)
        self.take_uids = [r.take_uid for r in records]
        self.scenarios = [r.scenario for r in records]

    def __len__(self) -> int:
        return len(self.labels)


def train_head(
    train: FeatureTable, head_config: HeadConfig, config: FitHeadConfig, seed: int, view_names: tuple[str, ...]
) -> TrainedHead:
    """Fit one head on `train` (minus its holdout); returns the best epoch's weights."""
    torch.manual_seed(seed)
    head = build_head(head_config)
    held = torch.from_numpy(stratified_holdout(train.labels.numpy(), config.holdout))
    fit_rows = torch.nonzero(~held).flatten()
    holdout_rows = torch.nonzero(held).flatten()
    steps_per_epoch = -(-len(fit_rows) // config.batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * steps_per_epoch * config.epochs), steps_per_epoch * config.epochs
    )
    order = torch.Generator().manual_seed(seed)
    bf16 = config.precision == "bf16"
    best_state, best_loss, best_epoch, losses = None, float("inf"), config.epochs - 1, []
    for epoch in range(config.epochs):
        head.train()
        permuted = fit_rows[torch.randperm(len(fit_rows), generator=order)]
        for start in range(0, len(permuted), config.batch_size):
            rows = permuted[start : start + config.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = head(train.inputs[rows], train.present[rows])
            loss = F.cross_entropy(logits.float(), train.labels[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        if len(holdout_rows):
            logits = predict_logits(head, train.inputs[holdout_rows], train.present[holdout_rows], bf16)
            losses.append(float(F.cross_entropy(logits, train.labels[holdout_rows])))
            if losses[-1] < best_loss:
                best_loss, best_epoch, best_state = losses[-1], epoch, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    return TrainedHead(head.eval(), head_config, view_names, best_epoch, losses)


@torch.inference_mode()
def predict_logits(head: torch.nn.Module, inputs: torch.Tensor, present: torch.Tensor, bf16: bool, batch: int = 512) -> torch.Tensor:
    head.eval()
    outputs = []
    for start in range(0, len(inputs), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs.append(head(inputs[start : start + batch], present[start : start + batch]).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 4)


def evaluate_head(trained: TrainedHead, table: FeatureTable, bf16: bool) -> Evaluation:
    probabilities = torch.softmax(predict_logits(trained.head, table.inputs, table.present, bf16), -1)
    return Evaluation(table.take_uids, table.labels.numpy(), table.scenarios, probabilities.numpy())


def grid_cells(config: FitHeadConfig) -> list[Cell]:
    return [Cell(v, f, s) for v in config.views for f in config.fusions for s in config.seeds]


def head_config_for(cache: FeatureCache, config: FitHeadConfig, fusion: str, num_views: int) -> HeadConfig:
    return HeadConfig(
        fusion=fusion, dim=cache.spec.hidden_size, num_views=num_views, frames=cache.spec.frames,
        num_patches=cache.spec.num_patches, hidden=config.hidden, heads=config.heads, dropout=config.dropout,
    )


def check_heads(cache: FeatureCache, config: FitHeadConfig) -> None:
    if cache.spec.hidden_size % config.heads:
        raise ConfigError(f"FitHeadConfig.heads={config.heads} must divide the feature size {cache.spec.hidden_size}")
