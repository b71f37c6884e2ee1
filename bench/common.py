"""Shared measurements: matmul peak, FLOP counting, timing."""

from __future__ import annotations

import glob
import os
import platform
import resource
import statistics
import threading
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def timed_seconds(function: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call, with the device's queue drained before and after."""
    _sync(device)
    started = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - started


def best_seconds(function: Callable[[], object], repeats: int, device: str = "cpu", min_timed_s: float = 0.0) -> float:
    """The fastest of `repeats` timings of one call, after one untimed warm-up call.

    With `min_timed_s`, each timing runs the call back to back, doubling the count until one timing lasts that long,
    and gives the time per call: a short call's own time, without the device sync and Python overhead around each
    timing (a 512^3 matmul takes ~10 us on a GPU, less than a sync's round trip). The count is found by timing, not
    from the warm-up call, which runs several times slower than later ones.
    """
    function()
    calls = 1
    while min_timed_s and timed_seconds(lambda: _back_to_back(function, calls), device) < min_timed_s:
        calls *= 2
    return min(timed_seconds(lambda: _back_to_back(function, calls), device) for _ in range(repeats)) / calls


def _back_to_back(function: Callable[[], object], calls: int) -> None:
    for _ in range(calls):
        function()


# (m, k, n) of the peak's matmuls: squares from 512 to 4096 and the base backbone's largest linears
# (1576 = 8 frames x 197 tokens). Which size runs fastest depends on the caches and on the host's
# moment: 2048 and 4096 alone (the harness's first peak) read 1.1-1.3x below 768-1280 squares and
# below the backbone's own MLP matmul, which overstated every fraction of the peak that much.
PEAK_SHAPES = tuple((n, n, n) for n in (512, 768, 1024, 1536, 2048, 3072, 4096)) + ((1576, 768, 3072), (1576, 3072, 768))


# how long one timing of a peak matmul lasts at least (back-to-back calls): the sync and the Python around a
# timing cost ~10-50 us, a tenth of a 512^3 bf16 matmul's time on these CPUs and more than its time on a GPU
MIN_TIMED_S = 0.02


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES,
                       repeats: int = 3) -> float:
    """The best FLOP/s any of `shapes` reaches (best of `repeats` calls each): this machine's matmul limit."""
    rates = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        rates.append(2 * m * k * n / best_seconds(lambda: a @ b, repeats, device, min_timed_s=MIN_TIMED_S) / 1e9)
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


def peak_resident_mb() -> float:
    """This process's peak resident memory in MiB.

    From /proc/self/status (VmHWM) where there is one: on Linux getrusage's ru_maxrss carries the
    parent's peak over into a child across exec, so an extract child of a 5 GB bench process read 5 GB.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def host_description(cpuinfo_path: str = "/proc/cpuinfo", caches_folder: str = "/sys/devices/system/cpu/cpu0/cache"
                     ) -> dict[str, object]:
    """What the figures were measured on: hosts here change between sessions (a bf16 peak of ~800 GFLOP/s in
    early sessions, 3,300 in a later one), so a figure is only comparable with others from the same kind of CPU.

    CPU model and family/model numbers, usable cores, AMX, per-core L2 and shared L3 (Linux; fields it cannot
    read are left out), the torch version and, when one is visible, the GPU.
    """
    host: dict[str, object] = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                               "torch": torch.__version__}
    try:
        with open(cpuinfo_path) as file:
            first = file.read().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        host["cpu"] = fields.get("model name", host["cpu"])
        host["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
        host["amx_bf16"] = "amx_bf16" in fields.get("flags", "").split()
    except OSError:
        pass
    for index in sorted(glob.glob(os.path.join(caches_folder, "index*"))):
        try:
            level, kind, size = (open(os.path.join(index, name)).read().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if level in ("2", "3") and kind == "Unified":
            host[f"l{level}_cache"] = size
    if torch.cuda.is_available():
        host["gpu"] = torch.cuda.get_device_name()
    return host


class PeakTreeMemory:
    """The peak over time of this process's and its descendants' proportional set size (PSS), in MiB.

    A context manager that samples /proc every `interval_s` in a thread. PSS shares each page among the
    processes mapping it, so the sum counts a DataLoader worker's own memory but not the pages it
    shares with its parent after fork (RSS would count those twice). `peak_mb` is None where /proc has
    no smaps_rollup (not Linux).
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak_mb = interval_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakTreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            total = sum(filter(None, map(_pss_kb, _process_tree(os.getpid()))))
            if total:
                self.peak_mb = max(self.peak_mb or 0.0, total / 1024)
            if self._stop.wait(self.interval_s):
                return


def _process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant of it (Linux /proc; just `pid` elsewhere)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in glob.glob(f"/proc/{tree[index]}/task/*/children"):
            try:
                tree += [int(child) for child in open(task).read().split()]
            except OSError:  # the task or process ended meanwhile
                pass
        index += 1
    return tree


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return None


def count_flops(function, *args, **kwargs) -> int:
    """FLOPs (2 x multiply-accumulates) of one call, counted by torch's FlopCounterMode.

    Its formulas for scaled_dot_product_attention cover only the CUDA kernels: on a CPU (and under inference_mode,
    where the op is not decomposed) it would count fused attention as free, 3% of a base-size forward."""
    with FlopCounterMode(display=False, custom_mapping=dict.fromkeys(_CPU_ATTENTION, _attention_flops)) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


# overload packets: the counter looks formulas up by packet
_CPU_ATTENTION = (torch.ops.aten.scaled_dot_product_attention, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _prepacked(func, args: list, kwargs: dict) -> tuple:
    """A recorded bf16 aten.linear call as the same product on a weight prepacked once, bias fused; others as they are."""
    if func is not torch.ops.aten.linear.default or args[1].dtype != torch.bfloat16 or args[1].device.type != "cpu":
        return func, args, kwargs
    inputs, weight, bias = (list(args) + [None])[:3]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, inputs.numel() // inputs.shape[-1])
    return torch.ops.mkldnn._linear_pointwise.default, [inputs, packed, bias, "none", [], ""], {}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)  # that GPU's queue, not the current device's (GPU 0 unless set)


# linear and matmul too: under inference_mode a dispatch mode sees them undecomposed
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default, torch.ops.aten.matmul.default}


class _MatmulRecorder(TorchDispatchMode):
    """Records every matmul's operands (shape, stride, dtype) and other arguments as it runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            operands = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, operands, kwargs or {}))
        return func(*args, **(kwargs or {}))


def replayed_matmuls(function: Callable[[], object], device: str = "cpu", prepacked_linears: bool = False
                     ) -> tuple[Callable[[], float], int]:
    """A replay of `function`'s matmuls alone (same shapes, strides and dtypes, random values) and their FLOPs.

    prepacked_linears (CPU): each bf16 Linear replayed as the frozen compiled forward runs it, its weight prepacked
    once for oneDNN and its bias fused (`mkldnn._linear_pointwise`); the other matmuls as recorded.

    Returns (a measurement of the replay's seconds, the replay's FLOPs). Everything a model does
    besides its matmuls (attention kernels, norms, activations, the optimizer) is left out, and
    operands of one shape share one buffer, so they stay as hot in cache as their sizes allow (in
    the model each activation is fresh from the op before; distinct cold buffers made the replay
    of a base-size forward slower than the forward itself). The replay's time is what these matmuls,
    in these shapes and layouts, cost alone: a ceiling for a fraction-of-peak goal unless the model
    changes its shapes or layouts (another layout of the same products can be faster).
    """
    recorder = _MatmulRecorder()
    with recorder:
        function()
    buffers: dict[tuple, torch.Tensor] = {}

    def buffer(shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if (shape, stride, dtype) not in buffers:
            buffers[shape, stride, dtype] = torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
        return buffers[shape, stride, dtype]

    calls = [(func, [buffer(*o) if isinstance(o, tuple) else o for o in operands], kwargs)
             for func, operands, kwargs in recorder.calls]

    def replay() -> None:
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    flops = count_flops(replay)  # the same products either way (the counter does not know the prepacked op)
    if prepacked_linears:
        calls = [_prepacked(func, args, kwargs) for func, args, kwargs in calls]
    replay()  # warm-up
    return lambda: timed_seconds(replay, device), flops
