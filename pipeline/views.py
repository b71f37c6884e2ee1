"""View settings by name: `ego`, `exos`, `ego+exos`, or explicit lists such as `ego+exo2`."""

from __future__ import annotations

import numpy as np

from pipeline.config import ConfigError
from pipeline.takes import VIEWS

FAILURES_EXIT = 3  # a run's exit status when it finished but could not use some views of some takes

GROUPS = {"ego": ("ego",), "exos": ("exo1", "exo2", "exo3", "exo4")}


def parse_view_setting(setting: str, available: tuple[str, ...] = VIEWS) -> tuple[str, ...]:
    """`ego+exos` -> ('ego', 'exo1', ..., 'exo4'), in the canonical view order."""
    names: list[str] = []
    for part in setting.split("+"):
        part = part.strip()
        if part in GROUPS:
            names += GROUPS[part]
        elif part in VIEWS:
            names.append(part)
        else:
            raise ConfigError(f"view setting {setting!r}: unknown view {part!r} (use ego, exos, or {', '.join(VIEWS)})")
    if len(set(names)) < len(names):
        raise ConfigError(f"view setting {setting!r} names a view twice: {names}")
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(f"view setting {setting!r} needs {missing}, which the cache does not contain (cache views: {list(available)})")
    return tuple(view for view in VIEWS if view in names)


def absent_views(present: np.ndarray, views: tuple[str, ...]) -> list[list[str]]:
    """(N, V) bool present flags -> for each take, the names of its views that are absent."""
    return [[view for view, here in zip(views, row) if not here] for row in np.asarray(present, dtype=bool)]
