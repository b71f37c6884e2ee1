"""Reading a torchrun launch's output in tests."""

import re


def root_cause(said: str) -> tuple[int, int] | None:
    """(rank, exit code) of the rank torchrun names as the root cause of a failed run, in its whitespace-joined output."""
    found = re.search(r"Root Cause \(first observed failure\): \[\d+\]: .*? rank : (\d+) \(local_rank: \d+\) exitcode : (-?\d+)",
                      said)
    return (int(found[1]), int(found[2])) if found else None
