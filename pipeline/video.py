"""Decode the frames a clip needs and preprocess them as the TimeSformer checkpoint's processor.

Sampling is deterministic and time-aligned, at the same relative times in every view:
- `uniform` (default): T indices at the centres of T equal segments of the whole take;
- `window`: the reference's clip length, T frames at stride 4 from a window of 4T frames (about
  2 s at 30 fps), at the centre of the take (cached and evaluated clips); finetune's training
  clips move it to a seeded random position, one per take and epoch, shared by its views (the
  reference draws one per view, also at test time).
Decoding seeks to those frames only.
Preprocessing matches the VideoMAE image processor of `facebook/timesformer-base-finetuned-k600`:
shortest edge 224 (bilinear), centre crop 224x224, scale 1/255, normalise mean 0.45 / std 0.225.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import BinaryIO
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
WINDOW_STRIDE = 4  # the reference's frame stride inside its 4T-frame window
# sampling methods by their option name -> the name the cache fingerprint records
SAMPLING_NAMES = {"uniform": PREPROCESSING.sampling, "window": f"centred-window-stride-{WINDOW_STRIDE}"}


@dataclass(frozen=True)
class ClipSampling:
    """Which frames of a view make its clip: `frames` (T) indices chosen by `method` (a SAMPLING_NAMES key)."""

    frames: int
    method: str = "uniform"
    # window only: where the window sits, from 0 (the take's start) to 1 (its end); None: the centre. Training
    # clips move it at random (moved_window); cached and evaluated clips never do
    position: float | None = None

    def __post_init__(self):
        if self.method not in SAMPLING_NAMES:
            raise ValueError(f"unknown sampling {self.method!r} (choose from {sorted(SAMPLING_NAMES)})")
        if self.position is not None and (self.method != "window" or not 0 <= self.position <= 1):
            raise ValueError(f"a window position in [0, 1] needs window sampling, got {self.position} with {self.method}")

    def indices(self, num_video_frames: int) -> np.ndarray:
        return sample_indices(num_video_frames, self.frames, self.method, self.position)

    def moved_window(self, seed: int, epoch: int, take_uid: str) -> ClipSampling:
        """A training clip's sampling: with window sampling, the window at a random position drawn from (seed, epoch,
        take), the same in every view and on every rank or resume; uniform sampling is left as it is."""
        if self.method != "window":
            return self
        draw = np.random.default_rng([seed % 2**64, epoch, zlib.crc32(take_uid.encode())]).random()  # seeds may be < 0
        return dataclasses.replace(self, position=float(draw))

    @property
    def preprocessing(self) -> Preprocessing:
        """What the cache fingerprint records for clips sampled this way."""
        return Preprocessing(sampling=SAMPLING_NAMES[self.method])


class VideoError(Exception):
    """A view that cannot be used: missing, empty, unreadable, truncated or too short."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def sample_indices(num_video_frames: int, num_samples: int, method: str = "uniform",
                   position: float | None = None) -> np.ndarray:
    """(T,) int64 increasing frame indices.

    uniform: the centres of `num_samples` equal segments over the whole video. window: every
    WINDOW_STRIDE-th frame of the 4T-frame window at the video's centre, or at `position` (0: its
    start, 1: its end); a video shorter than the window gets the largest stride that fits (at
    least 1).
    """
    if num_video_frames < num_samples:
        raise ValueError(f"only {num_video_frames} frames, need at least {num_samples}")
    if method == "window":
        stride = min(WINDOW_STRIDE, num_video_frames // num_samples)
        free = num_video_frames - stride * num_samples  # frames outside the window
        start = free // 2 if position is None else round(position * free)
        return start + stride * np.arange(num_samples, dtype=np.int64)
    centres = (np.arange(num_samples) + 0.5) * num_video_frames / num_samples
    return np.floor(centres).astype(np.int64)


# Containers in which decord's get_batch returns exactly the frames asked for (checked with B-frames, open GOPs and
# variable frame rates: REFERENCE.md section 5, and reviews on 2026-12-05). In MPEG-TS it returned frames up to a
# GOP late, in AVI mostly frames from the start, in MPEG-PS others again: other moments of the take, with no error.
ISO_BMFF_MEDIA_BOXES = {b"ftyp", b"moov", b"mdat", b"moof", b"styp", b"sidx"}  # what only mp4, mov and m4v files hold
MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"  # mkv, webm


def _is_iso_bmff(file: BinaryIO, boxes: int = 8) -> bool:
    """Whether the top-level boxes from the file's start (at most `boxes`, sized as ISO-BMFF sizes them) reach one
    that only ISO-BMFF files have: QuickTime files may begin with other boxes (free, wide, junk, udta, ...)."""
    offset, end = 0, os.fstat(file.fileno()).st_size
    for _ in range(boxes):
        if offset + 8 > end:  # past the end: a size field that is not a box's
            return False
        file.seek(offset)
        header = file.read(16)
        size, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if kind in ISO_BMFF_MEDIA_BOXES:
            return True
        size = int.from_bytes(header[8:16], "big") if size == 1 else size  # 1: a 64-bit size follows
        if size < 8:  # 0 ("to the end of the file") or not a box at all
            return False
        offset += size
    return False


def container_problem(file: BinaryIO) -> str | None:
    """Why the video in `file` (open for reading in binary) cannot be trusted to decode exact frames; None if it can."""
    head = file.read(12)
    if head[:4] == MATROSKA_MAGIC or _is_iso_bmff(file):
        return None
    kind = ("an MPEG-TS file" if head[:1] == b"\x47" else "an AVI file" if head[:4] == b"RIFF" and head[8:12] == b"AVI "
            else "not an mp4, mov, mkv or webm file (unknown header)")
    return (f"{kind}: decord returns exact frames only from mp4, mov, mkv and webm files, and frames of other moments "
            "from others; convert it, e.g. `ffmpeg -i FILE -c copy FILE.mp4`")


def decode_clip(path: Path, sampling: ClipSampling) -> tuple[np.ndarray, int]:
    """The sampled frames of one video, (T, H, W, 3) uint8, and its frame count. Raises VideoError naming the file."""
    import decord  # imported lazily: a process that never decodes (fit-head) need not load it

    path, num_samples = Path(path), sampling.frames
    try:
        if not path.is_file():
            raise VideoError(path, "file not found")
        if path.stat().st_size == 0:
            raise VideoError(path, "empty file (0 bytes)")
        with open(path, "rb") as file:
            if problem := container_problem(file):
                raise VideoError(path, problem)
    except OSError as err:  # unreadable (permissions, a failing disk): a failed view as any other, not a stopped run
        raise VideoError(path, f"cannot read ({type(err).__name__}: {err.strerror or err})") from err
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        num_frames = len(reader)
        if num_frames < num_samples:
            raise VideoError(path, f"only {num_frames} frames, need at least {num_samples}")
        frames = reader.get_batch(sampling.indices(num_frames).tolist()).asnumpy()
    except VideoError:
        raise
    except Exception as err:  # decord raises RuntimeError or its own DECORDError for bad streams
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = _streams_said(path) if "cannot find video stream" in first_line else ""
        raise VideoError(path, f"cannot decode ({type(err).__name__}: {first_line[:200]}){hint}") from err
    if frames.shape[0] != num_samples:
        raise VideoError(path, f"decoded {frames.shape[0]} of {num_samples} requested frames")
    return frames, num_frames


def _streams_said(path: Path) -> str:
    """What the file holds, by PyAV, where decord found no video stream it can decode: none at all (an audio-only
    file), or one in a codec decord's ffmpeg lacks (AV1). Empty if PyAV cannot tell either."""
    import av

    try:
        with av.open(str(path)) as container:
            streams = [f"{stream.type} {stream.codec_context.name}" for stream in container.streams]
    except Exception:  # a hint only: decord's own reason stands
        return ""
    if not any(stream.startswith("video") for stream in streams):
        return f"; it has no video stream ({', '.join(streams) or 'no streams'})"
    return f"; its streams: {', '.join(streams)} (a codec decord cannot decode? convert it to h264)"


FLOAT_FRAMES_BYTES = 256 * 2**20  # frames converted to float at once: a 4K frame is ~100 MB as float32


def preprocess(frames: np.ndarray, spec: Preprocessing = PREPROCESSING) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) float32, normalised.

    Frames are resized a few at a time (FLOAT_FRAMES_BYTES): full-resolution files (predict on a take folder without
    448 px copies) would otherwise hold every frame in float32 at once, ~3 GB for 32 frames of 4K. Each frame is
    resized on its own, so the result does not depend on the grouping."""
    per_frame = 4 * int(np.prod(frames.shape[1:]))
    group = max(1, FLOAT_FRAMES_BYTES // max(per_frame, 1))
    return torch.cat([_resize_and_normalise(frames[start : start + group], spec) for start in range(0, len(frames), group)])


def _resize_and_normalise(frames: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (t, 3, H, W)
    height, width = clip.shape[-2:]
    scale = spec.size / min(height, width)
    resized = (max(spec.size, int(height * scale)), max(spec.size, int(width * scale)))
    clip = F.interpolate(clip, size=resized, mode="bilinear", antialias=True, align_corners=False)
    top, left = (resized[0] - spec.size) // 2, (resized[1] - spec.size) // 2
    clip = clip[..., top : top + spec.size, left : left + spec.size]
    return (clip / 255.0 - spec.mean) / spec.std
