"""Test-wide settings.

One thread per process: the tests' models are tiny, and on a 2-core machine shared with other
work OpenMP's spinning threads made the suite 5-10x slower (a fit-head grid fixture took 3 min
instead of 15 s). Subprocesses (the CLI, torchrun ranks) inherit OMP_NUM_THREADS.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
first = os.environ["OMP_NUM_THREADS"].split(",")[0]  # OpenMP also accepts nested lists such as "4,2"
torch.set_num_threads(int(first) if first.isdigit() and int(first) > 0 else 1)
