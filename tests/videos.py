"""Small good and bad videos for tests, written into a test's temporary folder.

What decord 0.6 raises when opening each bad file is noted per helper; the extractor turns all of
them into a per-view failure.
"""

from pathlib import Path

import numpy as np

from pipeline.demo_data import write_video


def good_video(path: Path, frames: int = 16, size: tuple[int, int] = (48, 64), seed: int = 0, faststart: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    clip = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    write_video(path, clip, faststart=faststart)
    return Path(path)


def truncated_video(path: Path) -> Path:
    """A video cut to 40% of its bytes, moov atom lost: RuntimeError at open."""
    path = Path(path)
    if not path.exists():
        good_video(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def random_bytes_video(path: Path, size: int = 4096) -> Path:
    """Garbage bytes named .mp4: RuntimeError at open."""
    Path(path).write_bytes(np.random.default_rng(1).bytes(size))
    return Path(path)


def empty_video(path: Path) -> Path:
    """A 0-byte .mp4: RuntimeError at open."""
    Path(path).write_bytes(b"")
    return Path(path)


def half_truncated_faststart_video(path: Path) -> Path:
    """A faststart mp4 (moov first) cut in half: decord raises DECORDError, not a RuntimeError."""
    good_video(path, frames=32, size=(96, 128), faststart=True)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def short_video(path: Path, frames: int = 2) -> Path:
    """A valid video with too few frames to sample from."""
    return good_video(path, frames=frames)
