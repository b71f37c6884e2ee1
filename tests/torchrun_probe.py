"""A torchrun rank for tests: joins the process group as the stages do, says its pid, then waits to be stopped."""

import os
import sys
import time
from pathlib import Path

from pipeline.distributed import init_distributed

if __name__ == "__main__":
    ranks = init_distributed()
    Path(sys.argv[1], f"rank{ranks.rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)
