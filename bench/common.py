"""Shared measurements: matmul peak, FLOP counting, timing."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 4096, repeats: int = 5) -> float:
    """Best-of achieved FLOP/s of a large square matmul: the practical ceiling for model compute."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


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
