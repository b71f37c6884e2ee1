"""Shared measurements: matmul peak, FLOP counting, timing."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def timed_seconds(function: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call, with the device's queue drained before and after."""
    _sync(device)
    started = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - started


def best_seconds(function: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    function()
    return min(timed_seconds(function, device) for _ in range(repeats))


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", sizes: tuple[int, ...] = (2048, 4096),
                       repeats: int = 5) -> float:
    """Best-of achieved FLOP/s of large square matmuls: the practical ceiling for model compute.

    The best over two sizes: on this shared host the 4096 matmul (32 MB operands) at times ran at
    half the 2048 one's rate, and then read below the backbone's own matmuls.
    """
    rates = []
    for size in sizes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        rates.append(2 * size**3 / best_seconds(lambda: a @ b, repeats, device) / 1e9)
    return max(rates)


def interleaved_rounds(rates: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Every rate's value in each of `rounds` rounds that measure every rate in turn.

    On a shared machine noise only ever slows a measurement down, by as much as 1.5x here for minutes
    at a time; interleaving lets the peak and the figures divided by it see the same quiet moments.
    """
    values: dict[str, list[float]] = {name: [] for name in rates}
    for _ in range(rounds):
        for name, measure in rates.items():
            values[name].append(measure())
    return values


def median_paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator measured in the same round.

    Less sensitive than a ratio of two bests to a single lucky (or throttled) reading of either side.
    """
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def count_flops(function, *args, **kwargs) -> int:
    """FLOPs (2 x multiply-accumulates) of one call, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
