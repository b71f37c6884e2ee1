"""A torchrun rank for tests: joins the process group as the stages do, says its pid, then waits to be
stopped (or, with a second argument `exit`, ends at once; with `main-fails`, runs a step that fails on rank 0
with a RuntimeError through run_on_main and writes what each rank raised to rank<N>.error)."""

import os
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.distributed import init_distributed, run_on_main

if __name__ == "__main__":
    ranks = init_distributed()
    Path(sys.argv[1], f"rank{ranks.rank}.pid").write_text(str(os.getpid()))
    if sys.argv[2:] == ["main-fails"]:
        def failing_step():
            raise RuntimeError("a bug")
        try:
            run_on_main(ranks, failing_step, (ConfigError,))
        except Exception as err:
            Path(sys.argv[1], f"rank{ranks.rank}.error").write_text(f"{type(err).__name__}: {err}")
    elif sys.argv[2:] != ["exit"]:
        time.sleep(600)
