"""Shared measurements: matmul peak, FLOP counting, timing."""

from __future__ import annotations

import time

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


def count_flops(function, *args, **kwargs) -> int:
    """FLOPs (2 x multiply-accumulates) of one call, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
