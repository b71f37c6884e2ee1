"""A torchrun rank for tests: joins the process group as the stages do, says its pid, then waits to be
stopped (or, with a second argument `exit`, ends at once)."""

import os
import sys
import time
from pathlib import Path

from pipeline.distributed import init_distributed

if __name__ == "__main__":
    ranks = init_distributed()
    Path(sys.argv[1], f"rank{ranks.rank}.pid").write_text(str(os.getpid()))
    if sys.argv[2:] != ["exit"]:
        time.sleep(600)
