"""A run killed between two shard commits, for tests of what a rerun keeps."""

from contextlib import contextmanager
from typing import Iterator

import pytest

from pipeline.cache import FeatureCache


@contextmanager
def killed_at_shard_write(number: int) -> Iterator[list[int]]:
    """FeatureCache.write_shard raises KeyboardInterrupt (a kill) at its `number`-th call (1-based), before writing;
    the block must raise it. Yields the shards the calls were for, in order."""
    shards, write_shard = [], FeatureCache.write_shard

    def killed(self, split, shard, *args):
        shards.append(shard)
        if len(shards) == number:
            raise KeyboardInterrupt
        return write_shard(self, split, shard, *args)

    FeatureCache.write_shard = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            yield shards
    finally:
        FeatureCache.write_shard = write_shard
