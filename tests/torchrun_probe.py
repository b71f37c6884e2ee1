"""A torchrun rank for tests: joins the process group as the stages do, says its pid, then waits to be
stopped (or, with a second argument `exit`, ends at once).

With `main-fails`, every rank runs a step that fails on rank 0 with a RuntimeError through run_on_main (the other
ranks' grace shortened to 0.5 s), writes what it raised to rank<N>.error and ends. With `main-fails-slowly`, as a
stage would: rank 0 takes 5 s over its error before writing it and exiting 1; the others, at the usual grace, write
theirs and exit 1 if they get that far."""

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from pipeline import distributed
from pipeline.config import ConfigError
from pipeline.distributed import init_distributed, run_on_main


def failing_step():
    raise RuntimeError("a bug")


if __name__ == "__main__":
    folder, mode = Path(sys.argv[1]), sys.argv[2:]
    ranks = init_distributed()
    (folder / f"rank{ranks.rank}.pid").write_text(str(os.getpid()))
    if mode in (["main-fails"], ["main-fails-slowly"]):
        if mode == ["main-fails"]:
            distributed.MAIN_ERROR_GRACE_S = 0.5
        try:
            run_on_main(ranks, failing_step, (ConfigError,))
        except Exception as err:
            if mode == ["main-fails-slowly"] and ranks.is_main:
                time.sleep(5)  # a traceback, a decoder crash's diagnosis, a folder to remove
            (folder / f"rank{ranks.rank}.error").write_text(f"{type(err).__name__}: {err}")
            if mode == ["main-fails-slowly"]:
                sys.exit(1)
        # both ranks got this far: leave together (a rank exiting while its peer still holds the group may abort)
        dist.barrier()
        dist.destroy_process_group()
    elif mode != ["exit"]:
        time.sleep(600)
