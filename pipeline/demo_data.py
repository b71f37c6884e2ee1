"""A small synthetic dataset in the exact layout of an `egoexo` proficiency_demonstrator download.

The skill level is split across views: label = 2 * exo_cue + ego_cue. The ego cue (a warm or cool
central panel) shows only in the ego video, the exo cue (a bright green or dark magenta central
disc) only in the four exo videos. Both cues sit in the central square that the centre crop keeps,
and are large and flat, so even a randomly initialised backbone separates them. Labels are
balanced, so the two cues are independent: one side alone tops out near 50%, ego + exos near 100%.
Nuisances vary per take and view (background tint and level, noise level, a moving blob, cue
colour jitter) so that the task is not a pixel lookup.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.files import NEW_FILE_MODE, commit_file, write_json_atomic
from pipeline.takes import LABEL_NAMES, SCENARIOS, VIEWS, annotation_path, downscaled_path

EGO_FILES = ("aria01_214-1.mp4", "aria02_214-1.mp4", "aria04_214-1.mp4", "aria_214-1.mp4", "aria1_214-1.mp4")
EXO_CAM = ("cam01.mp4", "cam02.mp4", "cam03.mp4", "cam04.mp4")
EXO_GOPRO = ("gp01.mp4", "gp02.mp4", "gp03.mp4", "gp04.mp4")
EXO_CAM05 = ("cam01.mp4", "cam02.mp4", "cam03.mp4", "cam05.mp4")
UNIVERSITIES = ("uniandes", "georgiatech", "cmu", "iiith", "minnesota", "upenn")
TASKS = {  # scenario -> (task_id, task_name, take-name word)
    "Rock Climbing": (8001, "Rock Climbing", "bouldering"),
    "Basketball": (6001, "Basketball Drills - Mikan Layup", "basketball"),
    "Dance": (5001, "Dance - Basic Step", "dance"),
    "Music": (9001, "Playing Guitar", "music"),
    "Cooking": (1001, "Cooking Tomato & Eggs", "cooking"),
    "Soccer": (7001, "Soccer Drills - Dribbling", "soccer"),
}
# (height, width): 448 px on the short side. Exos are 4:3, not the real 16:9 (796 px), which costs
# 40% more encoding; any non-square exo exercises the resize and centre crop.
EGO_SIZE, EXO_SIZE = (448, 448), (448, 598)
CUE_RADIUS = 0.3  # of the short side: the cue fills the middle of the 224 px centre crop
CUE_COLOURS = {  # (shape, cue bit) -> RGB; ego: cool vs warm panel, exo: dark magenta vs bright green disc
    ("panel", 0): (40, 90, 220),
    ("panel", 1): (220, 90, 40),
    ("disc", 0): (110, 30, 100),
    ("disc", 1): (90, 230, 110),
}


@dataclass(frozen=True)
class DemoSummary:
    takes: dict[str, int]  # split -> number of takes
    labels: dict[str, dict[str, int]]  # split -> label name -> count
    scenarios: dict[str, dict[str, int]]  # split -> scenario -> count


def write_demo_dataset(
    root: Path,
    takes: int = 40,
    val_fraction: float = 0.3,
    seed: int = 0,
    frames: int = 24,
    write_videos: bool = True,
) -> DemoSummary:
    """Write both annotation files and every take's five 448px mp4s under `root`.

    The same arguments write the same annotations and frames. `write_videos=False` writes the
    annotations only (cheap checks of the layout).
    """
    if takes < 1 or not 0 <= val_fraction < 1 or frames < 1:
        raise ValueError(f"need takes >= 1, 0 <= val_fraction < 1, frames >= 1; got {takes}, {val_fraction}, {frames}")
    root = Path(root)
    uid_rng = np.random.default_rng(seed)
    per_label = Counter(index % 4 for index in range(takes))
    seen_scenarios: Counter[str] = Counter()
    records: dict[str, list[dict]] = {"train": [], "val": []}
    for index in range(takes):
        # labels cycle 0..3; the scenario shifts by one each cycle, so every (label, scenario) pair
        # occurs once per 24 takes and no scenario predicts a cue
        label, cycle = index % 4, index // 4
        scenario = SCENARIOS[(index + cycle) % len(SCENARIOS)]
        record = _record(index, label, scenario, seen_scenarios[scenario], uid_rng)
        seen_scenarios[scenario] += 1
        records[_split(cycle, per_label[label], val_fraction)].append(record)
        if write_videos:
            _write_take_videos(root, record, label, frames, np.random.default_rng([seed, index]))
    for split, split_records in records.items():  # after the videos, atomically: both present = a complete dataset
        write_json_atomic(annotation_path(root, split), {"ds": "20231211_15:13:34", "annotations": split_records})

    def count(field: str, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
        return {split: {name: sum(r[field] == name for r in rs) for name in names} for split, rs in records.items()}

    return DemoSummary(
        takes={split: len(rs) for split, rs in records.items()},
        labels=count("proficiency_score", LABEL_NAMES),
        scenarios=count("scenario_name", SCENARIOS),
    )


def _split(occurrence: int, label_count: int, val_fraction: float) -> str:
    """Spread round(count * fraction) val takes evenly over each label's occurrences (stratified)."""
    val = math.floor(label_count * val_fraction + 0.5)
    return "val" if (occurrence + 1) * val // label_count > occurrence * val // label_count else "train"


def _record(index: int, label: int, scenario: str, occurrence: int, rng: np.random.Generator) -> dict:
    university = UNIVERSITIES[index % len(UNIVERSITIES)]
    task_id, task_name, word = TASKS[scenario]
    take_name = f"{university}_{word}_{index:03d}_{1 + index % 9}"
    # camera names as in real downloads: GoPros in some Cooking/Dance/Music takes, cam05 in some
    # Cooking/Soccer takes; the per-scenario occurrence makes every variant appear by 40 takes
    if (scenario == "Cooking" and occurrence % 3 == 0) or (scenario in ("Dance", "Music") and occurrence % 2 == 0):
        exos = EXO_GOPRO
    elif (scenario == "Cooking" and occurrence % 3 == 1) or (scenario == "Soccer" and occurrence % 2 == 1):
        exos = EXO_CAM05
    else:
        exos = EXO_CAM
    files = (EGO_FILES[index % len(EGO_FILES)], *exos)
    return {
        "task_id": task_id,
        "task_name": task_name,
        "scenario_name": scenario,
        "university_id": university,
        "origin_participant_id": f"{university}_{index % 7:03d}",
        "take_uid": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "video_paths": {view: f"takes/{take_name}/frame_aligned_videos/{name}" for view, name in zip(VIEWS, files)},
        "proficiency_score": LABEL_NAMES[label],
    }


def _write_take_videos(root: Path, record: dict, label: int, frames: int, rng: np.random.Generator) -> None:
    ego_cue, exo_cue = label & 1, label >> 1
    for view, rel in record["video_paths"].items():
        if view == "ego":
            scene = render_scene(EGO_SIZE, rng, "panel", ego_cue)
        else:
            scene = render_scene(EXO_SIZE, rng, "disc", exo_cue)
        scene.write(downscaled_path(root, rel), frames)


@dataclass(frozen=True)
class Scene:
    """One view of a take: a still image with a square blob crossing it at constant speed."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    blob_colour: np.ndarray  # (3,) uint8 RGB
    blob_size: int  # even, like every blob coordinate: whole yuv420p chroma samples
    blob_y: int
    blob_x: float
    speed: float  # px per frame

    def blob_left(self, t: int) -> int:
        return 2 * (int(self.blob_x + self.speed * t) % (self.image.shape[1] - self.blob_size) // 2)

    def write(self, path: Path, frames: int, fps: int = 30) -> None:
        """Encode `frames` frames. Only the blob moves, so the still is converted to yuv420p once
        and the blob painted into its planes: converting every frame costs nearly as much as
        encoding it."""
        height, width = self.image.shape[:2]
        to_yuv = _Yuv420p()
        still = to_yuv(self.image)
        blob_y, blob_u, blob_v = to_yuv(np.broadcast_to(self.blob_colour, (2, 2, 3))).reshape(-1)[[0, 4, 5]]
        size, top = self.blob_size, self.blob_y

        def planes():
            for t in range(frames):
                frame, left = still.copy(), self.blob_left(t)
                luma, u, v = _planes(frame, height, width)
                luma[top : top + size, left : left + size] = blob_y
                u[top // 2 : (top + size) // 2, left // 2 : (left + size) // 2] = blob_u
                v[top // 2 : (top + size) // 2, left // 2 : (left + size) // 2] = blob_v
                yield frame

        _write_yuv420p(path, planes(), height, width, fps)

    def frames(self, frames: int) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB, as `write` encodes them (before compression)."""
        clip = np.repeat(self.image[None], frames, 0)
        for t in range(frames):
            left = self.blob_left(t)
            clip[t, self.blob_y : self.blob_y + self.blob_size, left : left + self.blob_size] = self.blob_colour
        return clip


def render_scene(size: tuple[int, int], rng: np.random.Generator, shape: str, cue: int) -> Scene:
    """A textured background with a random tint and noise level, the cue at the centre, a blob."""
    height, width = size
    block = 16  # blocky noise: low-frequency texture that compresses cheaply
    tint = rng.uniform(50, 170) + rng.uniform(-30, 30, 3)
    texture = rng.normal(0, rng.uniform(0, 25), (height // block + 1, width // block + 1, 3)) + tint
    image = np.repeat(np.repeat(texture.astype(np.float32), block, 0), block, 1)[:height, :width]

    # the cue: a flat colour with per-view hue and brightness jitter and fine noise, centred so the
    # centre crop keeps all of it
    radius = int(CUE_RADIUS * min(height, width))
    box = image[height // 2 - radius : height // 2 + radius, width // 2 - radius : width // 2 + radius]
    ys, xs = np.ogrid[-radius:radius, -radius:radius]
    mask = np.ones(box.shape[:2], bool) if shape == "panel" else (ys + 0.5) ** 2 + (xs + 0.5) ** 2 < radius**2
    colour = np.array(CUE_COLOURS[shape, cue]) + rng.uniform(-20, 20, 3)
    box[mask] = colour + rng.normal(0, 4, (int(mask.sum()), 1))

    blob = 2 * int(0.05 * height)
    return Scene(
        image=np.clip(image, 0, 255).astype(np.uint8),
        blob_colour=rng.integers(0, 256, 3, dtype=np.uint8),
        blob_size=blob,
        blob_y=2 * int(rng.integers(0, (height - blob) // 2)),
        blob_x=float(rng.uniform(0, width)),
        speed=float(rng.uniform(4, 16) * rng.choice((-1, 1))),
    )


def write_video(path: Path, frames: np.ndarray, fps: int = 30, faststart: bool = False) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as an h264 yuv420p mp4, atomically.

    H and W must be even (yuv420p). `faststart` puts the moov atom before the media data.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    to_yuv = _Yuv420p()
    _write_yuv420p(path, (to_yuv(frame) for frame in frames), height, width, fps, faststart)


class _Yuv420p:
    """RGB (H, W, 3) uint8 -> yuv420p (H * 3/2, W) uint8: the Y plane, then the U and V planes
    flattened. One swscale context serves every frame: measured ~20% faster than letting encode()
    convert RGB frames."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self.reformatter = VideoReformatter()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        return self.reformatter.reformat(frame, format="yuv420p").to_ndarray()


def _planes(frame: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y (H, W), U and V (H/2, W/2) planes of a yuv420p (H * 3/2, W) array."""
    flat, luma, chroma = frame.reshape(-1), height * width, height * width // 4
    return (
        flat[:luma].reshape(height, width),
        flat[luma : luma + chroma].reshape(height // 2, width // 2),
        flat[luma + chroma :].reshape(height // 2, width // 2),
    )


def _write_yuv420p(
    path: Path, frames: Iterable[np.ndarray], height: int, width: int, fps: int = 30, faststart: bool = False
) -> None:
    """Encode yuv420p (H * 3/2, W) uint8 frames as h264 in an mp4: temp file, then rename."""
    import av  # imported lazily: only writers of videos need PyAV

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name does not end in .mp4, so a crash never leaves something that looks like a view
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, NEW_FILE_MODE)
    os.close(fd)
    try:
        options = {"movflags": "faststart"} if faststart else {}
        with av.open(tmp, mode="w", format="mp4", options=options) as container:
            # constant quantiser: no rate control, 30% faster than crf 20 with ~0.4 more mean error
            stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "qp": "26"})
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            for planes in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
            container.mux(stream.encode())
        commit_file(Path(tmp), path)  # durable: bytes, then the rename, reach the disk
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
