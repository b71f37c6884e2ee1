"""torch.distributed set-up for `torchrun`: one process per rank, no scheduler of our own.

Without torchrun's environment (WORLD_SIZE unset or 1) everything runs as a single rank 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.config import ConfigError

T = TypeVar("T")

# How long a rank waits in a collective. torch's default (30 min gloo, 10 min nccl) is too short
# here: a rerun of extract may leave one rank with hours of shards and the others with none, and
# finetune's other ranks wait while rank 0 evaluates the held-out takes end to end. A rank that
# dies does not leave the others waiting this long: torchrun stops the whole group.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        """Shards are dealt round-robin, so no two ranks ever write the same shard."""
        return shard % self.world_size == self.rank


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> bool:
    """Under torchrun on Linux: have the kernel send this rank SIGTERM when its launcher dies; True if set.

    torchrun starts each rank in a session of its own, so a launcher killed alone (kill -9, the
    out-of-memory killer) used to leave its ranks running: they went on writing the cache beside
    a rerun, or slept in the process group's set-up for the collective timeout. torchrun's own
    shutdown (Ctrl-C, a failed rank) still stops the ranks as before.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != launcher:  # it died between the two calls: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True  # (a parent of pid 1 is no sign of a dead launcher: torchrun is pid 1 in many containers)


def init_distributed(device: str = "cpu") -> Ranks:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) if launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    if not dist.is_initialized():
        end_with_launcher()
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size())


@contextlib.contextmanager
def torchrun_ranks(device: str = "cpu") -> Iterator[Ranks]:
    """init_distributed for a stage's work; the process group is destroyed once it ends well (nccl warns at exit
    of one left alone). After an error it is left to the exit: a rank that failed alone cannot leave collectively."""
    ranks = init_distributed(device)
    yield ranks
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def summed_over_ranks(ranks: Ranks, value: float, device: torch.device) -> float:
    """`value` summed over every rank (itself in one process); `device`: this rank's (nccl reduces CUDA tensors only)."""
    if ranks.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


class MainRankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed in a step it takes alone with an error outside the shared kinds
    (a bug, a full disk): its traceback is rank 0's; the others stop with its one line instead of a collective's."""


# How long the other ranks wait, once rank 0 has failed, for the launcher to stop them before they raise its error.
# torchrun stops them as soon as rank 0 has exited: rank 0 is then the run's root cause, and its own error handling
# (the traceback, a decoder crash's diagnosis, removing a folder it made) is never cut short by a rank that exited
# first. Another launcher lets them raise it after this long.
MAIN_ERROR_GRACE_S = 60.0


def barrier_sharing_main_error(ranks: Ranks, error: Exception | None, kinds: tuple[type[Exception], ...]) -> None:
    """A barrier at which rank 0's `error` is raised on every rank, then each rank's own.

    An error of one of the user-facing `kinds` is raised as that kind, any other as MainRankFailed, after
    MAIN_ERROR_GRACE_S. The ranks waiting for rank 0's set-up (a refused lock, another cache's fingerprint) stop with
    its message, instead of a collective's "connection closed" traceback once it has exited."""
    if ranks.world_size > 1:  # the error's class and its bases by name: a PermissionError is shared as an OSError
        shared = [None if error is None or not ranks.is_main else ([c.__name__ for c in type(error).__mro__], str(error))]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and not ranks.is_main:
            names, message = shared[0]
            time.sleep(MAIN_ERROR_GRACE_S)
            kind = next((kind for name in names for kind in kinds if kind.__name__ == name), None)
            shared_error = kind(f"(rank 0) {message}") if kind else MainRankFailed(f"rank 0 failed: {names[0]}: {message}")
            raise shared_error from error  # this rank's own, if it failed too
    if error is not None:
        raise error


def run_on_main(ranks: Ranks, step: Callable[[], T], kinds: tuple[type[Exception], ...]) -> T | None:
    """`step()` on rank 0 only (its result there, None elsewhere), then a barrier at which its error stops every rank:
    one of `kinds` with its message, any other as MainRankFailed (barrier_sharing_main_error). Every rank must call it."""
    result, error = None, None
    if ranks.is_main:
        try:
            result = step()
        except Exception as err:  # noqa: BLE001 (shared, then raised again on rank 0 itself)
            error = err
    barrier_sharing_main_error(ranks, error, kinds)
    return result


def shared_by_main(ranks: Ranks, value: T) -> T:
    """Rank 0's `value` (pickled) on every rank; `value` itself in one process. Every rank must call it."""
    if ranks.world_size == 1:
        return value
    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_device(device: str) -> str:
    """`cuda` under torchrun means this rank's own GPU; `cuda:N` there would put every rank on one GPU."""
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device != "cuda":
            raise ConfigError(f"--device {device} under torchrun: give --device cuda, and each rank uses its own "
                              "GPU (LOCAL_RANK); choose the GPUs with CUDA_VISIBLE_DEVICES")
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device
