"""Train and evaluate fusion heads on cached features: whole ablation grids in one process.

The cache is read once; head inputs are pooled once per (view selection, input kind) and stay
resident; each cell then runs a tight loop on those tensors (index a batch, forward, backward,
fused AdamW step, cosine schedule) with bf16 autocast. Model selection uses a stratified held-out
part of train (best epoch by held-out loss); the val split is only used for the final evaluation.

At the reference size (H=1536, 7.1M parameters) a step does ~5.4 GFLOP but also moves ~46 bytes
per parameter (the fp32 weights cast to bf16, bf16 weight gradients cast back, AdamW reading and
writing weights and both moments): ~330 MB, so on a 2-core CPU the loop is bound by memory
bandwidth more than by matmul throughput (see bench/fit_head.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import CacheError, CachedSplit, FeatureCache
from pipeline.config import REQUIRED_HELP, ConfigError, device_problem, output_problem, required_fields
from pipeline.fusion import FUSIONS, NUM_CLASSES, HeadConfig, build_head, head_inputs
from pipeline.head_step import CompiledHeadTrainer
from pipeline.views import parse_view_setting
from pipeline.weight_decay import decay_groups


@dataclass(frozen=True)
class FitHeadConfig:
    """Settings of `skillpipe fit-head`; saved as `<out>/config.json` and, narrowed to one cell, per cell."""

    cache: Path = field(metadata={"help": "feature cache written by `skillpipe extract` (finished train and val splits)"})
    out: Path = field(metadata={"help": "run folder: one sub-folder per grid cell, plus grid.json and grid.png"})
    views: tuple[str, ...] = field(
        default=("ego+exos",), metadata={"help": "view settings of the grid: ego, exos, ego+exos, ego+exo2, ..."}
    )
    fusions: tuple[str, ...] = field(default=("crossview",), metadata={"help": f"fusion variants: {', '.join(FUSIONS)}",
                                                                        "flag": "--fusion"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds of the grid (initialisation, dropout, data order)",
                                                           "flag": "--seed"})
    epochs: int = field(default=10, metadata={"help": "training epochs; the best one by held-out loss is kept"})
    lr: float = field(
        default=1e-4, metadata={"help": "peak learning rate; a head on frozen features: 5x the reference's end-to-end 2e-5"}
    )
    batch_size: int = field(default=64, metadata={"help": "takes per optimizer step"})
    hidden: int = field(default=2560, metadata={"help": "projector size H (reference Ego+Exos recipe: 2560)"})
    heads: int = field(default=16, metadata={"help": "attention heads; must divide the feature size"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention and projector (reference: 0.1)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (reference: 0.01)"})
    decay_norms_and_biases: bool = field(
        default=False, metadata={"help": "decay biases and LayerNorm weights too (HF Trainer, as the reference, does not; "
                                         "skillpipe did until 2026-12-05)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps warming up the cosine schedule (ref.: 0.1)"})
    holdout: float = field(
        default=0.1, metadata={"help": "stratified share of train held out to pick the best epoch; 0 keeps the last epoch"}
    )
    precision: Literal["bf16", "fp32"] = field(default="bf16", metadata={"help": "bf16 autocast or plain fp32"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1, ..."})
    compile: bool = field(
        default=False,
        metadata={"help": "one torch.compile graph per step (bf16 weights, fp32 AdamW masters): 1.3-1.5x faster cells "
                          "after a one-off compile of ~25-50 s per head shape (~5-7 s from inductor's disk cache); "
                          "pays off for long cells and grids"},
    )
    submission: Path | None = field(
        default=None, metadata={"help": "write the challenge submission JSON of the (single) cell here"}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "keep the cells of an earlier run in --out that are complete and were fitted with these "
                          "settings on the cache as it is now; train only the others (say seeds added to a grid)"},
    )

    def __post_init__(self):
        unknown = [f for f in self.fusions if f not in FUSIONS]
        if unknown:
            raise ConfigError(f"FitHeadConfig.fusions: unknown {unknown} (choose from {list(FUSIONS)})")
        for setting in self.views:
            parse_view_setting(setting)  # names only; the cache's views are checked when it is opened
        for name in ("views", "fusions", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"FitHeadConfig.{name}: needs at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"FitHeadConfig.{name}: repeated values in {list(values)}")
        for name in ("epochs", "batch_size", "hidden", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FitHeadConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):  # NaN fails both
            raise ConfigError(f"FitHeadConfig: lr must be > 0 and weight_decay >= 0, both finite (got {self.lr}, "
                              f"{self.weight_decay})")
        for name, high in (("holdout", 0.5), ("warmup_ratio", 1.0), ("dropout", 1.0)):
            if not 0 <= getattr(self, name) < high:
                raise ConfigError(f"FitHeadConfig.{name}: must be in [0, {high}), got {getattr(self, name)}")
        if self.resume and self.submission:
            raise ConfigError("FitHeadConfig.resume: a --submission run is a single cell; run it without --resume")
        if self.compile and self.precision != "bf16":
            raise ConfigError("FitHeadConfig.compile: the compiled step trains in bf16; use precision bf16 or no compile")
        for problem in (device_problem(self.device), output_problem("out", self.out),
                        output_problem("submission", self.submission, folder=False)):
            if problem:
                raise ConfigError(f"FitHeadConfig.{problem}")


def field_help(name: str) -> str:
    """The help text of a FitHeadConfig field and its default, for the CLI options."""
    spec = next(f for f in fields(FitHeadConfig) if f.name == name)
    if name in required_fields(FitHeadConfig):
        return spec.metadata["help"] + f" {REQUIRED_HELP}"
    return spec.metadata["help"] + ("" if spec.default is None else f" (default {spec.default})")


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    views: str
    fusion: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.views}__{self.fusion}__seed{self.seed}"


def grid_cells(config: FitHeadConfig) -> list[Cell]:
    return [Cell(v, f, s) for v in config.views for f in config.fusions for s in config.seeds]


def load_complete_split(cache: FeatureCache, split: str) -> CachedSplit:
    """A split that extract finished, with at least one take; clear errors otherwise."""
    if split not in cache.splits():
        raise CacheError(f"{cache.root}: the cache has no {split} takes; run `skillpipe extract --split {split}` into it")
    data = cache.read(split, complete=True)  # an unfinished split is refused there
    if not data.records:
        raise CacheError(f"{cache.root}: the cache has no {split} takes")
    return data


def head_config_for(cache: FeatureCache, config: FitHeadConfig, fusion: str, num_views: int) -> HeadConfig:
    if cache.spec.hidden_size % config.heads:
        raise ConfigError(f"FitHeadConfig.heads: {config.heads} must divide the feature size {cache.spec.hidden_size}")
    return HeadConfig(
        fusion=fusion, dim=cache.spec.hidden_size, num_views=num_views, frames=cache.spec.frames,
        num_patches=cache.spec.num_patches, hidden=config.hidden, heads=config.heads, dropout=config.dropout,
    )


def label_prior(labels: np.ndarray) -> np.ndarray:
    """(4,) label frequencies: what a head predicts for a take it cannot see."""
    return np.bincount(labels, minlength=NUM_CLASSES) / len(labels)


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
    """One split's head inputs for one view selection, pooled once and resident on the device.

    Every take of the split keeps its row, in cache order; `usable` marks the takes with at least
    one of the chosen views (the others cannot be seen by the head: training skips them and
    evaluation gives them the train label prior, so every cell is scored on the same takes).
    """

    def __init__(self, data: CachedSplit, cache_views: tuple[str, ...], view_names: tuple[str, ...],
                 head_config: HeadConfig, device: str = "cpu", chunk: int = 256):
        slots = [cache_views.index(v) for v in view_names]
        present = data.present[:, slots]  # (N, V')
        pooled = [
            head_inputs(torch.from_numpy(data.tokens[start : start + chunk, slots]).float(), head_config)
            for start in range(0, len(data.records), chunk)
        ]  # chunks keep the float32 copy of the (N, V', 1 + T, D) float16 tokens small
        self.inputs = torch.cat(pooled).contiguous().to(device)  # (N, V', D), or (N, V', T, D) for temporal
        self.present = torch.from_numpy(present).to(device)  # (N, V') bool
        self.labels = torch.tensor([r.label for r in data.records], dtype=torch.long, device=device)  # (N,)
        self.usable = present.any(1)  # (N,) numpy bool
        self.take_uids = [r.take_uid for r in data.records]
        self.scenarios = [r.scenario for r in data.records]

    def __len__(self) -> int:
        return len(self.take_uids)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the settings (usually the learning rate) do not train this head."""


@dataclass
class TrainedHead:
    head: torch.nn.Module
    config: HeadConfig
    label_prior: np.ndarray  # (4,) label frequencies of the takes it was fitted on
    best_epoch: int
    train_losses: list[float] = field(default_factory=list)  # mean loss per epoch
    holdout_losses: list[float] = field(default_factory=list)  # per epoch; empty without a holdout
    seconds: float = 0.0


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    Each step autograd allocates and frees buffers as large as the weights (bf16 casts, gradients)
    and, for `temporal`, activations of tens of MB. glibc serves buffers above its mmap threshold
    (adaptive, but at most 32 MiB) with fresh mmaps and trims freed heap memory, so such buffers
    fault their pages in anew every step: measured 14-25k page faults per step for `temporal`, at
    most ~1.5k with this setting. Process-wide and idempotent; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)  # buffers up to 1 GiB come from the reusable heap
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # and the heap is never trimmed back


def warmup_steps_for(ratio: float, total_steps: int) -> int:
    """Steps of linear warmup for a `ratio` of `total_steps`, rounded up as HF Trainer's `warmup_ratio` is (tested)."""
    return math.ceil(ratio * total_steps)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at `step`: linear warmup from 0, then half a cosine down to 0.

    The same values as transformers' get_cosine_schedule_with_warmup (tested).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_head(train: FeatureTable, head_config: HeadConfig, config: FitHeadConfig, seed: int) -> TrainedHead:
    """Fit one head on the usable train takes minus the holdout; returns the best epoch's weights."""
    started = time.perf_counter()
    keep_freed_memory()
    device = torch.device(config.device)
    torch.manual_seed(seed)  # initialisation and dropout
    head = build_head(head_config).to(device)
    rows = np.flatnonzero(train.usable)
    labels = train.labels.cpu().numpy()
    held = stratified_holdout(labels[rows], config.holdout)
    fit_rows, holdout_rows = torch.from_numpy(rows[~held]), torch.from_numpy(rows[held]).to(device)
    steps = -(-len(fit_rows) // config.batch_size) * config.epochs
    trainer = CompiledHeadTrainer(head, config.batch_size, config.weight_decay,
                                  decay_norms_and_biases=config.decay_norms_and_biases) if config.compile else None
    optimizer = None if trainer else torch.optim.AdamW(  # the compiled trainer applies AdamW itself
        decay_groups(head, config.weight_decay, config.decay_norms_and_biases), lr=config.lr, fused=True)
    warmup_steps, step = warmup_steps_for(config.warmup_ratio, steps), 0
    order = torch.Generator().manual_seed(seed)  # data order, independent of the device's generator
    best = {"loss": float("inf"), "epoch": config.epochs - 1, "state": None}
    train_losses, holdout_losses = [], []
    for epoch in range(config.epochs):
        total = torch.zeros((), device=device)  # summed on the device: no sync per step
        for batch in fit_rows[torch.randperm(len(fit_rows), generator=order)].split(config.batch_size):
            batch = batch.to(device, non_blocking=True)
            lr = config.lr * cosine_with_warmup(step, warmup_steps, steps)
            if trainer:
                loss = trainer.step(train.inputs, train.present, train.labels, batch, lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = _eager_step(head, optimizer, train, config.precision, batch)
            total += loss * len(batch)
            step += 1
        train_losses.append(float(total) / len(fit_rows))
        if trainer:
            trainer.copy_to_head()
        if len(holdout_rows):
            logits = predict_logits(head, train.inputs[holdout_rows], train.present[holdout_rows], config.precision)
            holdout_losses.append(float(F.cross_entropy(logits, train.labels[holdout_rows])))
        if not all(map(math.isfinite, train_losses[-1:] + holdout_losses[-1:])):  # NaN weights predict "Novice" for all
            raise TrainingDiverged(f"seed {seed}: loss {train_losses[-1]} (held out: {holdout_losses[-1:]}) after epoch "
                                   f"{epoch}: training diverged; try a lower --lr")
        if len(holdout_rows) and holdout_losses[-1] < best["loss"]:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = {"loss": holdout_losses[-1], "epoch": epoch, "state": state}
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    prior = label_prior(labels[fit_rows.numpy()])
    return TrainedHead(head.eval(), head_config, prior, best["epoch"], train_losses, holdout_losses,
                       time.perf_counter() - started)


def _eager_step(head: torch.nn.Module, optimizer: torch.optim.Optimizer, train: FeatureTable, precision: str,
                batch: torch.Tensor) -> torch.Tensor:
    """Forward under autocast, backward, fused AdamW; returns the batch's mean loss (0-d tensor)."""
    if not head.training:  # after a holdout evaluation; train() walks every submodule
        head.train()
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = head(train.inputs[batch], train.present[batch])  # (B, 4)
    loss = F.cross_entropy(logits.float(), train.labels[batch])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.inference_mode()
def predict_logits(head: torch.nn.Module, inputs: torch.Tensor, present: torch.Tensor, precision: str,
                   batch: int = 512) -> torch.Tensor:
    """(N, V, ...) inputs, (N, V) present -> (N, 4) float32 logits, in eval mode."""
    head.eval()
    enabled = precision == "bf16"
    outputs = []
    for start in range(0, len(inputs), batch):
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=enabled):
            outputs.append(head(inputs[start : start + batch], present[start : start + batch]).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, NUM_CLASSES, device=inputs.device)


def predict_probabilities(trained: TrainedHead, table: FeatureTable, precision: str) -> np.ndarray:
    """(N, 4) class probabilities for every take of `table`; takes without any chosen view get the prior."""
    probabilities = np.tile(trained.label_prior, (len(table), 1))
    rows = torch.from_numpy(np.flatnonzero(table.usable)).to(table.inputs.device)
    logits = predict_logits(trained.head, table.inputs[rows], table.present[rows], precision)
    probabilities[table.usable] = torch.softmax(logits, -1).cpu().numpy()
    return probabilities
