"""Shared measurements: matmul peak, FLOP counting, timing."""

from __future__ import annotations

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


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 4096, repeats: int = 5) -> float:
    """Best-of achieved FLOP/s of a large square matmul: the practical ceiling for model compute."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats, device) / 1e9


def best_of_interleaved(rates: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The highest value of each rate over `rounds` rounds that measure every rate in turn.

    On a shared machine noise only ever slows a measurement down, by as much as 1.5x here for minutes
    at a time; interleaving lets the peak and the figures divided by it see the same quiet moments.
    """
    best = dict.fromkeys(rates, 0.0)
    for _ in range(rounds):
        for name, measure in rates.items():
            best[name] = max(best[name], measure())
    return best


def count_flops(function, *args, **kwargs) -> int:
    """FLOPs (2 x multiply-accumulates) of one call, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
