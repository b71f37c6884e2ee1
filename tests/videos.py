"""Small good and bad videos for tests, written with `pipeline.demo_data.write_video`.

Each bad-video helper names what `decord.VideoReader(str(path))` (decord 0.6) raises on it, at
open; `tests/test_demo_data.py` checks every one. The extractor turns all of them into a per-view
failure.
"""

from pathlib import Path

import numpy as np

from pipeline.demo_data import write_video


def good_video(
    path: Path, frames: int = 16, size: tuple[int, int] = (48, 64), seed: int = 0, faststart: bool = False
) -> Path:
    """A valid h264 mp4 of random frames; `size` is (height, width), both even. Avoid widths 16,
    24, 48 and 72: decord 0.6 decodes them with the wrong channel count."""
    clip = np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    write_video(path, clip, faststart=faststart)
    return Path(path)


def short_video(path: Path, frames: int = 2) -> Path:
    """A valid video with too few frames to sample from: decord opens it (len == frames)."""
    return good_video(path, frames=frames)


def truncated_video(path: Path) -> Path:
    """The video at `path` (a new small one if none) cut to 40% of its bytes, which loses the moov
    atom written at the end: RuntimeError ("Error reading ...")."""
    path = Path(path)
    if not path.exists():
        good_video(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def half_truncated_faststart_video(path: Path) -> Path:
    """A faststart mp4 (moov first, so the index survives) cut in half: the index points past the
    end of the file and decord raises `decord._ffi.base.DECORDError` ("av_read_frame failed"),
    which is NOT a RuntimeError. Written fresh at a size where that holds (larger frames can open)."""
    good_video(path, frames=32, size=(96, 128), faststart=True)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def random_bytes_video(path: Path, size: int = 4096) -> Path:
    """Garbage bytes named .mp4: RuntimeError ("Error reading ...")."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(np.random.default_rng(1).bytes(size))
    return Path(path)


def empty_video(path: Path) -> Path:
    """A 0-byte .mp4: RuntimeError ("Error reading ...")."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    return Path(path)


def missing_video(path: Path) -> Path:
    """No file at `path` (removed if there was one): RuntimeError ("Error reading ...")."""
    Path(path).unlink(missing_ok=True)
    return Path(path)


def container_video(path: Path, container: str, frames: int = 40) -> Path:
    """A lossless h264 video in `container` (PyAV's format name: mp4, mov, matroska, mpegts, avi) whose
    frame i has the value 6 * i in its top band (GOP 10, B-frames), so that a decoded frame tells its own index (a
    lossy encoder skips the small changes of a slower ramp: frames came out as their neighbours)."""
    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container) as output:
        stream = output.add_stream("libx264", rate=30, options={"g": "10", "bf": "2", "qp": "0"})
        stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
        for index in range(frames):
            image = np.full((64, 96, 3), 100, np.uint8)
            image[:8] = 6 * index
            output.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        output.mux(stream.encode())
    return Path(path)


def frame_indices(frames: np.ndarray) -> list[int]:
    """The index each frame of a container_video shows."""
    return (frames[:, :8].astype(np.float64).mean(axis=(1, 2, 3)) / 6).round().astype(int).tolist()


def audio_only_video(path: Path) -> Path:
    """An mp4 with one AAC stream and no video: decord says "cannot find video stream with wanted index"."""
    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        for _ in range(10):
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return Path(path)
