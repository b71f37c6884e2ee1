"""Decode the frames a clip needs and preprocess them as the TimeSformer checkpoint's processor.

Sampling is deterministic and time-aligned: T indices at the centres of T equal segments of the
whole take, at the same relative times in every view. Decoding seeks to those frames only.
Preprocessing matches the VideoMAE image processor of `facebook/timesformer-base-finetuned-k600`:
shortest edge 224 (bilinear), centre crop 224x224, scale 1/255, normalise mean 0.45 / std 0.225.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns decoded frames into backbone input; part of the cache fingerprint."""

    sampling: str = "uniform-segment-centres"
    size: int = 224
    mean: float = 0.45
    std: float = 0.225
    resize: str = "bilinear-antialias-shortest-edge"


PREPROCESSING = Preprocessing()


class VideoError(Exception):
    """A view that cannot be used: missing, empty, unreadable, truncated or too short."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def sample_indices(num_video_frames: int, num_samples: int) -> np.ndarray:
    """Centres of `num_samples` equal segments over the whole video: (T,) int64, increasing."""
    if num_video_frames < num_samples:
        raise ValueError(f"only {num_video_frames} frames, need at least {num_samples}")
    centres = (np.arange(num_samples) + 0.5) * num_video_frames / num_samples
    return np.floor(centres).astype(np.int64)


def decode_clip(path: Path, num_samples: int) -> tuple[np.ndarray, int]:
    """The sampled frames of one video, (T, H, W, 3) uint8, and its frame count. Raises VideoError naming the file."""
    import decord  # imported lazily: a process that never decodes (fit-head) need not load it

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        num_frames = len(reader)
        if num_frames < num_samples:
            raise VideoError(path, f"only {num_frames} frames, need at least {num_samples}")
        frames = reader.get_batch(sample_indices(num_frames, num_samples).tolist()).asnumpy()
    except VideoError:
        raise
    except Exception as err:  # decord raises RuntimeError or its own DECORDError for bad streams
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoError(path, f"cannot decode ({type(err).__name__}: {first_line[:200]})") from err
    if frames.shape[0] != num_samples:
        raise VideoError(path, f"decoded {frames.shape[0]} of {num_samples} requested frames")
    return frames, num_frames


def preprocess(frames: np.ndarray, spec: Preprocessing = PREPROCESSING) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) float32, normalised."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    height, width = clip.shape[-2:]
    scale = spec.size / min(height, width)
    resized = (max(spec.size, int(height * scale)), max(spec.size, int(width * scale)))
    clip = F.interpolate(clip, size=resized, mode="bilinear", antialias=True, align_corners=False)
    top, left = (resized[0] - spec.size) // 2, (resized[1] - spec.size) // 2
    clip = clip[..., top : top + spec.size, left : left + spec.size]
    return (clip / 255.0 - spec.mean) / spec.std
